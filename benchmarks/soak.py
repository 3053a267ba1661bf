"""A soak of ``infantry watch``: a store changing every second, faults injected at random, a reader all along.

Real parts only: a real etcd whose prefix holds N keys that all carry the line ``version <V>`` (changed
in one transaction every second, so a whole version changes at once); ``infantry watch`` as a real
process publishing into a small tmpfs (so the disk can really fill up); a reader process checking that
every pass sees one whole version; a real reload endpoint and a real ``--exec`` hook, each of which
"loads" the destination when it succeeds, so that the soak knows which version the app was told of.

Faults come one at a time, each for a few seconds:

    disk_full      a ballast file fills the tmpfs, then is removed
    dest_edit      with the store held still, the destination is edited behind infantry's back
                   (a live file overwritten in place, a top-level link deleted, or ``..data`` deleted)
    store_restart  etcd is killed, then started again on its data directory
    reload_500     the reload endpoint answers 500
    hook_hang      the --exec hook hangs (``--exec-timeout 2`` must kill it)

A checker samples ~10 times a second: the destination as an app reads it, the version the app was last
told of (by the endpoint and by the hook), the store's version as of a moment ago, and ``/healthz``. From
those samples, after the run:

- convergence: for each fault, the time from its end to the first sample where the destination holds
  the store's version and the app was told of it (must be within stale-after + tolerance);
- health: 503 is required once the destination has been out of step (or the store down) for longer than
  stale-after + tolerance, and 200 once it has been in step, with the store up, for the tolerance;
- torn reads: no reader pass and no checker sample may see a mixed or incomplete set, except while the
  soak itself is editing the destination;
- the watch process must never exit, and its RSS, open fds, threads and children stay bounded.

Exit 0 when every criterion holds, 1 otherwise. Run as root (it mounts a tmpfs):

    .venv/bin/python benchmarks/soak.py --duration 600 --output benchmarks/SOAK.md
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import HELPERS, Etcd, ReloadEndpoint, Watch  # noqa: E402

KEYS = 8
PREFIX = "/app/"
INTERVAL = 0.5
STALE_AFTER = 5.0
EXEC_TIMEOUT = 2.0
# Probe timing on a busy machine: how far a health answer may lag behind the state the soak observed.
TOLERANCE = 2.0
CONVERGE_LIMIT = STALE_AFTER + TOLERANCE
# The destination follows the store a few milliseconds late: a version counts as required one second
# after the store committed it, and until then the previous one still matches.
STORE_GRACE = 1.0
SAMPLE_PERIOD = 0.1
# In step counts as converged only once it lasts: a destination one version behind still passes for
# STORE_GRACE after each change, and must not pass for caught up.
SETTLE = 2.0
PROBE_TIMEOUT = 1.0  # the kubelet's default probe timeout
TMPFS_SIZE = "4m"
KINDS = ("disk_full", "dest_edit", "store_restart", "reload_500", "hook_hang")
EDITS = ("overwrite", "overwrite_same_size", "unlink_link", "unlink_data")
# The fixed order `--order fixed` plays (the test's): every kind, every edit, long enough for 503.
FIXED: tuple[tuple[str, str, float], ...] = (
    ("disk_full", "", 9.0),
    ("dest_edit", "overwrite", 0.0),
    ("store_restart", "", 8.0),
    ("dest_edit", "unlink_link", 0.0),
    ("reload_500", "", 9.0),
    ("dest_edit", "unlink_data", 0.0),
    ("hook_hang", "", 5.0),
    ("dest_edit", "overwrite_same_size", 0.0),
)
# What "bounded" means for the watch process over the run.
MAX_RSS_KIB = 256 * 1024
MAX_FDS = 64
MAX_THREADS = 32
MAX_CHILDREN = 4
MAX_UNANSWERED = 0.02  # share of health probes allowed to go unanswered within PROBE_TIMEOUT


def log(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))]


# -- the store -------------------------------------------------------------------------------------


class Store:
    """The etcd prefix, changed to a new whole version every second by a writer thread.

    ``committed`` holds (time the transaction returned, version); ``down`` the spans etcd was killed.
    """

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.version = 0
        self.committed: list[tuple[float, int]] = []
        self.down: list[tuple[float, float]] = []
        self.held = threading.Event()  # set while a fault needs the store to stand still
        self.up = True
        self.failed_writes = 0
        self._down_since: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)

    @staticmethod
    def values(version: int) -> dict[str, bytes | str]:
        return {f"{PREFIX}k{i}": f"version {version}\nkey k{i}\n{'x' * 64}\n" for i in range(KEYS)}

    def write(self) -> bool:
        """Commit the next version in one transaction; False if etcd did not take it."""
        try:
            self.etcd.txn(self.values(self.version + 1))
        except (httpx.HTTPError, OSError):
            self.failed_writes += 1
            return False
        with self._lock:
            self.version += 1
            self.committed.append((time.monotonic(), self.version))
        return True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += 1.0
            if not self.held.is_set() and self.up:
                self.write()
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def kill(self) -> None:
        with self._lock:
            self.up = False
            self._down_since = time.monotonic()
        self.etcd.kill()

    def restart(self) -> None:
        self.etcd.start()  # the same data directory and ports
        with self._lock:
            assert self._down_since is not None
            self.down.append((self._down_since, time.monotonic()))
            self._down_since = None
            self.up = True

    def required(self, at: float) -> int:
        """The version the destination must hold at ``at``: the latest committed STORE_GRACE before."""
        with self._lock:
            times = [t + STORE_GRACE for t, _ in self.committed]
            index = bisect.bisect_right(times, at) - 1
            return self.committed[max(index, 0)][1]

    def is_up(self, at: float) -> bool:
        with self._lock:
            if self._down_since is not None and at >= self._down_since:
                return False
            return not any(start <= at < end for start, end in self.down)


# -- the app: what it was last told of ------------------------------------------------------------


def read_version(dest: Path) -> tuple[int | None, bool]:
    """The version an app reads through DEST's top-level names, and whether the set it saw was torn.

    (None, False) when it cannot read a stable set (nothing there, or ``..data`` moved during each try);
    (None, True) when ``..data`` stood still and the set was not N files of one version.
    """
    for _ in range(3):
        try:
            before = os.readlink(dest / "..data")
            firsts = [
                (dest / name).read_text().split("\n", 1)[0]
                for name in sorted(os.listdir(dest))
                if not name.startswith("..")
            ]
            after = os.readlink(dest / "..data")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            time.sleep(0.005)
            continue
        if before != after:
            continue
        versions = set(firsts)
        if len(firsts) != KEYS or len(versions) != 1:
            return None, True
        return parse_version(versions.pop()), False
    return None, False


def parse_version(line: str) -> int | None:
    word, _, number = line.partition(" ")
    return int(number) if word == "version" and number.isdigit() else None


class AppEndpoint(ReloadEndpoint):
    """The app's reload endpoint: each 2xx answer means the app loaded the destination as it was then."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.loaded = 0
        self._answer = 200
        super().__init__()

    @property
    def status(self) -> int:
        """The answer to a reload call (read once per call by the handler); a 2xx loads the destination."""
        answer = self._answer
        if 200 <= answer < 300:
            version, _ = read_version(self.dest)
            if version is not None:
                self.loaded = version
        return answer

    @status.setter
    def status(self, value: int) -> None:
        self._answer = value


