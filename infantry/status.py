"""``infantry status``: what a destination holds, read from the destination alone.

It never writes, never follows a link out of the destination, and needs no agent running: an exec
probe, an operator in a debug container, or a script can ask any volume infantry publishes into. The
exit code says whether the layout is whole: 0 when it is, 1 when it is not (or nothing was published).
"""

from __future__ import annotations

import calendar
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infantry.errors import InfantryError
from infantry.publish import (
    DATA,
    FALLBACK,
    MANIFEST,
    PREVIOUS,
    SNAPSHOT_DIR,
    SPOOL,
    TMP_PREFIX,
    TOLD,
    DirectPublisher,
    fallback_version,
    read_published,
    told_version,
)
from infantry.snapshot import Snapshot, printable

# infantry's own names at the top of a destination, besides snapshot directories and temporary entries.
_OWN = {DATA, PREVIOUS, FALLBACK, TOLD, MANIFEST, SPOOL}


@dataclass
class SetState:
    """One published set: its version, size, and when it went live."""

    version: str
    files: int
    bytes: int
    published_at: float | None  # seconds since the epoch, when it can be told

    @classmethod
    def of(cls, snapshot: Snapshot, published_at: float | None) -> SetState:
        size = sum(snapshot.files[path].size for path in snapshot.files)
        return cls(snapshot.version, len(snapshot.files), size, published_at)

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "version": self.version,
            "files": self.files,
            "bytes": self.bytes,
            "published_at": iso_time(self.published_at) if self.published_at is not None else None,
            "age_seconds": round(max(0.0, now - self.published_at), 3) if self.published_at is not None else None,
        }


@dataclass
class DestinationState:
    """What ``infantry status`` reports of a destination."""

    dest: Path
    layout: str  # "kubelet", "direct", or "none" when nothing was published
    live: SetState | None = None
    previous: SetState | None = None
    fallback: bool = False  # the live set is the --fallback baked into the image, not the store's
    told: bool = False  # the app was told of the live set (or started after it went live)
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        """A set is live, every link of the layout resolves, and nothing is left over."""
        return self.live is not None and not self.problems and not self.leftovers

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "dest": str(self.dest),
            "layout": self.layout,
            "whole": self.whole,
            "live": self.live.as_json(now) if self.live else None,
            "previous": self.previous.as_json(now) if self.previous else None,
            "fallback": self.fallback,
            "app_told": self.told,
            "problems": self.problems,
            "leftovers": self.leftovers,
        }


def iso_time(seconds: float) -> str:
    """A wall-clock time as JSON shows it: UTC, to the millisecond."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


def _dir_time(name: str) -> float | None:
    """When a snapshot directory was made, from its name (``..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN``, UTC);
    None for a name of that shape that is no time (anyone who may write the volume can make one)."""
    stamp, _, fraction = name[2:].partition(".")
    try:
        return calendar.timegm(time.strptime(stamp, "%Y_%m_%d_%H_%M_%S")) + int(fraction) / 1e9
    except (ValueError, OverflowError):
        return None


def snapshot_dir(dest: Path, link: str) -> tuple[str | None, str | None]:
    """The snapshot directory ``dest/link`` points at, or why it does not point at one (None, None when
    there is no such link)."""
    try:
        target = os.readlink(dest / link)
    except FileNotFoundError:
        return None, None
    except OSError:
        return None, f"{link} is not a link"
    if not SNAPSHOT_DIR.fullmatch(target):
        return None, f"{link} points at {printable(target)}, not at a snapshot directory of the destination"
    try:
        mode = os.lstat(dest / target).st_mode
    except OSError:
        return None, f"{link} points at {target}, which is missing"
    if not stat.S_ISDIR(mode):
        return None, f"{link} points at {target}, which is not a directory"
    return target, None


def live_since(dest: Path) -> float | None:
    """When the set live in ``dest`` went live, if that can be told from the destination: when ``..data``
    was swapped to it (the link is made then), or when the direct layout's file list was written."""
    for name in (DATA, MANIFEST):
        try:
            return os.lstat(dest / name).st_mtime
        except OSError:
            continue
    return None


def read_state(dest: Path, file_mode: int) -> DestinationState:
    """Read what ``dest`` holds; see the module's docstring."""
    try:
        names = sorted(os.listdir(dest))
    except OSError as exc:
        state = DestinationState(dest, "none")
        state.problems.append(f"{dest} cannot be read: {exc.strerror}")
        return state
    if os.path.lexists(dest / DATA):
        state = _kubelet(dest, names, file_mode)
    elif os.path.lexists(dest / MANIFEST):
        state = _direct(dest, file_mode)
    else:
        state = DestinationState(dest, "none")
        state.problems.append("nothing was published here: no ..data link and no file list")
        return state
    if state.live is not None:
        state.fallback = fallback_version(dest) == state.live.version
        state.told = told_version(dest) == state.live.version
    return state


