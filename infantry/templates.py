"""Templates: Jinja2 text rendered over the values of the merged set of sources.

Most stores hold values, not files (``/services/web/10.0.0.5:8080 = up``). A :class:`Renderer` renders
each :class:`Template` over the merged set, in a sandbox, and returns the rendered files, which join the
one snapshot that is checked, published and reloaded. This module is a pure library: it reads no
settings and writes no files.

Its errors sit in the tree of :mod:`infantry.errors`::

    SettingsError
    └── TemplateSyntax       a template does not compile                        (exit 2)
    UnsafeDataError
    └── RenderError          a template failed while rendering                  (exit 5)
        └── MissingKey       ... because it read a key the set does not hold

Each names the template, where its text came from, and the template line when it is known.

Bounds. A template may come from the store, so it is treated as hostile:

- it compiles in this process, as one file (no include, import or extends), and renders in a forked
  child, so that what no in-process bound can hold (memory built by one C call, one C call that runs
  for hours holding the GIL) costs the child, never the caller;
- the child may allocate ``memory`` bytes beyond what it inherits (RLIMIT_AS), and past it a render
  fails with "used more than N MiB"; the kernel's OOM killer picks it first if the pod runs short;
- it runs for at most ``timeout`` seconds, checked by a trace function on every call and every
  template line; the parent kills the child a second after that, whatever it is doing;
- it runs in Jinja's immutable sandbox (no ``_`` attributes, no mutation of lists and dicts);
- its output stops at ``max_output`` bytes;
- no single value it builds may pass ``max_output`` bytes (about: an item of a list counts 8 bytes):
  ``*``, ``**``, ``%``, ``+``, ``~``, the growing string methods and filters are estimated before
  they run, so the common memory bombs are refused with a clear message before they allocate;
- no message quotes a value it read, or an env() value, in any form (see _Scope.redact).

Only what changed is rendered again: the Renderer remembers what each template read (keys, and the
listings of prefixes) and reuses the output while those inputs are unchanged.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import resource
import select
import signal
import struct
import sys
import time
import tomllib
from collections.abc import Callable, Collection, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Literal, NoReturn

import yaml
from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2 import Template as Compiled
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.filters import (
    do_batch,
    do_center,
    do_format,
    do_indent,
    do_pprint,
    do_replace,
    do_truncate,
    do_wordwrap,
    sync_do_join,
    sync_do_slice,
    sync_do_sum,
)
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, pass_environment, pass_eval_context

from infantry import process
from infantry.errors import InfantryError, SettingsError, UnsafeDataError
from infantry.snapshot import FileEntry, Files, digest
from infantry.spool import Blob, Digest

__all__ = ["MissingKey", "Output", "RenderError", "Renderer", "Template", "TemplateSyntax"]

Missing = Literal["error", "skip", "wait"]

# An item of a list, tuple or dict counts as 8 bytes (a pointer) when a value's size is estimated, so a
# list of a million small items is as large as a string of 8 MB.
_ITEM = 8
# Integers may have up to 10,000 bits (about 3,000 digits): far more than any config needs, and cheap.
_MAX_INT_BITS = 10_000
# What a message may quote of an exception raised inside a template, and the shortest value of those the
# template read that is taken out of it (a shorter one, "up" say, would garble the message, not hide much).
_MAX_DETAIL = 200
_MIN_REDACTED = 4
# What one render may build in all, as a multiple of max_output (see _Budget).
_BUILT_PER_OUTPUT = 4
_SEQUENCES = (str, bytes, list, tuple)
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class TemplateSyntax(SettingsError):
    """A template does not compile. The message reads ``template {dest} ({src}) line {line}: {what}``."""

    def __init__(self, message: str, *, template: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.template = template
        self.line = line


class RenderError(UnsafeDataError):
    """A template failed while rendering: ``template {dest} ({src}) line {line}: {what}``.

    ``template`` is the template's destination, ``line`` the template line (None when unknown), and
    ``key`` the key involved, if any.
    """

    def __init__(self, template: Template, what: str, line: int | None = None, key: str | None = None) -> None:
        source = f"template {template.dest} ({template.src})"
        super().__init__(source if line is None else f"{source} line {line}", what)
        self.source = source
        self.what = what
        self.template = template.dest
        self.line = line
        self.key = key


class MissingKey(RenderError):
    """A template read a key the set does not hold, and its ``missing`` mode is ``error``."""


@dataclass(frozen=True)
class Template:
    """One template: its text, where it goes in the published set, and what a missing key does."""

    dest: str  # a safe relative path in the published set, e.g. "nginx/upstream.conf"
    src: str  # where the text came from (a redacted URL), for messages only
    text: bytes
    missing: Missing = "error"


@dataclass
class Output:
    """What one :meth:`Renderer.render` produced."""

    files: dict[str, bytes] = field(default_factory=dict)  # dest -> bytes, for every template rendered or reused
    skipped: dict[str, str] = field(default_factory=dict)  # dest -> why (a missing key under missing: skip)
    waiting: dict[str, str] = field(default_factory=dict)  # dest -> the missing key (missing: wait)
    rendered: list[str] = field(default_factory=list)  # dests run by this call (skipped/waiting too); others reused


class _Refused(Exception):
    """A function, filter or bound refused to go on. The render turns it into a RenderError with the line."""

    def __init__(self, what: str, key: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.key = key


class _Missing(_Refused):
    """A key the set does not hold was read."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} is missing", key)


class _TimeUp(BaseException):
    """The time allowed for one render ran out.

    A BaseException, so that no ``except Exception`` in Jinja or in a filter can swallow it.
    """


# Sizes: a value is measured, roughly as text, before an operation copies or repeats it.