def hook_loaded(path: Path) -> int:
    try:
        return parse_version(path.read_text().strip()) or 0
    except FileNotFoundError:
        return 0


# -- samples ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float
    dest: int | None
    torn: bool
    required: int
    told_endpoint: int
    told_hook: int
    store_up: bool
    health: int  # 0: no answer within PROBE_TIMEOUT
    body: str
    measured: bool  # False during warm-up and shutdown

    @property
    def in_step(self) -> bool:
        """The destination holds the store's version (as of STORE_GRACE ago), and the app was told."""
        if self.dest is None:
            return False
        return min(self.dest, self.told_endpoint, self.told_hook) >= self.required and self.store_up


@dataclass(frozen=True)
class Usage:
    t: float
    rss_kib: int
    fds: int
    threads: int
    children: int


def probe(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=PROBE_TIMEOUT) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def usage(pid: int) -> Usage:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Usage(time.monotonic(), int(status["VmRSS"].split()[0]), fds, int(status["Threads"]), descendants(pid))


def descendants(pid: int) -> int:
    """How many processes descend from ``pid`` (hook commands and anything they left behind)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = 0, {pid}
    while frontier:
        children = {child for child, parent in parents.items() if parent in frontier}
        found += len(children)
        frontier = children
    return found


class Checker:
    """Samples the destination, the app, the store and /healthz about ten times a second."""

    def __init__(self, store: Store, dest: Path, endpoint: AppEndpoint, hook_file: Path, watch: Watch) -> None:
        self.store, self.dest, self.endpoint, self.hook_file, self.watch = store, dest, endpoint, hook_file, watch
        self.samples: list[Sample] = []
        self.usage: list[Usage] = []
        self.measuring = False
        self.watch_exited: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def _run(self) -> None:
        next_at = time.monotonic()
        next_usage = next_at
        while not self._stop.is_set():
            self.samples.append(self._sample())
            now = time.monotonic()
            if self.watch.proc.poll() is not None:
                self.watch_exited = self.watch.proc.returncode
                return
            if now >= next_usage:
                with contextlib.suppress(OSError):
                    self.usage.append(usage(self.watch.proc.pid))
                next_usage = now + 1.0
            next_at += SAMPLE_PERIOD
            if next_at < now:
                next_at = now  # fell behind on a busy machine: sample now, do not burst
            self._stop.wait(next_at - now)

    def _sample(self) -> Sample:
        t = time.monotonic()
        dest, torn = read_version(self.dest)
        told_endpoint, told_hook = self.endpoint.loaded, hook_loaded(self.hook_file)
        health, body = probe(self.watch.port)
        return Sample(
            t=t,
            dest=dest,
            torn=torn,
            required=self.store.required(t),
            told_endpoint=told_endpoint,
            told_hook=told_hook,
            store_up=self.store.is_up(t),
            health=health,
            body=body.strip()[:300],
            measured=self.measuring,
        )

    def wait_in_step(self, timeout: float) -> bool:
        """Wait until the samples taken from now on have been in step for SETTLE seconds; False after ``timeout``."""
        since = time.monotonic()
        deadline = since + timeout + SETTLE
        while time.monotonic() < deadline:
            index = len(self.samples) - 1
            while index >= 0 and self.samples[index].t >= since and self.samples[index].in_step:
                index -= 1
            run = self.samples[index + 1 :]
            if run and run[-1].t - run[0].t >= SETTLE:
                return True
            if self.watch_exited is not None:
                return False
            time.sleep(0.02)
        return False


# -- faults ----------------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    variant: str
    started: float
    ended: float = 0.0
    converged: float | None = None  # seconds from ``ended`` to the first in-step sample
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.variant}" if self.variant else self.kind


@dataclass
class Rig:
    """Every part of one soak, and how to inject each fault into them."""

    workdir: Path
    mount: Path
    dest: Path
    store: Store
    endpoint: AppEndpoint
    hang_flag: Path
    checker: Checker
    faults: list[Fault] = field(default_factory=list)
    excused: list[tuple[float, float]] = field(default_factory=list)  # spans of the soak's own edits

    def inject(self, kind: str, variant: str, seconds: float) -> Fault:
        fault = Fault(kind, variant, time.monotonic())
        self.faults.append(fault)
        log(f"fault {fault.label}" + ("" if kind == "dest_edit" else f" for {seconds:.1f}s"))
        if kind == "dest_edit":
            self._edit(fault, variant)
            return fault
        undo = self._start(kind)
        time.sleep(seconds)
        undo()
        fault.ended = time.monotonic()
        return fault

    def _start(self, kind: str) -> Callable[[], None]:
        if kind == "disk_full":
            ballast = self.mount / "ballast"
            # Unbuffered, so the last partial write fails inside the loop, not when the file is closed.
            with ballast.open("wb", buffering=0) as out, contextlib.suppress(OSError):  # ENOSPC is the point
                chunk = b"\0" * 4096
                while True:
                    out.write(chunk)
            return ballast.unlink
        if kind == "store_restart":
            self.store.kill()
            return self.store.restart
        if kind == "reload_500":
            self.endpoint.status = 500
            return lambda: setattr(self.endpoint, "status", 200)
        if kind == "hook_hang":
            self.hang_flag.touch()
            return self.hang_flag.unlink
        raise ValueError(kind)

    def _edit(self, fault: Fault, variant: str) -> None:
        """Edit the destination with the store held still, so that only infantry's own reconcile repairs it."""
        self.store.held.set()
        try:
            if not self.checker.wait_in_step(CONVERGE_LIMIT):
                fault.note = "destination not in step before the edit"
            victim = f"k{random.randrange(KEYS)}"
            start = time.monotonic()
            self._tamper(variant, victim)
            fault.ended = time.monotonic()
            self.checker.wait_in_step(CONVERGE_LIMIT + 3)
            self.excused.append((start - 0.05, time.monotonic() + 0.2))
        except OSError as exc:  # the destination was not whole to begin with: say so, and carry on
            fault.ended = time.monotonic()
            fault.note = f"could not edit: {exc}"
        finally:
            self.store.held.clear()

    def _tamper(self, variant: str, victim: str) -> None:
        """Change the destination behind infantry's back, as ``variant`` says, on the file ``victim``."""
        if variant == "overwrite":
            (self.dest / "..data" / victim).write_text("tampered\n")
        elif variant == "overwrite_same_size":
            # Another version's content, same size, written in place: only the bytes differ.
            path = self.dest / "..data" / victim
            current = path.read_text()
            version = parse_version(current.split("\n", 1)[0]) or 0
            other = current.replace(f"version {version}", f"version {version - 1}", 1)
            if len(other) != len(current):
                other = current.replace(f"version {version}", f"version {version + 1}", 1)
            with path.open("r+") as out:
                out.write(other)
        elif variant == "unlink_link":
            (self.dest / victim).unlink()
        elif variant == "unlink_data":
            (self.dest / "..data").unlink()
        else:
            raise ValueError(variant)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Report:
    duration: float
    order: str
    seed: int
    faults: list[dict[str, Any]]
    by_kind: dict[str, int]
    converge_p50: float | None
    converge_max: float | None
    unconverged: list[str]
    slow: list[str]
    samples: int
    health_required_503: int
    health_required_200: int
    health_violations: int
    violation_examples: list[str]
    unanswered: int
    reader_checked: int
    reader_problems: int
    reader_excused: int
    reader_examples: list[str]
    checker_torn: int
    store_versions: int
    store_failed_writes: int
    watch_alive: bool
    watch_exit: int | None
    rss_kib_min: int
    rss_kib_max: int
    rss_kib_first_last: tuple[int, int]
    fds_max: int
    threads_max: int
    children_max: int
    watch_log: str
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


def mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"cannot mount a tmpfs at {path} (the soak needs root): {result.stderr.strip()}")


@contextlib.contextmanager
def spawned(argv: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run(duration: float, order: str, seed: int, workdir: Path) -> Report:
    """Run the soak for ``duration`` seconds of faults (``order``: random or fixed) and judge it."""
    random.seed(seed)
    mount, hook_file, hang_flag = workdir / "mnt", workdir / "hook-loaded", workdir / "hang"
    with contextlib.ExitStack() as stack:
        mount_tmpfs(mount)
        stack.callback(lambda: subprocess.run(["umount", "-l", str(mount)], check=False))
        dest = mount / "dest"

        etcd = Etcd(workdir / "etcd")
        etcd.start()
        stack.callback(etcd.stop)
        store = Store(etcd)
        assert store.write(), "etcd did not take the first version"

        endpoint = AppEndpoint(dest)
        stack.callback(endpoint.stop)
        hook = f"sh {HELPERS / 'soak_hook.sh'} {hang_flag} {dest} {hook_file}"
        watch = Watch(
            workdir,
            [
                "--source", etcd.url(PREFIX), "--dest", str(dest), "--interval", str(INTERVAL),
                "--stale-after", str(STALE_AFTER), "--reload-url", endpoint.url, "--exec", hook,
                "--exec-timeout", str(EXEC_TIMEOUT),
            ],
        )  # fmt: skip
        stack.callback(lambda: watch.proc.kill() if watch.proc.poll() is None else None)
        watch.wait_ready(timeout=30)

        report_file, problems_file = workdir / "reader.json", workdir / "reader-problems.jsonl"
        reader = stack.enter_context(
            spawned([sys.executable, str(HELPERS / "soak_reader.py"), str(dest), str(KEYS), str(report_file),
                     str(problems_file)])
        )  # fmt: skip
        ready = report_file.with_name(report_file.name + ".ready")
        deadline = time.monotonic() + 20
        while not ready.exists():
            if reader.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the reader did not start reading")
            time.sleep(0.02)

        checker = Checker(store, dest, endpoint, hook_file, watch)
        checker.start()
        stack.callback(checker.stop)
        store.start()
        stack.callback(store.stop)
        # Warm-up: the first set went into an empty destination and told nobody; wait for a told one.
        if not checker.wait_in_step(30):
            raise SystemExit(f"infantry never got in step before the faults began:\n{watch.log()[-3000:]}")

        rig = Rig(workdir, mount, dest, store, endpoint, hang_flag, checker)
        checker.measuring = True
        started = time.monotonic()
        plan = iter(FIXED)
        while checker.watch_exited is None:
            if order == "fixed":
                step = next(plan, None)
                if step is None:
                    if time.monotonic() - started >= duration:
                        break
                    plan = iter(FIXED)
                    continue
                kind, variant, seconds = step
            else:
                if time.monotonic() - started >= duration:
                    break
                kind = random.choice(KINDS)
                variant = random.choice(EDITS) if kind == "dest_edit" else ""
                seconds = round(random.uniform(2.0, 12.0), 1)
            rig.inject(kind, variant, seconds)
            if not checker.wait_in_step(CONVERGE_LIMIT + 10):
                log(f"not in step {CONVERGE_LIMIT + 10:.0f}s after {kind} ended")
            # A quiet spell, so that /healthz is also judged while all is well.
            time.sleep(random.uniform(2.0, 5.0) if order == "random" else 1.0 if kind == "dest_edit" else 2.0)
        checker.measuring = False
        elapsed = time.monotonic() - started

        store.stop()
        checker.stop()
        reader.send_signal(signal.SIGTERM)
        reader.wait(timeout=15)
        alive = watch.proc.poll() is None
        code, _ = watch.stop()
        with (workdir / "samples.jsonl").open("w") as out:
            out.writelines(json.dumps(asdict(sample)) + "\n" for sample in checker.samples)
        return judge(rig, elapsed, order, seed, report_file, problems_file, alive, watch, code)


def judge(
    rig: Rig,
    elapsed: float,
    order: str,
    seed: int,
    report_file: Path,
    problems_file: Path,
    alive: bool,
    watch: Watch,
    code: int,
) -> Report:
    """Turn the samples into figures, and the figures into pass or fail."""
    samples = [s for s in rig.checker.samples if s.measured]
    failures: list[str] = []

    # Convergence: from each fault's end to the start of the first in-step run that lasts SETTLE seconds.
    for fault in rig.faults:
        fault.converged = None
        run_start: Sample | None = None
        for sample in samples:
            if sample.t < fault.ended or not sample.in_step:
                run_start = None
                continue
            run_start = run_start or sample
            if sample.t - run_start.t >= SETTLE:
                fault.converged = run_start.t - fault.ended
                break
    converged = [f.converged for f in rig.faults if f.converged is not None]
    unconverged = [f.label for f in rig.faults if f.converged is None]
    slow = [
        f"{f.label} {f.converged:.2f}s" for f in rig.faults if f.converged is not None and f.converged > CONVERGE_LIMIT
    ]

    # Health: judged against how long the truth has been what it is at each probe. A probe is sent after
    # its sample's reads and before the next sample's, so the truth it answers lies between the two: it
    # is judged only where both agree (the app told a millisecond after the reads is not a lie).
    required_503 = required_200 = unanswered = 0
    violations: list[str] = []
    run_since = samples[0].t if samples else 0.0
    for previous, sample, following in zip([None, *samples], samples, samples[1:], strict=False):
        if previous is not None and previous.in_step != sample.in_step:
            run_since = sample.t
        if sample.health == 0:
            unanswered += 1
            continue
        if following.in_step != sample.in_step:
            continue
        lasted = sample.t - run_since
        if not sample.in_step and lasted > STALE_AFTER + TOLERANCE:
            required_503 += 1
            if sample.health != 503:
                violations.append(f"t={sample.t:.1f} out of step {lasted:.1f}s, healthz {sample.health}: {sample}")
        elif sample.in_step and lasted > TOLERANCE:
            required_200 += 1
            if sample.health != 200:
                violations.append(f"t={sample.t:.1f} in step {lasted:.1f}s, healthz {sample.health}: {sample}")

    # Torn reads: the reader's and the checker's, outside the soak's own edits.
    def excused(t0: float, t1: float) -> bool:
        return any(t0 <= end and t1 >= start for start, end in rig.excused)

    reader = json.loads(report_file.read_text()) if report_file.exists() else {"checked": 0, "problems": -1}
    bad_passes = [json.loads(line) for line in problems_file.read_text().splitlines()] if problems_file.exists() else []
    unexcused = [p for p in bad_passes if not excused(p["t0"], p["t1"])]
    checker_torn = sum(1 for s in samples if s.torn and not excused(s.t, s.t + SAMPLE_PERIOD))

    usage = rig.checker.usage or [Usage(0, 0, 0, 0, 0)]
    rss = [u.rss_kib for u in usage]

    if rig.checker.watch_exited is not None or not alive:
        failures.append(f"infantry watch exited ({rig.checker.watch_exited})")
    if unconverged:
        failures.append(f"never converged after: {', '.join(unconverged)}")
    if slow:
        failures.append(f"converged later than {CONVERGE_LIMIT:.0f}s after: {', '.join(slow)}")
    if violations:
        failures.append(f"{len(violations)} health samples contradicted the truth")
    if samples and unanswered > MAX_UNANSWERED * len(samples):
        failures.append(f"{unanswered} of {len(samples)} health probes unanswered within {PROBE_TIMEOUT}s")
    if unexcused or reader["problems"] < 0:
        failures.append(f"{len(unexcused)} torn reader passes (reader report: {reader})")
    if checker_torn:
        failures.append(f"{checker_torn} torn checker samples")
    if reader["checked"] == 0:
        failures.append("the reader checked no pass")
    for name, values, limit in (
        ("RSS KiB", rss, MAX_RSS_KIB),
        ("open fds", [u.fds for u in usage], MAX_FDS),
        ("threads", [u.threads for u in usage], MAX_THREADS),
        ("children", [u.children for u in usage], MAX_CHILDREN),
    ):
        if max(values) > limit:
            failures.append(f"{name} reached {max(values)} (limit {limit})")
    if code != 0:
        failures.append(f"infantry watch exited {code} on SIGTERM")

    by_kind: dict[str, int] = {}
    for fault in rig.faults:
        by_kind[fault.label] = by_kind.get(fault.label, 0) + 1
    return Report(
        duration=round(elapsed, 1),
        order=order,
        seed=seed,
        faults=[asdict(f) for f in rig.faults],
        by_kind=by_kind,
        converge_p50=statistics.median(converged) if converged else None,
        converge_max=max(converged) if converged else None,
        unconverged=unconverged,
        slow=slow,
        samples=len(samples),
        health_required_503=required_503,
        health_required_200=required_200,
        health_violations=len(violations),
        violation_examples=violations[:10],
        unanswered=unanswered,
        reader_checked=int(reader["checked"]),
        reader_problems=len(unexcused),
        reader_excused=len(bad_passes) - len(unexcused),
        reader_examples=[p["what"] for p in unexcused[:5]],
        checker_torn=checker_torn,
        store_versions=rig.store.version,
        store_failed_writes=rig.store.failed_writes,
        watch_alive=alive and rig.checker.watch_exited is None,
        watch_exit=code,
        rss_kib_min=min(rss),
        rss_kib_max=max(rss),
        rss_kib_first_last=(rss[0], rss[-1]),
        fds_max=max(u.fds for u in usage),
        threads_max=max(u.threads for u in usage),
        children_max=max(u.children for u in usage),
        watch_log=str(watch.log_path),
        failures=failures,
    )


def render(report: Report) -> str:
    """The report as Markdown."""
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(report.by_kind.items()))
    p50 = f"{report.converge_p50:.2f}" if report.converge_p50 is not None else "-"
    worst = f"{report.converge_max:.2f}" if report.converge_max is not None else "-"
    lines = [
        "# Soak",
        "",
        f"`benchmarks/soak.py --duration {report.duration:.0f}` (order {report.order}, seed {report.seed}) on "
        f"{os.cpu_count()} cores: etcd changing every second ({report.store_versions} versions), "
        f"`infantry watch --interval {INTERVAL} --stale-after {STALE_AFTER:.0f}` into a {TMPFS_SIZE} tmpfs, "
        "a reader all along, one fault at a time.",
        "",
        f"**{'PASS' if report.ok else 'FAIL'}**",
        "",
        "| figure | value |",
        "|---|---|",
        f"| faults | {len(report.faults)} ({kinds}) |",
        f"| convergence after a fault ends, p50 / max | {p50} s / {worst} s (limit {CONVERGE_LIMIT:.0f} s) |",
        f"| faults not converged / too slow | {len(report.unconverged)} / {len(report.slow)} |",
        f"| health samples (503 required / 200 required) | {report.samples} ({report.health_required_503} / "
        f"{report.health_required_200}) |",
        f"| health violations | {report.health_violations} |",
        f"| health probes unanswered within {PROBE_TIMEOUT:.0f} s | {report.unanswered} |",
        f"| reader passes checked | {report.reader_checked} |",
        f"| torn passes (reader / checker) | {report.reader_problems} / {report.checker_torn} "
        f"({report.reader_excused} excused during the soak's own edits) |",
        f"| watch alive throughout, exit on SIGTERM | {report.watch_alive}, {report.watch_exit} |",
        f"| watch RSS min / max (first / last) | {report.rss_kib_min / 1024:.1f} / {report.rss_kib_max / 1024:.1f} MiB"
        f" ({report.rss_kib_first_last[0] / 1024:.1f} / {report.rss_kib_first_last[1] / 1024:.1f}) |",
        f"| watch max open fds / threads / children | {report.fds_max} / {report.threads_max} / "
        f"{report.children_max} |",
        "",
        "| fault | converged after (s) | note |",
        "|---|---|---|",
    ]
    for fault in report.faults:
        kind = fault["kind"] + (f":{fault['variant']}" if fault["variant"] else "")
        after = "never" if fault["converged"] is None else f"{fault['converged']:.2f}"
        lines.append(f"| {kind} | {after} | {fault['note']} |")
    if report.failures:
        lines += ["", "Failures:", "", *[f"- {failure}" for failure in report.failures]]
    if report.violation_examples:
        lines += ["", "Health violations (first):", "", *[f"- `{v}`" for v in report.violation_examples]]
    if report.reader_examples:
        lines += ["", "Torn passes (first):", "", *[f"- `{v}`" for v in report.reader_examples]]
    lines += ["", f"watch log: `{report.watch_log}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults (default 600)")
    parser.add_argument("--order", choices=("random", "fixed"), default="random", help="fault order")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    parser.add_argument("--output", type=Path, help="write the report as Markdown here (e.g. benchmarks/SOAK.md)")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--workdir", type=Path, help="working directory, kept afterwards (default: a new one)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the soak mounts a tmpfs: run it as root")
    seed = args.seed if args.seed is not None else int(time.time())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="infantry-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"workdir {workdir}, seed {seed}")
    report = run(args.duration, args.order, seed, workdir)
    text = render(report)
    print(text)
    if args.output:
        args.output.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    if report.ok and args.workdir is None:
        shutil.rmtree(workdir / "etcd", ignore_errors=True)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