def _kubelet(dest: Path, names: list[str], file_mode: int) -> DestinationState:
    state = DestinationState(dest, "kubelet")
    live_dir, problem = snapshot_dir(dest, DATA)
    if problem:
        state.problems.append(problem)
    live = read_published(dest / live_dir, file_mode) if live_dir else None
    if live_dir and live is None:
        state.problems.append(
            f"the live set in {live_dir} cannot be read whole, holds no files, or holds something infantry "
            "does not write (a link, a FIFO, a device, a directory that cannot be listed)"
        )
    if live_dir and live is not None:
        state.live = SetState.of(live, live_since(dest))
    previous_dir, problem = snapshot_dir(dest, PREVIOUS)
    if problem:
        state.leftovers.append(PREVIOUS)
    previous = read_published(dest / previous_dir, file_mode) if previous_dir else None
    if previous_dir and previous is not None:
        state.previous = SetState.of(previous, _dir_time(previous_dir))
    tops = live.top_level() if live is not None else set()
    for top in sorted(tops):
        try:
            target = os.readlink(dest / top)
        except OSError:
            state.problems.append(f"{printable(top)} is missing, or is not the link into {DATA}")
            continue
        if target != f"{DATA}/{top}":
            state.problems.append(f"{printable(top)} points at {printable(target)}, not into {DATA}")
    for name in names:
        if name in tops or name in _OWN or name in (live_dir, previous_dir):
            continue
        if name.startswith(TMP_PREFIX) or name == f"{DATA}_tmp" or SNAPSHOT_DIR.fullmatch(name):
            state.leftovers.append(name)  # a publish that did not finish, or a set no longer kept
        else:
            try:
                target = os.readlink(dest / name)
            except OSError:
                continue  # not a link (someone else's file), or gone meanwhile
            if target.startswith(f"{DATA}/"):
                state.leftovers.append(name)  # a link to a name the live set no longer has
    return state


def _direct(dest: Path, file_mode: int) -> DestinationState:
    state = DestinationState(dest, "direct")
    try:
        live = DirectPublisher(dest, file_mode).current()
    except (OSError, InfantryError) as exc:  # a link or a file where a directory of the set belongs
        state.problems.append(f"the set cannot be read: {exc}")
        return state
    if live is None:
        state.problems.append("a file the list names is missing, changed into something else, or unreadable")
        return state
    state.live = SetState.of(live, os.lstat(dest / MANIFEST).st_mtime)
    state.leftovers.extend(name for name in sorted(os.listdir(dest)) if name.startswith(TMP_PREFIX))
    return state


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    size = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def _age(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return " ".join([*parts, f"{secs}s"] if not days else parts)


def render_text(state: DestinationState, now: float) -> str:
    """The state as a person reads it."""
    layout = f" ({state.layout} layout)" if state.layout != "none" else ""
    lines = [f"destination  {state.dest}{layout}: {'whole' if state.whole else 'NOT WHOLE'}"]
    for label, kept in (("live", state.live), ("previous", state.previous)):
        if kept is None:
            lines.append(f"{label:<12} none")
            continue
        when = "at a time that cannot be told"
        if kept.published_at is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(kept.published_at))
            when = f"{stamp} ({_age(now - kept.published_at)} ago)"
        lines.append(f"{label:<12} {kept.version[:12]}  {kept.files} files, {_size(kept.bytes)}, published {when}")
    if state.live is not None:
        lines.append(f"{'fallback':<12} {'yes: the baked-in fallback is live' if state.fallback else 'no'}")
        lines.append(f"{'app told':<12} {'yes' if state.told else 'not yet'}")
    lines.extend(f"problem      {problem}" for problem in state.problems)
    lines.extend(f"leftover     {printable(name)}" for name in state.leftovers)
    return "\n".join(lines) + "\n"


def run_status(dest: Path, file_mode: int, as_json: bool) -> int:
    """Print the destination's state; 0 when it is whole, 1 when not."""
    state = read_state(dest, file_mode)
    now = time.time()
    if as_json:
        print(json.dumps(state.as_json(now), indent=2))
    else:
        print(render_text(state, now), end="")
    return 0 if state.whole else 1