def _weight(value: object, limit: int) -> int:
    """About how many bytes ``value`` takes as text; counting stops once it passes ``limit``.

    Shared references count each time (text repeats them), so a YAML alias bomb weighs what it
    would print. Stopping at the limit keeps the count cheap whatever the value.
    """
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, dict):
            total += _ITEM * 2 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += _ITEM * len(item)
            if total <= limit:
                stack.extend(item)
        else:
            total += _ITEM
    return total


class _Budget:
    """The bytes one render may build: each value at most ``limit``, all of them together ``total``.

    The total bounds what a template can hold at once: values kept alive by a deep recursion, say,
    each under the limit, would otherwise add up to any size.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = _BUILT_PER_OUTPUT * limit
        self.spent = 0

    def reset(self) -> None:
        """Start counting for a new render."""
        self.spent = 0

    def weight(self, value: object) -> int:
        """About how many bytes ``value`` takes as text (see _weight)."""
        return _weight(value, self.limit)

    def check(self, size: int, what: str) -> None:
        """Refuse a value of ``size`` bytes over the limit."""
        if size > self.limit:
            raise _Refused(f"{what} would make a value of about {size} bytes, over the limit of {self.limit}")

    def spend(self, size: int, what: str) -> None:
        """Refuse to build a value of ``size`` bytes over the limit, or past the total; count it otherwise."""
        self.check(size, what)
        self.spent += size
        if self.spent > self.total:
            raise _Refused(f"{what}: the values built by this render pass {self.total} bytes in all")


def _repeat_size(seq: object, times: object, budget: _Budget) -> int | None:
    """The size of ``seq * times`` for a string, bytes or sequence repeated, or None if it is not that."""
    if isinstance(seq, _SEQUENCES) and isinstance(times, int):
        return budget.weight(seq) * max(times, 0) if len(seq) else 0
    return None


def _check_binop(operator: str, left: Any, right: Any, budget: _Budget) -> None:
    """Refuse ``left <operator> right`` if its result would be too large, before computing it."""
    if operator == "*":
        _check_repeat(left, right, budget)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if right > 0 and abs(left) > 1 and left.bit_length() * right > _MAX_INT_BITS:
            raise _Refused(f"'**' would make an integer of more than {_MAX_INT_BITS} bits")
    elif operator == "%" and isinstance(left, str | bytes):
        _check_percent(left, right, budget)
    elif operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        budget.spend(budget.weight(left) + budget.weight(right), "'+'")


def _check_repeat(left: Any, right: Any, budget: _Budget) -> None:
    size = _repeat_size(left, right, budget)
    if size is None:
        size = _repeat_size(right, left, budget)
    if size is not None:
        budget.spend(size, "'*'")
    elif isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
        raise _Refused(f"'*' would make an integer of more than {_MAX_INT_BITS} bits")


def _check_percent(fmt: str | bytes, args: object, budget: _Budget) -> None:
    """Refuse a printf-style format whose widths, precisions or arguments would make too large a value."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    size = len(text) + budget.weight(args)
    for spec in _PERCENT_SPEC.finditer(text):
        for number in spec.group(1, 2):
            if number == "*":
                raise _Refused("a '*' width or precision in a % format is refused; write the number")
            if number:
                if len(number) > 9:
                    raise _Refused(f"a width of {len(number)} digits in a % format is refused")
                size += int(number)
    budget.spend(size, "'%' formatting")


def _width(width: object) -> int:
    """A width-like argument as a size: an int as it is, anything else (which Jinja refuses) as 0."""
    return width if isinstance(width, int) else 0


def _check_replace(s: str | bytes, old: Any, new: Any, count: Any, budget: _Budget) -> None:
    if not isinstance(old, str | bytes) or not isinstance(new, str | bytes) or len(new) <= len(old):
        return
    if not old:
        times = len(s) + 1
    elif isinstance(s, str) and isinstance(old, str):  # noqa: SIM114 (two branches, so mypy narrows each)
        times = s.count(old)
    elif isinstance(s, bytes) and isinstance(old, bytes):
        times = s.count(old)
    else:
        return  # str.replace with bytes fails by itself
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    budget.spend(len(s) + times * (len(new) - len(old)), "replace")


def _check_join(sep: str | bytes, items: list[Any], budget: _Budget) -> None:
    budget.spend(budget.weight(items) + len(sep) * len(items), "join")


def _check_method(owner: str | bytes, name: str, args: tuple[Any, ...], budget: _Budget) -> tuple[Any, ...]:
    """Refuse a call of a string method that would make too large a string; return the arguments to use."""
    if name in ("center", "ljust", "rjust", "zfill") and args:
        budget.spend(_width(args[0]), f"{name} width")
    elif name == "expandtabs":
        tabsize = args[0] if args and isinstance(args[0], int) else 8
        budget.spend(len(owner) * max(tabsize, 1), "expandtabs")
    elif name == "replace" and len(args) >= 2:
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1, budget)
    elif name == "join" and args:
        items = list(args[0])  # a generator is read once, here, and its items passed on
        _check_join(owner, items, budget)
        return (items, *args[1:])
    elif name == "translate" and args:
        table = args[0]
        parts = table.values() if isinstance(table, dict) else table if isinstance(table, list | tuple) else ()
        longest = max((len(p) for p in parts if isinstance(p, str | bytes)), default=1)
        budget.spend(len(owner) * max(longest, 1), "translate")
    return args


# The functions a template calls, bound to one render's values, recording what it read.


def _key_path(path: object) -> str:
    if not isinstance(path, str):
        raise _Refused(f"a key is a path string, not {type(path).__name__}")
    return path.lstrip("/")


def _prefix_of(prefix: object) -> str:
    """The form ``a/b/`` of a prefix given with or without slashes; the empty string for the whole set."""
    if not isinstance(prefix, str):
        raise _Refused(f"a prefix is a path string, not {type(prefix).__name__}")
    stripped = prefix.strip("/")
    return f"{stripped}/" if stripped else ""


class _Index:
    """The paths of one set, sorted once, so that the paths under a prefix are two binary searches away.

    Sorted on the first prefix query: a set whose templates only read keys is never sorted.
    """

    def __init__(self, values: Mapping[str, FileEntry]) -> None:
        self._values = values
        self._paths: list[str] | None = None

    def under(self, prefix: str) -> list[str]:
        """The sorted paths under ``prefix`` (of the form ``a/b/``, or empty for all)."""
        if self._paths is None:
            self._paths = sorted(self._values)
        if not prefix:
            return self._paths
        low = bisect.bisect_left(self._paths, prefix)
        # "0" follows "/": every path starting with "a/b/" sorts before "a/b0".
        high = bisect.bisect_left(self._paths, prefix[:-1] + "0", low)
        return self._paths[low:high]

    def names(self, prefix: str) -> list[str]:
        """The sorted names of the files and directories right under ``prefix``."""
        cut = len(prefix)
        return sorted({path[cut:].split("/", 1)[0] for path in self.under(prefix)})


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\0".join(names).encode("utf-8", "surrogatepass")).hexdigest()  # no path holds NUL


def _tree_digest(values: Mapping[str, FileEntry], paths: list[str]) -> str:
    return digest({path: values[path] for path in paths})


_REDACTED = "<a value>"
_QUOTED = re.compile(r"""(['"])(.*?)\1""")


def _forms(text: str) -> set[str]:
    """The forms in which a message may quote ``text``: as it is, escaped, and each line of it."""
    forms = {text, repr(text)[1:-1], json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}
    forms.add(text.encode("unicode_escape").decode("ascii"))
    lines = text.splitlines()
    if len(lines) > 1:
        for line in lines:
            forms.update((line, line.strip(), repr(line)[1:-1]))
    return {form for form in forms if len(form) >= _MIN_REDACTED}


class _Scope:
    """What one render of one template may read, and the record of what it read."""

    def __init__(
        self,
        values: Mapping[str, FileEntry],
        index: _Index,
        env_names: frozenset[str],
        environ: Mapping[str, str],
        source: str = "",
    ) -> None:
        self._values = values
        self._source = source  # the template's text, which a message may quote
        self._index = index
        self._env_names = env_names
        self._environ = environ
        self._data: dict[str, bytes] = {}
        self._used_env: list[str] = []
        self.reads: dict[str, FileEntry | None] = {}  # key -> its entry, or None for absent
        self.present: dict[str, bool] = {}  # key -> whether exists() found it
        self.names: dict[str, str] = {}  # prefix -> digest of the names right under it
        self.trees: dict[str, str] = {}  # prefix -> digest of the paths and entries under it

    def functions(self) -> dict[str, Callable[..., Any]]:
        """The globals a template calls."""
        return {
            "key": self.key,
            "key_or_default": self.key_or_default,
            "key_bytes": self.key_bytes,
            "exists": self.exists,
            "keys": self.keys,
            "tree": self.tree,
            "dir": self.dir,
            "env": self.env,
            "fail": self.fail,
        }

    def _read(self, path: str) -> bytes | None:
        entry = self._values.get(path)
        self.reads[path] = entry
        return None if entry is None else self._content(path, entry)

    def _content(self, path: str, entry: FileEntry) -> bytes:
        data = self._data.get(path)
        if data is None:
            data = self._data[path] = entry.data  # read from the spool once per render, however often used
        return data

    def redact(self, message: str) -> str:
        """``message`` without the values this render read nor the env() values it used, in any form.

        A message may quote the template's own text; an exception's text, or a refusal naming a key
        built from a value, may quote a value: raw, escaped by repr() or JSON, one line of it, or a
        piece of it in quotes. Each of those becomes ``<a value>``.
        """
        secrets = [data.decode("utf-8", "replace") for data in self._data.values()] + self._used_env
        forms = sorted({form for text in secrets for form in _forms(text)}, key=len, reverse=True)
        for form in forms:
            if form in message:
                message = message.replace(form, _REDACTED)

        def quoted(match: re.Match[str]) -> str:
            inner = match.group(2)
            if len(inner) < _MIN_REDACTED or inner in self._source or not any(inner in form for form in forms):
                return match.group(0)
            return f"{match.group(1)}{_REDACTED}{match.group(1)}"

        return _QUOTED.sub(quoted, message) if forms else message

    @staticmethod
    def _text(path: str, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(
                f"key {path!r} is not UTF-8 text; use key_bytes({path!r})|b64encode to carry its bytes", path
            ) from None

    def key(self, path: object) -> str:
        """The value at ``path``, as UTF-8 text."""
        name = _key_path(path)
        data = self._read(name)
        if data is None:
            raise _Missing(name)
        return self._text(name, data)

    def key_or_default(self, path: object, default: Any = "") -> Any:
        """The value at ``path`` as text, or ``default`` when the set does not hold it."""
        name = _key_path(path)
        data = self._read(name)
        return default if data is None else self._text(name, data)

    def key_bytes(self, path: object) -> bytes:
        """The value at ``path``, as bytes."""
        name = _key_path(path)
        data = self._read(name)
        if data is None:
            raise _Missing(name)
        return data

    def exists(self, path: object) -> bool:
        """Whether the set holds a file at ``path``."""
        name = _key_path(path)
        found = name in self._values
        self.present[name] = found
        return found

    def keys(self, prefix: object = "") -> list[str]:
        """The sorted names of the files and directories right under ``prefix``."""
        at = _prefix_of(prefix)
        names = self._index.names(at)
        self.names[at] = _names_digest(names)
        return names

    def _under(self, at: str) -> list[tuple[str, str]]:
        paths = self._index.under(at)
        self.trees[at] = _tree_digest(self._values, paths)
        cut = len(at)
        return [(path[cut:], self._text(path, self._content(path, self._values[path]))) for path in paths]

    def tree(self, prefix: object = "") -> list[tuple[str, str]]:
        """Every file under ``prefix``, recursively: sorted (path relative to the prefix, value) pairs."""
        return self._under(_prefix_of(prefix))

    def dir(self, prefix: object = "") -> dict[str, Any]:
        """The files under ``prefix`` as nested dicts: name -> value (text), or name -> dict for a directory."""
        top: dict[str, Any] = {}
        for relative, value in self._under(_prefix_of(prefix)):
            *parents, name = relative.split("/")
            node = top
            for parent in parents:
                node = node.setdefault(parent, {})
            node[name] = value
        return top

    def env(self, name: object) -> str:
        """The environment variable ``name``, if the settings list it in template_env."""
        if not isinstance(name, str) or name not in self._env_names:
            raise _Refused(f"env({name!r}) is not allowed: list {name!r} in template_env to use it")
        value = self._environ.get(name)
        if value is None:
            raise _Refused(f"environment variable {name!r} is not set")
        self._used_env.append(value)
        return value

    @staticmethod
    def fail(message: object = "fail() was called") -> NoReturn:
        """Stop the render with ``message``."""
        raise _Refused(str(message))


# Filters.


def _loaded(value: object, filter_name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(f"{filter_name}: the value is not UTF-8 text") from None
    if not isinstance(value, str):
        raise _Refused(f"{filter_name} takes text, not {type(value).__name__}")
    return value


# What a decoder's message may keep of a quoted part: a parser's token (<block end>), or the punctuation it
# expected (',' in "expected ',' or ']'"). Anything else quoted may be the value's text, and is dropped.
_TOKEN = re.compile(r"<[a-z ]+>")


def _problem(message: str) -> str:
    """A decoder's ``message`` reduced to what kind of problem it is, never quoting the value's text."""
    message = message.split(": ", 1)[0]

    def keep(match: re.Match[str]) -> str:
        inner = match.group(2)
        before = message[: match.start()].rstrip().lower()
        if _TOKEN.fullmatch(inner) or (
            len(inner) == 1 and not inner.isalnum() and before.endswith(("expected", "expecting", " or"))
        ):
            return match.group(0)
        return ""

    kept = " ".join(_QUOTED.sub(keep, message).split())
    return kept.removesuffix(" starting at").removesuffix(" at")


def _fromjson(value: object) -> Any:
    try:
        return json.loads(_loaded(value, "fromjson"))
    except json.JSONDecodeError as exc:
        raise _Refused(
            f"fromjson: not valid JSON at line {exc.lineno} column {exc.colno}: {_problem(exc.msg)}"
        ) from None


def _fromyaml(value: object) -> Any:
    try:
        return yaml.safe_load(_loaded(value, "fromyaml"))
    except yaml.MarkedYAMLError as exc:  # its str() quotes the document: say where, not what
        mark = exc.problem_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = _problem(exc.problem or "")
        raise _Refused(f"fromyaml: not valid YAML{where}" + (f": {problem}" if problem else "")) from None
    except yaml.YAMLError:
        raise _Refused("fromyaml: not valid YAML") from None


_TOML_WHERE = re.compile(r"\s*\((at line \d+, column \d+|at end of document)\)$")


def _fromtoml(value: object) -> Any:
    try:
        return tomllib.loads(_loaded(value, "fromtoml"))
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = _TOML_WHERE.search(message)
        where = f" {found.group(1)}" if found else ""
        raise _Refused(f"fromtoml: not valid TOML{where}: {_problem(_TOML_WHERE.sub('', message))}") from None


def _b64decode(value: object) -> str:
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes):
        raise _Refused(f"b64decode takes text or bytes, not {type(value).__name__}")
    try:
        decoded = base64.b64decode(b"".join(value.split()), validate=True)
    except binascii.Error as exc:  # its messages name a count or a kind of padding, never the content
        raise _Refused(f"b64decode: not valid base64 ({_problem(str(exc))})") from None
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("b64decode: the decoded bytes are not UTF-8 text") from None


def _b64encode(value: object) -> str:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes):
        raise _Refused(f"b64encode takes text or bytes, not {type(value).__name__}")
    return base64.b64encode(value).decode("ascii")


def _sha256(value: object) -> str:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes):
        raise _Refused(f"sha256 takes text or bytes, not {type(value).__name__}")
    return hashlib.sha256(value).hexdigest()


def _bounded_filters(budget: _Budget) -> dict[str, Callable[..., Any]]:
    """The filters infantry adds, and Jinja's growing filters with their sizes checked first."""

    def tojson(value: Any, indent: int | None = None) -> str:
        budget.spend(budget.weight(value), "tojson")
        try:
            return json.dumps(value, ensure_ascii=False, indent=indent)
        except (TypeError, ValueError) as exc:
            raise _Refused(f"tojson: {exc}") from None

    def toyaml(value: Any) -> str:
        budget.spend(budget.weight(value), "toyaml")
        try:
            return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False)
        except yaml.YAMLError:
            raise _Refused(f"toyaml: cannot write a {type(value).__name__} as YAML") from None

    def center(value: Any, width: int = 80) -> str:
        budget.spend(_width(width), "center width")
        return do_center(value, width)

    def indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
        text = str(s)
        step = len(width) if isinstance(width, str) else width
        budget.spend(len(text) + (text.count("\n") + 1) * max(step, 0), "indent")
        return do_indent(text, width, first, blank)

    @pass_environment
    def wordwrap(environment: Any, s: str, width: int = 79, *args: Any, **kwargs: Any) -> str:
        budget.check(_width(width), "wordwrap width")
        return do_wordwrap(environment, s, width, *args, **kwargs)

    @pass_environment
    def truncate(environment: Any, s: str, length: int = 255, *args: Any, **kwargs: Any) -> str:
        budget.check(_width(length), "truncate length")
        return do_truncate(environment, s, length, *args, **kwargs)

    def format_(value: Any, *args: Any, **kwargs: Any) -> str:
        _check_percent(str(value), kwargs or args, budget)
        return do_format(value, *args, **kwargs)

    @pass_eval_context
    def replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: int | None = None) -> str:
        _check_replace(str(s), str(old), str(new), count, budget)
        return do_replace(eval_ctx, s, old, new, count)

    @pass_eval_context
    def join(eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
        items = list(value)
        _check_join(str(d), items, budget)
        return sync_do_join(eval_ctx, items, d, attribute)

    @pass_environment
    def sum_(environment: Any, iterable: Iterable[Any], attribute: str | int | None = None, start: Any = 0) -> Any:
        items = list(iterable)
        if not all(isinstance(item, int | float) for item in (start, *items)):
            budget.spend(budget.weight(items) + budget.weight(start), "sum")
        return sync_do_sum(environment, items, attribute, start)

    def batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Any:
        budget.check(_width(linecount) * _ITEM, "batch size")
        return do_batch(value, linecount, fill_with)

    def slice_(value: Any, slices: int, fill_with: Any = None) -> Any:
        budget.check(_width(slices) * _ITEM, "slice count")
        return sync_do_slice(value, slices, fill_with)

    def string(value: Any) -> str:
        budget.spend(budget.weight(value), "string")
        return str(value)

    def pprint(value: Any) -> str:
        budget.spend(budget.weight(value) * 2, "pprint")
        return do_pprint(value)

    return {
        "fromjson": _fromjson,
        "fromyaml": _fromyaml,
        "fromtoml": _fromtoml,
        "b64decode": _b64decode,
        "b64encode": _b64encode,
        "sha256": _sha256,
        "tojson": tojson,
        "toyaml": toyaml,
        "center": center,
        "indent": indent,
        "wordwrap": wordwrap,
        "truncate": truncate,
        "format": format_,
        "replace": replace,
        "join": join,
        "sum": sum_,
        "batch": batch,
        "slice": slice_,
        "string": string,
        "pprint": pprint,
    }


# The sandbox.


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, with ``~`` sent through the sandbox so its result's size is checked."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802 (Jinja's name)
        self.write("environment.call_concat(context.eval_ctx, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _refuse_format(*args: Any, **kwargs: Any) -> NoReturn:
    raise _Refused("str.format and str.format_map are refused in templates; use ~ or the format filter")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every operation that can grow a value bounded by a _Budget.

    Its ``budget`` is reset at the start of each render.
    """

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, limit: int) -> None:
        super().__init__(
            undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, finalize=self._finalize
        )
        self.budget = budget = _Budget(limit)
        del self.globals["lipsum"]  # text of any size, for no config's sake

        class BoundedNamespace(Namespace):
            # {% set ns.x = ... %} in a loop is how a value grows across iterations: bound it there too.
            def __setitem__(self, name: str, value: Any) -> None:
                budget.check(budget.weight(value), "namespace assignment")  # kept, not built: not spent
                super().__setitem__(name, value)

        self.globals["namespace"] = BoundedNamespace
        self.filters.update(_bounded_filters(budget))

    def _finalize(self, value: Any) -> Any:
        # What {{ }} prints goes through str(): a list of many references to one large string is small
        # in memory but not as text, so weigh it first.
        if not isinstance(value, str):
            self.budget.spend(self.budget.weight(value), "printing")
        return value

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Compute an intercepted operator once its result is known to be small enough."""
        _check_binop(operator, left, right, self.budget)
        return super().call_binop(context, operator, left, right)

    def call_concat(self, eval_ctx: EvalContext, parts: tuple[Any, ...]) -> str:
        """``a ~ b``: join the parts as text once the result is known to be small enough."""
        self.budget.spend(self.budget.weight(parts), "'~'")
        return markup_join(parts) if eval_ctx.autoescape else str_join(parts)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Refuse ``str.format``: its widths and nested fields can build any size at C level."""
        return _refuse_format if super().wrap_str_format(value) is not None else None

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        """Call an object from the template, checking first the string methods that can grow a value."""
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str | bytes):
            args = _check_method(owner, getattr(__obj, "__name__", ""), args, __self.budget)
        return super().call(__context, __obj, *args, **kwargs)


# The time limit.


class _Clock:
    """A trace function that stops a render once its time is up.

    The global trace function sees every call (in the template and in what it calls); it returns a
    local one only for the template's own frames, which also sees every line, so a loop in the
    template is stopped between two iterations.
    """

    def __init__(self, filename: str, timeout: float) -> None:
        self._filename = filename
        self._deadline = time.monotonic() + timeout

    def trace(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        if time.monotonic() > self._deadline:
            raise _TimeUp
        return self._line if frame.f_code.co_filename == self._filename else None

    def _line(self, frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
        if event == "line" and time.monotonic() > self._deadline:
            raise _TimeUp
        return self._line


def _template_line(compiled: Compiled, tb: TracebackType | None) -> int | None:
    """The template line of the innermost frame of ``compiled`` in a traceback, if any."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == compiled.filename:
            line = compiled.get_corresponding_lineno(tb.tb_lineno)
        tb = tb.tb_next
    return line


def _shortened(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


# What the Renderer remembers of each template.


def _held(entry: bytes | FileEntry | None) -> bytes | FileEntry | None:
    """``entry`` as a memo keeps it: spooled content by its digest, so the memo keeps no spool file alive.

    A Digest compares equal to a Blob of the same content, so the memo still tells whether it changed.
    """
    if isinstance(entry, FileEntry) and isinstance(entry.content, Blob):
        return FileEntry(Digest(entry.content.size, entry.content.sha), entry.executable)
    return entry


def _lookup(values: Mapping[str, FileEntry]) -> Callable[[str], bytes | FileEntry | None]:
    """How the memo looks a path up: in a snapshot's Files, the item as kept (a small file's bytes are
    the same object for as long as it is unchanged, so most comparisons are by identity), else the entry.
    """
    return values.stored if isinstance(values, Files) else values.get


@dataclass
class _Memo:
    """One template's last render: its inputs (to tell whether it must render again) and its outcome."""

    text: bytes
    missing: Missing
    read_paths: list[str]
    read_entries: list[bytes | FileEntry | None]  # each path's item when read (see _lookup), None for absent
    present: dict[str, bool]
    names: dict[str, str]
    trees: dict[str, str]
    outcome: Literal["file", "skip", "wait"]
    data: bytes = b""
    why: str = ""

    def still_valid(self, values: Mapping[str, FileEntry], index: _Index) -> bool:
        """Whether every input the template read is the same in ``values``."""
        get = _lookup(values)
        # One comprehension and one list comparison: equal entries are most often the same object.
        if [get(path) for path in self.read_paths] != self.read_entries:
            return False
        for path, found in self.present.items():
            if (path in values) != found:
                return False
        for prefix, names in self.names.items():
            if _names_digest(index.names(prefix)) != names:
                return False
        return all(_tree_digest(values, index.under(prefix)) == tree for prefix, tree in self.trees.items())


# What a render in a child process sends back, one frame per template: a length, then a pickle of
# ("file" | "skip" | "wait", data, why, read_paths, present, names, trees) or ("error", kind, what, line, key).
_LENGTH = struct.Struct("!Q")
_MiB = 1024 * 1024
# The parent waits this much longer than the render timeout for a frame: the child's own clock gives the
# cleaner message (and the line), the parent's only catches what the clock cannot stop (one long C call).
_GRACE = 1.0
_OUTCOMES: dict[str, Literal["file", "skip", "wait"]] = {"file": "file", "skip": "skip", "wait": "wait"}
_Result = tuple[str, bytes, str, list[str], dict[str, bool], dict[str, str], dict[str, str]]


class _PlainUnpickler(pickle.Unpickler):
    """Reads a child's frame: plain data only (tuples, lists, dicts, str, bytes, numbers), never a class."""

    def find_class(self, module: str, name: str) -> NoReturn:
        raise pickle.UnpicklingError("a render frame holds plain data only")


def _virtual_size() -> int:
    """This process's virtual memory size in bytes (VmSize), which RLIMIT_AS bounds."""
    with open("/proc/self/statm", "rb") as statm:  # cheaper to read than /proc/self/status
        return int(statm.read().split()[0]) * resource.getpagesize()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Renderer:
    """Renders templates over a set of values, again only those whose inputs changed.

    Each :meth:`render` that has something to render forks one child process, which renders those
    templates within hard limits (a memory budget, and a kill once its time is up) and sends back
    what each produced and read; the parent only decides what to render and keeps the results. So no
    template can hold the caller's memory or its GIL, whatever C call it makes.

    Not safe to call concurrently: one render at a time. It keeps no reference to a set once a render
    returns, so the spool files of a set's values go when the set does.
    """

    def __init__(
        self,
        *,
        env_names: Collection[str] = (),
        environ: Mapping[str, str] | None = None,
        max_output: int = 8 * 1024 * 1024,
        timeout: float = 5.0,
        memory: int | None = None,
        isolate: bool = True,
    ) -> None:
        """``memory`` is what a render's child may allocate beyond what it inherits (by default the larger
        of 256 MiB and 8 x ``max_output``); ``isolate=False`` renders in this process, without that bound
        nor the kill (for comparisons only).
        """
        self._env_names = frozenset(env_names)
        if environ is None:
            environ = os.environ
        # Only the listed names are kept, once: a template sees nothing else of the environment.
        self._environ = {name: environ[name] for name in self._env_names if name in environ}
        self._max_output = max_output
        self._timeout = timeout
        self._memory = max(256 * _MiB, 8 * max_output) if memory is None else memory
        self._isolate = isolate
        self._env = _Sandbox(max_output)
        self._compiled: dict[bytes, Compiled] = {}
        self._memos: dict[str, _Memo] = {}

    def check(self, template: Template) -> None:
        """Compile ``template`` now, or raise TemplateSyntax naming its line."""
        self._compile(template)

    def _compile(self, template: Template) -> Compiled:
        compiled = self._compiled.get(template.text)
        if compiled is not None:
            return compiled
        where = f"template {template.dest} ({template.src})"
        try:
            source = template.text.decode("utf-8")
        except UnicodeDecodeError:
            raise TemplateSyntax(f"{where}: the template is not UTF-8 text", template=template.dest) from None
        filename = f"<template {template.dest}>"
        try:
            tree = self._env.parse(source, name=template.dest, filename=filename)
            for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
                tag = _ONE_FILE_TAGS[type(node)]
                raise TemplateSyntax(
                    f"{where} line {node.lineno}: templates are one file each; {{% {tag} %}} is not available",
                    template=template.dest,
                    line=node.lineno,
                )
            code = self._env.compile(tree, name=template.dest, filename=filename)
        except TemplateSyntaxError as exc:
            raise TemplateSyntax(
                f"{where} line {exc.lineno}: {exc.message}", template=template.dest, line=exc.lineno
            ) from None
        except (RecursionError, SyntaxError):  # Jinja's parser, or Python's compiler, met too deep a nesting
            raise TemplateSyntax(f"{where}: the template nests too deeply", template=template.dest) from None
        compiled = self._env.template_class.from_code(self._env, code, self._env.make_globals(None))
        self._compiled[template.text] = compiled
        return compiled

    def render(self, values: Mapping[str, FileEntry], templates: Sequence[Template]) -> Output:
        """Render ``templates`` over ``values``, reusing the output of each whose inputs did not change.

        Raises RenderError for the first template that fails (a missing key fails only templates
        whose mode is ``error``), and TemplateSyntax for one that does not compile.
        """
        # (1) Which templates must render: those new, changed, or whose inputs changed. Each is compiled
        #     here, so a syntax error is raised before anything renders, and a child inherits the code.
        index = _Index(values)  # one per call: every prefix query of every template shares it
        todo: list[Template] = []
        dests: set[str] = set()
        for template in templates:
            if template.dest in dests:
                raise SettingsError(f"two templates write {template.dest}")
            dests.add(template.dest)
            memo = self._memos.get(template.dest)
            if (
                memo is None
                or memo.text != template.text
                or memo.missing != template.missing
                or not memo.still_valid(values, index)
            ):
                self._compile(template)
                todo.append(template)
        # (2) Render them, in a child unless told not to; each result is kept as it comes, even if a
        #     later template fails.
        if todo:
            if self._isolate:
                self._render_in_child(todo, values, index)
            else:
                for template in todo:
                    self._keep(template, values, self._render_one(template, values, index))
        # (3) The output, in the templates' order; forget templates that are gone, and compiled texts no
        #     template uses any more.
        output = Output(rendered=[template.dest for template in todo])
        memos: dict[str, _Memo] = {}
        for template in templates:
            memo = memos[template.dest] = self._memos[template.dest]
            if memo.outcome == "file":
                output.files[template.dest] = memo.data
            elif memo.outcome == "skip":
                output.skipped[template.dest] = memo.why
            else:
                output.waiting[template.dest] = memo.why
        self._memos = memos
        texts = {template.text for template in templates}
        self._compiled = {text: compiled for text, compiled in self._compiled.items() if text in texts}
        return output

    def _keep(self, template: Template, values: Mapping[str, FileEntry], result: _Result) -> None:
        """Remember one template's render; the entries it read are looked up here, in the same values."""
        outcome, data, why, read_paths, present, names, trees = result
        get = _lookup(values)
        entries = [_held(get(path)) for path in read_paths]
        self._memos[template.dest] = _Memo(
            template.text, template.missing, read_paths, entries, present, names, trees, _OUTCOMES[outcome], data, why
        )

    def _render_in_child(self, todo: list[Template], values: Mapping[str, FileEntry], index: _Index) -> None:
        """Render ``todo`` in a forked child, keeping each result as its frame arrives.

        (1) fork; the child renders each template in turn and writes one frame after each (see _child);
        (2) the parent reads each frame within the render timeout and a grace second, the GIL released
            while it waits;
        (3) a frame that is late, or a child that ends early, fails the template it was on;
        (4) whatever happens, even an interrupt of the parent, the child is killed and reaped.
        """
        read_fd, write_fd = os.pipe()
        try:
            pid = process.fork_owned()  # owned: a PID 1 reaper leaves it to this wait
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:  # pragma: no cover (the child's coverage is not collected: it never returns)
            self._child(todo, values, index, read_fd, write_fd)
        os.close(write_fd)
        reaped = False
        try:
            pending = bytearray()
            for template in todo:
                frame = self._next_frame(read_fd, pending, template)
                if frame is None:  # the child ended before sending it
                    reaped = True
                    raise RenderError(template, self._ended(pid))
                self._take(template, values, frame)
        finally:
            os.close(read_fd)
            if not reaped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            process.release(pid)

    def _next_frame(self, fd: int, pending: bytearray, template: Template) -> bytes | None:
        """The next frame from the child, None at the end of the pipe; RenderError once the time is up."""
        deadline = time.monotonic() + self._timeout + _GRACE
        limit = self._memory + 2 * self._max_output
        while True:
            if len(pending) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(pending)
                if length > limit:
                    raise RenderError(template, f"the render sent a result of {length} bytes, over {limit}")
                end = _LENGTH.size + length
                if len(pending) >= end:
                    frame = bytes(pending[_LENGTH.size : end])
                    del pending[:end]
                    return frame
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RenderError(template, f"took longer than {self._timeout:g}s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            pending += chunk

    def _ended(self, pid: int) -> str:
        """Why the child ended without a result, from its status; it is reaped."""
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return "the render ended without a result"
        if os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            if number in (signal.SIGKILL, signal.SIGSEGV):
                return f"the render ended by signal {number} (over the memory budget of {self._memory // _MiB} MiB?)"
            return f"the render ended by signal {number}"
        return f"the render ended without a result (exit status {os.waitstatus_to_exitcode(status)})"

    def _take(self, template: Template, values: Mapping[str, FileEntry], frame: bytes) -> None:
        """Keep the result in one frame, or raise the error it holds."""
        try:
            body = _PlainUnpickler(io.BytesIO(frame)).load()
            if body[0] == "error":
                _, kind, what, line, key = body
                error = MissingKey if kind == "missing" else RenderError
                failure = error(template, str(what), line if isinstance(line, int) else None, key)
            else:
                self._keep(template, values, body)
                return
        except (pickle.UnpicklingError, EOFError, TypeError, ValueError, IndexError, KeyError, AttributeError):
            raise RenderError(template, "the render sent a result that cannot be read") from None
        raise failure

    def _child(
        self, todo: list[Template], values: Mapping[str, FileEntry], index: _Index, read_fd: int, write_fd: int
    ) -> NoReturn:
        """The forked child: render ``todo`` within the memory budget, one frame each, then exit.

        It never returns, logs, or runs exit handlers: whatever it holds belongs to the parent (a spool
        file, say), and os._exit() leaves it all as it is.
        """
        code = 70
        try:
            os.close(read_fd)
            self._limit_child()
            for template in todo:
                try:
                    result: tuple[Any, ...] = self._render_one(template, values, index)
                except RenderError as exc:
                    kind = "missing" if isinstance(exc, MissingKey) else "render"
                    result = ("error", kind, exc.what, exc.line, exc.key)
                except MemoryError:  # past the budget outside a template's own frames (in a frame's pickle)
                    result = ("error", "render", self._out_of_memory(), None, None)
                frame = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
                _write_all(write_fd, _LENGTH.pack(len(frame)) + frame)
                if result[0] == "error":
                    break
            code = 0
        finally:
            os._exit(code)

    def _limit_child(self) -> None:
        """Bound the child: its address space, the kernel's choice of what to kill, and the signals it takes."""
        # A signal meant for the parent's loop must not reach it through the wakeup fd both share.
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
        # If the pod's memory runs out anyway, the kernel kills the child, not the agent.
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as adj:
            adj.write("1000")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _virtual_size() + self._memory
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        if soft == resource.RLIM_INFINITY or limit < soft:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    def _out_of_memory(self) -> str:
        if self._isolate:
            return f"used more than {self._memory // _MiB} MiB"
        return "ran out of memory"

    def _render_one(self, template: Template, values: Mapping[str, FileEntry], index: _Index) -> _Result:
        """Render one template, within its time and size limits, recording what it read.

        Every message is redacted (see _Scope.redact): none quotes a value the template read.
        """
        compiled = self._compile(template)
        scope = _Scope(values, index, self._env_names, self._environ, template.text.decode("utf-8"))
        chunks: list[bytes] = []
        size = 0
        context = compiled.new_context(scope.functions())
        stream: Generator[str, None, None] = compiled.root_render_func(context)  # type: ignore[assignment]
        self._env.budget.reset()
        clock = _Clock(compiled.filename or "", self._timeout)
        previous = sys.gettrace()  # coverage or a debugger may have one: put it back after
        sys.settrace(clock.trace)
        try:
            # (Template.generate() would rewrite the traceback, losing the frames the line comes from.)
            for chunk in stream:
                data = chunk.encode("utf-8")
                size += len(data)
                if size > self._max_output:
                    line = self._suspended_line(compiled, stream)
                    raise RenderError(template, f"output passes {self._max_output} bytes", line)
                chunks.append(data)
        except _TimeUp:
            # No line: the clock fires wherever the loop happens to be, and one template and input must
            # fail with one message, counted once.
            raise RenderError(template, f"took longer than {self._timeout:g}s") from None
        except _Missing as exc:
            what, key = scope.redact(exc.what), scope.redact(exc.key or "")
            if template.missing == "error":
                line = _template_line(compiled, exc.__traceback__)
                raise MissingKey(template, what, line, key) from None
            outcome: Literal["skip", "wait"] = template.missing
            return self._result(scope, outcome, why=what if outcome == "skip" else key)
        except _Refused as exc:
            named = None if exc.key is None else scope.redact(exc.key)
            line = _template_line(compiled, exc.__traceback__)
            raise RenderError(template, _shortened(scope.redact(exc.what)), line, named) from None
        except MemoryError as exc:
            line = _template_line(compiled, exc.__traceback__)
            raise RenderError(template, self._out_of_memory(), line) from None
        except UnicodeEncodeError:
            raise RenderError(template, "the output is not valid UTF-8 text") from None
        except RenderError:
            raise  # the output cap, above
        except InfantryError as exc:
            if self._isolate:  # its class cannot cross to the parent: its (redacted) message does
                raise RenderError(template, _shortened(scope.redact(str(exc)))) from None
            raise  # the spool lost a value, say: not the template's fault, and its handling is the caller's
        except Exception as exc:  # the template is user code: any failure of it is a render error
            # Not chained: the exception's own text may quote a value, and a logged chain would show it.
            detail = _shortened(scope.redact(f"{type(exc).__name__}: {exc}"))
            raise RenderError(template, detail, _template_line(compiled, exc.__traceback__)) from None
        finally:
            sys.settrace(previous)
            stream.close()
        return self._result(scope, "file", data=b"".join(chunks))

    @staticmethod
    def _suspended_line(compiled: Compiled, stream: Any) -> int | None:
        frame = getattr(stream, "gi_frame", None)
        return compiled.get_corresponding_lineno(frame.f_lineno) if frame is not None else None

    @staticmethod
    def _result(
        scope: _Scope, outcome: Literal["file", "skip", "wait"], *, data: bytes = b"", why: str = ""
    ) -> _Result:
        return (outcome, data, why, list(scope.reads), scope.present, scope.names, scope.trees)


_ONE_FILE_TAGS: dict[type[nodes.Node], str] = {
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from ... import",
    nodes.Extends: "extends",
}
