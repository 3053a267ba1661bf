"""Every setting infantry has, in one model, and the only code that reads the environment.

Precedence is flag, then ``INFANTRY_*`` variable, then the ``--config`` YAML file, then the default.
The README's settings table is generated from this model by ``settings_table()``.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import math
import os
import re
import shlex
import shutil
import signal as signal_module
import stat
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from infantry import __version__
from infantry.errors import SettingsError
from infantry.snapshot import Limits, check_path

ENV_PREFIX = "INFANTRY_"
SCHEMES = ("file", "http", "https", "etcd", "etcds", "git+https", "git+http", "git+ssh", "git+git", "git+file")
MAX_SECONDS = 366 * 24 * 3600.0
"""The longest duration any setting takes: a year. Larger values only overflow timers."""
MAX_CONFIG_BYTES = 1 << 20
"""The largest ``--config`` file read; a settings file is a few kilobytes."""


def redact_url(url: str) -> str:
    """The URL without password, query string or fragment, safe to put in a message.

    A URL that does not parse, or with an ``@`` after its host (a password holding ``/``, ``?`` or
    ``#``, not percent-encoded), is cut to its scheme, so no part of a secret is repeated.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or url.count("@") > parts.netloc.count("@") or not parts.scheme.isascii():
        scheme = url.partition(":")[0]
        return f"{scheme[:20] if scheme.isascii() and scheme.replace('+', '').isalnum() else '?'}://…"
    netloc = parts.netloc
    # A port that is not a number may be the start of a password cut at an unencoded "#", "?" or "/"
    # (``user:pa#ss@host``): the URL is cut to its scheme.
    for host in netloc.rpartition("@")[2].split(","):  # etcd URLs name several hosts
        port = host.rpartition("]")[2].partition(":")[2]
        if port and not (port.isascii() and port.isdigit()):
            return f"{parts.scheme[:20]}://…"
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if "%" in user or (not colon and "ssh" not in parts.scheme):
            # A name alone before "@" is how a token is often given (https://TOKEN@host), and an encoded
            # one may hide a password (user%3Apass): only ssh's user name is shown as it is.
            user = "***"
        netloc = f"{user}:***@{host}" if colon else f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


@dataclass(frozen=True)
class Wait:
    """The debounce window: publish once changes have been quiet for ``min`` s, or ``max`` s after the first."""

    min: float
    max: float

    @classmethod
    def parse(cls, text: str) -> Wait:
        """Parse ``MIN[:MAX]`` in seconds. Without MAX it is four times MIN, as in consul-template."""
        low, _, high = text.partition(":")
        try:
            lo = float(low)
            hi = float(high) if high else lo * 4
        except ValueError:
            raise ValueError(f"expected MIN[:MAX] in seconds, like 2:10, got {text!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or hi > MAX_SECONDS:
            raise ValueError(f"expected seconds up to {MAX_SECONDS:g}, like 2:10, got {text!r}")
        if lo < 0 or hi < lo:
            raise ValueError(f"expected 0 <= MIN <= MAX, like 2:10, got {text!r}")
        return cls(lo, hi)


Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
"""A duration setting: more than zero, at most a year."""


def _split_words(value: Any) -> Any:
    """A list in an environment variable is separated by whitespace or newlines."""
    return value.split() if isinstance(value, str) else value


def source_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a source, with a hint, or None when it can; never quotes a secret."""
    if not url.isprintable():
        return "the URL holds a control character"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the host cannot be read; expected SCHEME://HOST[:PORT]/path"
    scheme = parts.scheme
    if scheme not in SCHEMES:
        shown = scheme[:20] if scheme.isascii() else "?"
        return f"unsupported scheme {shown!r}; supported: {', '.join(SCHEMES)}"
    if scheme in ("etcd", "etcds"):
        try:
            etcd_endpoints(url)
        except ValueError as exc:
            return str(exc)
        return None
    try:
        parts.port  # noqa: B018  (reading it checks it)
    except ValueError:
        return (
            "the port cannot be read; expected SCHEME://HOST:PORT/path with a port up to 65535 (a password "
            "in the URL holding '#', '?' or '/' must be percent-encoded: %23, %3F, %2F)"
        )
    if scheme in ("file", "git+file"):
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return f"expected {scheme}:///absolute/path"
    elif not parts.hostname:
        return f"no host; expected {scheme}://HOST/..."
    return None


_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")


def _etcd_endpoint(text: str, scheme: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) as (host as written in a URL, port); ValueError saying what is wrong."""
    example = f"like {scheme}://h1:2379,h2:2379,h3:2379/prefix/"
    if not text:
        raise ValueError(f"an empty endpoint in the list; {example}")
    if text.startswith("["):
        host, bracket, rest = text.partition("]")
        host += bracket
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{text[:80]!r} is not an IPv6 address in brackets, like [::1]:2379") from None
        port_text = rest.removeprefix(":") if rest.startswith(":") else None
    else:
        host, colon, port_text_or_host = text.rpartition(":")
        if not colon:
            host, port_text = text, None
        else:
            port_text = port_text_or_host
        if ":" in host:
            raise ValueError(f"{text[:80]!r}: put an IPv6 address in brackets, like [::1]:2379")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"{text[:80]!r} is not HOST:PORT; {example}")
    if not port_text:
        raise ValueError(f"no port for {host[:80]!r}; expected HOST:PORT for every endpoint (etcd listens on 2379)")
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"the port of {host[:80]!r} is not a number from 1 to 65535")
    return host, int(port_text)


def etcd_endpoints(url: str, extra: Sequence[str] = ()) -> list[tuple[str, int]]:
    """The members an ``etcd://`` or ``etcds://`` source may talk to, in the order they are tried.

    Those in the URL (``etcd://h1:2379,h2:2379/prefix/``) come first, then ``extra`` (the source's
    ``endpoints:`` list), each ``HOST:PORT`` or ``SCHEME://HOST:PORT`` with the URL's own TLS choice.
    Every endpoint needs a port; the same one twice, or an endpoint with another scheme, is refused.
    Raises ValueError saying what is wrong, never quoting the URL's credentials.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if "@" in parts.netloc:
        # etcd takes no credentials in its URL: they would go unused, and every request be anonymous.
        raise ValueError(
            "an etcd URL takes no user name or password; give them as --username and --password-file "
            "(username: and password_file: in a config file)"
        )
    hosts = parts.netloc.rpartition("@")[2]
    if hosts.endswith(":") and parts.path.startswith("//"):  # etcd://h1:2379,etcds://h2:2379/prefix/
        raise ValueError(f"give the scheme once, before every endpoint: like {scheme}://h1:2379,h2:2379/prefix/")
    texts = hosts.split(",") if hosts else []
    tls = scheme == "etcds"
    for item in extra:
        given, sep, address = item.rpartition("://")
        if sep:
            if given not in ("etcd", "etcds", "http", "https"):
                raise ValueError(f"endpoint {redact_url(item)!r}: expected HOST:PORT, or {scheme}://HOST:PORT")
            if (given in ("etcds", "https")) != tls:
                raise ValueError(
                    f"endpoint {redact_url(item)!r} and source {scheme}:// mix TLS and plain HTTP; "
                    "every member of a cluster is reached the same way"
                )
        if "/" in address or "@" in address:
            raise ValueError(f"endpoint {redact_url(item)!r}: expected HOST:PORT, with no path or credentials")
        texts.append(address)
    if not texts:
        raise ValueError(f"no host; expected {scheme}://HOST:PORT/prefix/ (etcd listens on 2379)")
    endpoints: list[tuple[str, int]] = []
    for text in texts:
        host, port = _etcd_endpoint(text, scheme)
        if (host.lower(), port) in ((h.lower(), p) for h, p in endpoints):
            raise ValueError(f"endpoint {host}:{port} is given twice")
        endpoints.append((host, port))
    return endpoints


def _hostless_etcd(url: str) -> bool:
    """True for an etcd URL that names no member, like ``etcd:///prefix/``."""
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        return parts.scheme in ("etcd", "etcds") and not parts.netloc.rpartition("@")[2] and url.isprintable()
    return False


def git_ref_problem(ref: str) -> str | None:
    """Why ``ref`` cannot name a branch, tag or commit, or None (git's own rules, a little stricter)."""
    if not ref or len(ref) > 255:
        return "expected a branch, tag or commit of 1 to 255 characters"
    if ref.startswith(("-", "/", ".")) or ref.endswith(("/", ".", ".lock")):
        return "a ref cannot start with '-', '/' or '.', nor end with '/', '.' or '.lock'"
    if ".." in ref or "//" in ref or "@{" in ref or "/." in ref:
        return "a ref cannot hold '..', '//', '/.' or '@{'"
    if not re.fullmatch(r"[A-Za-z0-9._/+@-]+", ref):
        return "a ref holds only letters, digits and . _ / + @ -"
    return None


def git_fragment(url: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The settings in a git URL's fragment (``#ref=main&path=conf&depth=1``), and the URL without it.

    A setting given both there and in ``given`` (the config file's entry) is refused: which one wins
    would be a guess.
    """
    base, sep, fragment = url.partition("#")
    if not sep:
        return {}
    out: dict[str, Any] = {"url": base}
    for item in fragment.split("&"):
        if not item:
            continue
        key, eq, text = item.partition("=")
        if not eq or key not in ("ref", "path", "depth"):
            raise ValueError(f"{redact_url(url)}: the fragment takes ref=, path= and depth=, joined by '&'")
        if given.get(key) is not None or key in out:
            raise ValueError(f"{redact_url(url)}: {key} is given twice (in the URL's fragment and elsewhere)")
        out[key] = unquote(text)
    return out


def _source_url(url: str) -> str:
    """``url``, if it can be read as a source (a template's too); else why not, never quoting a secret."""
    problem = source_url_problem(url)
    if problem is not None:
        raise ValueError(f"{redact_url(url)}: {problem}")
    return url


class SourceSpec(BaseModel):
    """One source: a URL, where its files go in the destination, and how to authenticate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="The source URL: file://, http(s)://, etcd(s):// or git+https|ssh|file://.")
    dir: str = Field("", description="Sub-directory of the destination for this source's files.")
    name: str | None = Field(None, description="File name for a single HTTP document (default: last URL segment).")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP request headers.")
    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    # git: the branch, tag or commit (default: the remote's HEAD), the sub-directory published, commits fetched.
    ref: str | None = None
    path: str | None = None
    depth: Annotated[int | None, Field(ge=1, le=1000)] = None
    ssh_key_file: Path | None = None
    ssh_known_hosts: Path | None = None
    endpoints: list[str] = Field(
        default_factory=list,
        description="etcd: more members of the cluster, as HOST:PORT, tried in order after those in the URL.",
    )

    @field_validator("headers")
    @classmethod
    def _header_values(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            _check_header(name, text)
        return value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if _hostless_etcd(url):
            return url  # the members may all be in `endpoints`: checked with them, below
        return _source_url(url)

    @model_validator(mode="before")
    @classmethod
    def _git_fragment(cls, value: Any) -> Any:
        """Read ``#ref=main&path=conf&depth=1`` off a git URL into the source's own settings."""
        if isinstance(value, dict) and isinstance(value.get("url"), str) and value["url"].startswith("git+"):
            return {**value, **git_fragment(value["url"], value)}
        return value

    @model_validator(mode="after")
    def _git_only(self) -> SourceSpec:
        git = self.scheme.startswith("git+")
        for name in ("ref", "path", "depth"):
            if getattr(self, name) is not None and not git:
                raise ValueError(f"{name}: only a git+ source has a {name}")
        if self.ref is not None:
            problem = git_ref_problem(self.ref)
            if problem is not None:
                raise ValueError(f"ref: {problem}")
        if self.path is not None:
            reason = check_path(self.path.strip("/")) if self.path.strip("/") else None
            if reason is not None:
                raise ValueError(f"path: unsafe path {self.path[:80]!r}: {reason}")
        return self

    @model_validator(mode="after")
    def _etcd_members(self) -> SourceSpec:
        if self.endpoints and self.scheme not in ("etcd", "etcds"):
            raise ValueError("endpoints: only an etcd:// or etcds:// source has several members")
        if self.scheme in ("etcd", "etcds"):
            try:
                etcd_endpoints(self.url, self.endpoints)
            except ValueError as exc:
                raise ValueError(f"{redact_url(self.url)}: {exc}") from None
        return self

    @field_validator("dir")
    @classmethod
    def _safe_dir(cls, value: str) -> str:
        value = value.strip("/")
        if value:
            reason = check_path(value)
            if reason is not None:
                raise ValueError(f"unsafe dir {value!r}: {reason}")
        return value

    @property
    def scheme(self) -> str:
        """The URL scheme, which chooses the backend."""
        return urlsplit(self.url).scheme


def _octal_mode(value: Any) -> Any:
    """A mode given as an octal string ("0644"), as an int."""
    if not isinstance(value, str):
        return value
    digits = value.strip().lower().removeprefix("0o")
    if not digits or not digits.isascii() or not digits.isdigit() or not set(digits) <= set("01234567"):
        raise ValueError(f"expected an octal mode (digits 0 to 7) like 0644, got {value[:20]!r}")
    return int(digits, 8)


def _readable_mode(value: int) -> int:
    if not 0 <= value <= 0o777 or not value & 0o400:
        raise ValueError(f"expected an octal mode readable by its owner, like 0644, got {value:o}")
    return value


class TemplateSpec(BaseModel):
    """One template: where its text is read from, and where the rendered file goes in the set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    src: str = Field(description="The template's URL (file://, http(s)://, etcd(s)://), read like a source.")
    dest: str = Field(description="Path of the rendered file in the published set.")
    mode: int | None = Field(None, description="Octal mode of the rendered file (default: --file-mode).")
    missing: Literal["error", "skip", "wait"] = Field(
        "error", description="A missing key: `error` refuses the set, `skip` leaves this file out, `wait` waits."
    )

    @field_validator("src")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        return _source_url(url)

    @field_validator("dest")
    @classmethod
    def _safe_dest(cls, value: str) -> str:
        value = value.strip("/")
        reason = check_path(value)
        if reason is not None:
            raise ValueError(f"unsafe dest {value!r}: {reason}")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        return _octal_mode(value)

    @field_validator("mode")
    @classmethod
    def _mode_range(cls, value: int | None) -> int | None:
        return None if value is None else _readable_mode(value)

    @classmethod
    def parse(cls, text: str) -> TemplateSpec:
        """``SRC:DEST`` as given to ``--template``: a URL (or an absolute path) and a path in the set."""
        src, sep, dest = text.rpartition(":")
        # Without a DEST, the split falls inside the URL: after its scheme ("file" and "///…"), or
        # within its authority, before a port ("http://host" and "8080/…"): the URL has no path yet.
        scheme_end = src.find("://")
        in_authority = scheme_end != -1 and "/" not in src[scheme_end + 3 :]
        if not sep or not src or not dest or dest.startswith("/") or in_authority:
            raise ValueError(
                f"expected SRC:DEST, like file:///etc/infantry/app.conf.j2:app.conf, got {redact_url(text)[:80]!r}"
            )
        if dest != dest.strip():
            raise ValueError(f"DEST {dest!r} begins or ends with white space; give the name without it")
        if src.startswith("/"):
            src = Path(src).as_uri()
        return cls(src=src, dest=dest, mode=None, missing="error")


class Settings(BaseSettings):
    """infantry's settings. Field names are the option names with ``-`` as ``_``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    source: Annotated[list[SourceSpec], NoDecode] = Field(
        default_factory=list, description="Source URL; repeat for several sources."
    )
    dest: Path = Field(Path("/configs"), description="Destination directory (the shared emptyDir).")
    template: Annotated[list[TemplateSpec], NoDecode] = Field(
        default_factory=list,
        description="A template to render over the store's values, as SRC:DEST (URL:path in the set); repeat "
        "for several. In the config file, `templates:` with src, dest, mode and missing.",
    )
    raw: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Which fetched values are also published as files: `all`, `none`, or path prefixes "
        "(default: `all` without templates, `none` with them).",
    )
    template_env: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Environment variables templates may read with env(NAME); no others."
    )
    render_timeout: Seconds = Field(5.0, description="Seconds one template's render may take.")
    config: Path | None = Field(None, description="YAML file holding any of these settings, and per-source options.")
    layout: Literal["kubelet", "direct"] = Field(
        "kubelet", description="`kubelet`: `..data` symlink swap; `direct`: plain files, atomic per file only."
    )
    file_mode: int = Field(0o644, description="Mode of published files, in octal.")
    max_file_size: ByteSize = Field(ByteSize(Limits.max_file_size), description="Largest single file accepted.")
    max_total_size: ByteSize = Field(ByteSize(Limits.max_total_size), description="Largest total set accepted.")
    max_files: int = Field(Limits.max_files, gt=0, description="Most files accepted in one set.")
    check: str | None = Field(
        None, description="Command run on the staged set before it goes live; the staged path is appended."
    )
    check_timeout: Seconds = Field(30.0, description="Seconds the check command may take.")
    timeout: Seconds = Field(60.0, description="`install`: seconds to keep trying the source before giving up.")
    fallback: Path | None = Field(None, description="`install`: directory published when the source stays unreachable.")
    interval: Seconds = Field(10.0, description="Seconds between polls (HTTP) or resyncs (file).")
    wait: Annotated[Wait, NoDecode] = Field(
        Wait(0.0, 0.0), description="Debounce `MIN[:MAX]` seconds before publishing a change."
    )
    publish_timeout: Seconds = Field(
        60.0, description="Seconds writing a set into the destination may take (the check has its own)."
    )
    request_timeout: Seconds = Field(
        30.0, description="HTTP and etcd: seconds one whole request may take, body included."
    )
    watch_timeout: Seconds = Field(
        660.0,
        description="etcd: a watch stream silent this long is broken and reopened "
        "(keep it above etcd's progress-notify interval, 10 minutes by default).",
    )
    stale_after: Seconds | None = Field(
        None,
        description="`/healthz` fails once a source has not answered, or the destination has not matched "
        "the store, for this many seconds (default: 3 intervals, at least 30, and above the wait's MAX).",
    )
    signal: str = Field("HUP", description="Signal sent to the app on reload.")
    process: str | None = Field(None, description="Signal every process with this executable name or argv[0].")
    pid_file: Path | None = Field(None, description="Signal the process whose PID is in this file.")
    reload_url: str | None = Field(None, description="URL called on reload; a 2xx answer is expected.")
    reload_method: str = Field("POST", description="HTTP method for `reload-url`.")
    reload_timeout: Seconds = Field(10.0, description="Seconds allowed for the reload call, retries included.")
    verify_url: str | None = Field(
        None, description="After a reload, GET this URL until it answers 2xx; if it never does, roll back."
    )
    verify_cmd: str | None = Field(
        None, description="After a reload, run this command until it exits 0; if it never does, roll back."
    )
    verify_timeout: Seconds = Field(10.0, description="Seconds the app has to pass verification after a reload.")
    exec: str | None = Field(None, description="Command run on reload (no shell).")
    exec_timeout: Seconds = Field(30.0, description="Seconds the reload command may take.")
    listen: str | None = Field(
        None, description="`HOST:PORT` serving `/healthz`, `/readyz`, `/configured`, `/status` and `/metrics`."
    )
    header: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra HTTP header `Name: value` for every source; repeatable."
    )
    bearer_token_file: Path | None = Field(None, description="File holding a bearer token, re-read on each request.")
    username: str | None = Field(None, description="User name for HTTP basic auth.")
    password_file: Path | None = Field(None, description="File holding the basic-auth password.")
    ca_file: Path | None = Field(None, description="CA bundle used to verify HTTPS sources.")
    client_cert: Path | None = Field(None, description="Client certificate (PEM) for HTTPS sources.")
    client_key: Path | None = Field(None, description="Key of the client certificate (PEM).")
    ssh_key_file: Path | None = Field(None, description="Private key for `git+ssh://` sources.")
    ssh_known_hosts: Path | None = Field(
        None, description="known_hosts file holding the host keys of `git+ssh://` servers; required for them."
    )
    file: str = Field("-", description="`inject`: the YAML to read; `-` is standard input.")
    image: str = Field(f"infantry:{__version__}", description="`inject`/`webhook`: the infantry image to inject.")
    mount_path: str = Field("/configs", description="`inject`/`webhook`: where the shared volume is mounted.")
    containers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="`inject`/`webhook`: app containers that get the mount (default: all)."
    )
    mode: Literal["classic", "native"] = Field(
        "classic", description="`inject`/`webhook`: `classic` (install + sidecar) or `native` (sidecar initContainer)."
    )
    install_only: bool = Field(False, description="`inject`/`webhook`: inject install only (always for Jobs).")
    cpu: str = Field("10m", description="`inject`/`webhook`: CPU request of the injected containers.")
    memory: str = Field("128Mi", description="`inject`/`webhook`: memory request and limit of the injected containers.")
    run_as_same_user: bool = Field(
        False, description="`inject`/`webhook`: run infantry as the app container's UID, so signals are allowed."
    )
    health_port: int = Field(
        8086,
        ge=0,
        le=65535,
        description="`inject`/`webhook`: port of the sidecar's health server; the kubelet probes `/healthz` "
        "(liveness) and `/configured` (readiness) (0: no health server and no probe).",
    )
    secret: str | None = Field(
        None,
        description="`inject`/`webhook`: Secret mounted read-only at `/var/run/secrets/infantry` in infantry's "
        "containers, for token, password, CA, certificate and key files.",
    )
    config_map: str | None = Field(
        None,
        description="`inject`/`webhook`: ConfigMap mounted at `/etc/infantry` in infantry's containers; its "
        "key `infantry.yaml` is the config file.",
    )
    secret_source: bool = Field(
        False, description="`inject`/`webhook`: the sources hold secrets: the shared volume is kept in memory."
    )
    annotate_only: bool = Field(False, description="`inject`: only add the annotations, for the webhook to act on.")
    tls_cert_file: Path | None = Field(None, description="`webhook`: TLS certificate (PEM), reloaded when it changes.")
    tls_key_file: Path | None = Field(None, description="`webhook`: TLS key (PEM), reloaded when it changes.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format on stderr.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() merges flags, environment and file itself, so the model only validates.
        return (init_settings,)

    @field_validator("reload_method")
    @classmethod
    def _http_method(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Z]{1,20}", value):
            raise ValueError("expected an HTTP method in capitals, like POST or PUT")
        return value

    @field_validator("source", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        value = _split_words(value)
        if isinstance(value, list | tuple):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("template", mode="before")
    @classmethod
    def _templates(cls, value: Any) -> Any:
        value = _split_words(value)
        if isinstance(value, list | tuple):
            return [TemplateSpec.parse(item) if isinstance(item, str) else item for item in value]
        return value

    @field_validator("raw", mode="before")
    @classmethod
    def _raw(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.replace(",", " ").split() if part]
        if isinstance(value, list) and value in (["all"], ["none"]):
            return value
        if isinstance(value, list):
            prefixes = []
            for prefix in value:
                if not isinstance(prefix, str):
                    raise ValueError("expected `all`, `none`, or a list of path prefixes")  # noqa: TRY004
                prefix = prefix.strip("/")
                reason = check_path(prefix)
                if reason is not None:
                    raise ValueError(f"unsafe prefix {prefix!r}: {reason}")
                prefixes.append(prefix)
            return prefixes
        return value

    @field_validator("template_env", mode="before")
    @classmethod
    def _env_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [n for n in value.replace(",", " ").split() if n]
        if isinstance(value, list):
            for name in value:
                if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise ValueError(f"expected environment variable names, got {str(name)[:40]!r}")
        return value

    @field_validator("containers", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        return [n for n in value.replace(",", " ").split() if n] if isinstance(value, str) else value

    @field_validator("header", mode="before")
    @classmethod
    def _headers(cls, value: Any) -> Any:
        return [line for line in value.splitlines() if line.strip()] if isinstance(value, str) else value

    @field_validator("header")
    @classmethod
    def _header_shape(cls, value: list[str]) -> list[str]:
        for line in value:
            name, sep, text = line.partition(":")
            if not sep:
                raise ValueError("expected 'Name: value'")
            _check_header(name.strip(), text.strip())
        return value

    @field_validator("file_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        return _octal_mode(value)

    @field_validator("file_mode")
    @classmethod
    def _mode_range(cls, value: int) -> int:
        return _readable_mode(value)

    @field_validator("wait", mode="before")
    @classmethod
    def _wait(cls, value: Any) -> Any:
        if isinstance(value, int | float):
            return Wait.parse(str(value))
        return Wait.parse(value) if isinstance(value, str) else value

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        name = value.upper().removeprefix("SIG")
        if name not in signal_module.Signals.__members__ and f"SIG{name}" not in signal_module.Signals.__members__:
            raise ValueError(f"unknown signal {value!r}")
        return name

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            _, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value

    @field_validator("reload_url", "verify_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        problem = None if value.isprintable() else "the URL holds a control character"
        if problem is None:
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018  (reading it checks it)
            except ValueError:
                problem = "its host or port cannot be read"
            else:
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    problem = "expected an http:// or https:// URL"
        if problem is not None:
            raise ValueError(f"{problem}, got {redact_url(value)!r}")
        return value

    @field_validator("check", "exec", "verify_cmd")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                argv = shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"cannot split the command into words ({exc}); check its quotes") from None
            if not argv:
                raise ValueError("the command is empty; give a program and its arguments, or leave it unset")
        return value

    @field_validator("dest", mode="before")
    @classmethod
    def _dest(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; give the directory to publish into, like /configs")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.process and self.pid_file:
            raise ValueError("process and pid-file are alternatives; give one")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client-cert and client-key go together")
        if self.password_file is not None and self.username is None:
            raise ValueError("password-file needs username")
        if self.verify_url and self.verify_cmd:
            raise ValueError("verify-url and verify-cmd are alternatives; give one")
        if self.stale_after is not None and self.stale_after <= self.wait.max:
            raise ValueError("stale-after must be longer than the wait's MAX, or every debounced change looks stale")
        if (self.verify_url or self.verify_cmd) and self.layout != "kubelet":
            raise ValueError("verify-url and verify-cmd roll back by swapping ..data back, so they need layout kubelet")
        return self

    @property
    def limits(self) -> Limits:
        """The size limits sources enforce while reading."""
        return Limits(int(self.max_file_size), int(self.max_total_size), self.max_files)

    @property
    def signal_number(self) -> signal_module.Signals:
        """The reload signal as a number."""
        return signal_module.Signals[f"SIG{self.signal}"]

    @property
    def stale_seconds(self) -> float:
        """How long a source may go unanswered, or the destination lag the store, before ``/healthz`` fails."""
        if self.stale_after is not None:
            return self.stale_after
        return max(3 * self.interval, 30.0, 2 * self.wait.max)

    def raw_prefixes(self) -> list[str] | None:
        """The prefixes of the values published as files: None for all of them, [] for none."""
        rule = self.raw if self.raw is not None else (["none"] if self.template else ["all"])
        if rule == ["all"]:
            return None
        return [] if rule == ["none"] else rule

    def resolved_sources(self) -> list[SourceSpec]:
        """The sources, with the top-level auth and TLS options filled in where a source sets none."""
        defaults: dict[str, Any] = {
            "bearer_token_file": self.bearer_token_file,
            "username": self.username,
            "password_file": self.password_file,
            "ca_file": self.ca_file,
            "client_cert": self.client_cert,
            "client_key": self.client_key,
            "ssh_key_file": self.ssh_key_file,
            "ssh_known_hosts": self.ssh_known_hosts,
        }
        common = dict(_parse_header(line) for line in self.header)
        resolved = []
        for spec in self.source:
            update = {key: value for key, value in defaults.items() if getattr(spec, key) is None}
            update["headers"] = {**common, **spec.headers}
            resolved.append(spec.model_copy(update=update))
        return resolved

    def template_sources(self) -> list[SourceSpec]:
        """The sources that read the templates' texts (see :func:`template_groups`), with the top-level
        auth, TLS and headers."""
        urls, _ = template_groups(self.template)
        fake = self.model_copy(update={"source": [SourceSpec.model_validate({"url": url}) for url in urls]})
        return fake.resolved_sources()


def template_groups(templates: Sequence[TemplateSpec]) -> tuple[list[str], list[tuple[int, str | None]]]:
    """The URLs of the sources that read the templates, and for each template: its source, and the name
    of its file there (None: the source holds just that one file).

    Templates that share a directory (``file://``) or a prefix (``etcd://``) are read through one source
    of it: a thousand templates are one watch, not a thousand.
    """
    splits = [_template_parent(t.src) for t in templates]
    shared = Counter(split[0] for split in splits if split is not None)
    urls: list[str] = []
    picks: list[tuple[int, str | None]] = []
    for template, split in zip(templates, splits, strict=True):
        # An etcd URL names a prefix, so a template key is always read through its parent's prefix.
        alone = split is not None and shared[split[0]] == 1 and urlsplit(template.src).scheme == "file"
        url, name = split if split is not None and not alone else (template.src, None)
        if url not in urls:
            urls.append(url)
        picks.append((urls.index(url), name))
    return urls, picks


def _template_parent(url: str) -> tuple[str, str] | None:
    """(the URL of the directory or prefix holding the template at ``url``, its name there), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("file", "etcd", "etcds") or parts.path.endswith("/") or "/" not in parts.path:
        return None
    if parts.scheme == "file" and Path(unquote(parts.path)).is_dir():
        return None
    parent, _, name = parts.path.rpartition("/")
    name = unquote(name)
    if not name:
        return None
    parent += "/" if parts.scheme != "file" else ""
    return urlunsplit((parts.scheme, parts.netloc, parent or "/", "", "")), name


def _check_header(name: str, value: str) -> None:
    """Refuse a header that cannot be sent; the value may be a secret, so it is never echoed."""
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        raise ValueError(f"expected 'Name: value', got a header named {name[:40]!r}")
    if not re.fullmatch(r"[\x20-\x7e\t]*", value):
        raise ValueError(f"the value of header {name!r} holds a character that cannot be sent in HTTP")


def _parse_header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip(), value.strip()


def env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return ENV_PREFIX + field.upper()


def _did_you_mean(key: str, known: Collection[str]) -> str:
    """``; did you mean 'x'?`` for a misspelt key, or a pointer to the list of settings."""
    close = difflib.get_close_matches(key.replace("_", "-"), [k.replace("_", "-") for k in known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else "; see `infantry COMMAND --help` for the settings"


def _shown_key(key: object) -> str:
    return repr(key if isinstance(key, str) and len(key) <= 60 else str(key)[:60])


def _normalise_keys(path: Path, where: str, values: Mapping[Any, Any], known: Collection[str]) -> dict[str, Any]:
    """``values`` with ``-`` in keys read as ``_``; an unknown key is refused, naming the file and the key."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else None
        if name not in known:
            raise SettingsError(f"{path}: unknown key {_shown_key(key)}{where}{_did_you_mean(str(key), known)}")
        assert name is not None
        if name in out:
            raise SettingsError(f"{path}: {key!r}{where} is given twice")
        out[name] = value
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML settings file. Keys may use ``-`` or ``_``; ``sources`` is accepted for ``source``.

    Scalars are read as YAML 1.2 reads them, and every mistake is one line naming the file.
    """
    try:
        # Non-blocking, and only a regular file: a FIFO or a device named by mistake must not hang start-up.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SettingsError(f"config: {str(path)!r} is not a regular file")
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise SettingsError(f"config: cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL in the path
        raise SettingsError(f"config: cannot read {str(path)!r}: {exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise SettingsError(f"config: {path} is larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    from infantry.yamlfile import YamlError, load_yaml12  # only a run with a config file needs YAML

    try:
        loaded = load_yaml12(text)
    except YamlError as exc:
        raise SettingsError(f"{path}: not valid YAML at {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsError(f"{path}: expected a mapping of settings, like 'interval: 5', at the top level")
    known = [name for name in Settings.model_fields if name != "config"]
    if "config" in loaded:
        raise SettingsError(f"{path}: 'config' cannot name another config file; merge the two files")
    for plural, name in (("sources", "source"), ("templates", "template")):
        if plural in loaded:
            if name in loaded:
                raise SettingsError(f"{path}: has both '{name}' and '{plural}'; keep one")
            loaded[name] = loaded.pop(plural)
    values = _normalise_keys(path, "", loaded, known)
    if isinstance(values.get("file_mode"), int):
        raise SettingsError(f'{path}: file_mode: give it as an octal string, e.g. "0644" (quoted)')
    for name, model in (("source", SourceSpec), ("template", TemplateSpec)):
        items = values.get(name)
        if isinstance(items, list):
            values[name] = [
                _normalise_keys(path, f" in {name} #{i + 1}", item, list(model.model_fields))
                if isinstance(item, dict)
                else item
                for i, item in enumerate(items)
            ]
    template_items = values.get("template")
    if isinstance(template_items, list) and any(
        isinstance(item, dict) and isinstance(item.get("mode"), int) for item in template_items
    ):
        raise SettingsError(f'{path}: templates: give mode as an octal string, e.g. "0644" (quoted)')
    return values


def read_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings given as ``INFANTRY_*`` variables."""
    source = EnvSettingsSource(Settings, env_prefix=ENV_PREFIX, case_sensitive=False)
    if environ is not None:
        source.env_vars = {key.lower(): value for key, value in environ.items()}
    try:
        values = source()
    except PydanticSettingsError as exc:
        raise SettingsError(f"environment: {exc}") from None
    return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class Origins:
    """Where each setting came from, so a message names it the way the user gave it."""

    flags: Collection[str] = ()
    env: Collection[str] = ()
    config: Path | None = None
    from_file: Collection[str] = field(default_factory=frozenset)

    def name(self, setting: str) -> str:
        """``--name``, ``INFANTRY_NAME``, ``FILE: name``, or ``name`` for a default."""
        if setting in self.flags:
            return f"--{setting.replace('_', '-')}"
        if setting in self.env:
            return env_name(setting)
        if setting in self.from_file and self.config is not None:
            return f"{self.config}: {setting}"
        return setting.replace("_", "-")


def load_settings(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None, *, check_at_start: Collection[str] = ()
) -> Settings:
    """Build the settings: flag over environment over config file over default.

    ``check_at_start`` names the settings a command is about to use; those that point at files,
    directories or programs are checked now (see :func:`check_paths`), not when first used.
    """
    env = read_environment(os.environ if environ is None else environ)
    config_path = flags.get("config") or env.get("config")
    from_file = read_config_file(Path(config_path)) if config_path else {}
    origins = Origins(set(flags), set(env), Path(config_path) if config_path else None, set(from_file))
    merged = {**from_file, **env, **flags}
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, origins)) from None
    check_paths(settings, check_at_start, origins)
    return settings


def describe_validation_error(exc: ValidationError, origins: Origins) -> str:
    """One line for all the problems, naming each setting the way the user gave it.

    The input values are never quoted: pydantic's own text would repeat a password or a token.
    """
    lines = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [part for part in error["loc"]]
        name = origins.name(str(loc[0])) if loc else "settings"
        rest = loc[1:]
        if loc and loc[0] == "source" and rest and isinstance(rest[0], int):
            name += f" #{rest[0] + 1}"
            rest = [part for part in rest[1:] if part != "url"]
        where = "".join(f".{part}" for part in rest)
        message = " ".join(str(error["msg"]).removeprefix("Value error, ").split())
        lines.append(f"{name}{where}: {message}")
    return "; ".join(lines)


FILE_HINTS = {
    "ca_file": "a PEM bundle of the CAs that sign the server's certificate",
    "client_cert": "the client certificate, in PEM",
    "client_key": "the client certificate's key, in PEM",
    "ssh_key_file": "the SSH private key, such as a mounted Secret",
    "ssh_known_hosts": "a known_hosts file with the git server's host key",
    "bearer_token_file": "a file holding the bearer token, such as a mounted Secret",
    "password_file": "a file holding the basic-auth password, such as a mounted Secret",
    "tls_cert_file": "the webhook's TLS certificate, in PEM",
    "tls_key_file": "the webhook's TLS key, in PEM",
}
"""The settings naming a file that must be there at start, and what to give instead."""

PROGRAMS = ("check", "exec", "verify_cmd")


def check_paths(settings: Settings, names: Collection[str], origins: Origins = Origins()) -> None:
    """Check now what the named settings point at: files to read, the fallback, programs, the destination.

    The first problem found is raised as a SettingsError naming the setting, with a hint.
    """
    for name in names:
        value = getattr(settings, name, None)
        if value is None:
            continue
        problem: str | None = None
        if name in FILE_HINTS:
            problem = _file_problem(value, FILE_HINTS[name])
        elif name == "fallback":
            problem = _fallback_problem(value)
        elif name == "dest":
            problem = _dest_problem(value)
        elif name in PROGRAMS:
            problem = _program_problem(value)
        if problem is not None:
            raise SettingsError(f"{origins.name(name)}: {problem}")
    if "source" in names and "ca_file" in names:
        for i, spec in enumerate(settings.source):
            for name, hint in FILE_HINTS.items():
                value = getattr(spec, name, None)
                problem = _file_problem(value, hint) if value is not None else None
                if problem is not None:
                    raise SettingsError(f"{origins.name('source')} #{i + 1}: {name.replace('_', '-')}: {problem}")


def _stat(path: Path) -> os.stat_result | str:
    """The stat of ``path`` (links followed), or why it cannot be had."""
    try:
        return path.stat()
    except FileNotFoundError:
        return "no such file or directory"
    except OSError as exc:
        return exc.strerror or str(exc)
    except ValueError as exc:
        return str(exc)


def _file_problem(path: Path, hint: str) -> str | None:
    st = _stat(path)
    if isinstance(st, str):
        return f"cannot read {str(path)!r}: {st}; give the path of {hint}"
    if not stat.S_ISREG(st.st_mode):
        return f"{str(path)!r} is not a regular file; give the path of {hint}"
    if not os.access(path, os.R_OK):
        return f"{str(path)!r} cannot be read (permission denied); give the path of {hint}, readable by infantry"
    return None


def _fallback_problem(path: Path) -> str | None:
    st = _stat(path)
    hint = "give a directory, baked into the image, holding the set to publish when the store is down"
    if isinstance(st, str):
        return f"cannot use {str(path)!r}: {st}; {hint}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{str(path)!r} is not a directory; {hint}"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"{str(path)!r} cannot be read (permission denied); {hint}"
    return None


def _dest_problem(path: Path) -> str | None:
    hint = "give a directory (the volume shared with the app), or a path where one can be made"
    target = path
    while True:
        try:
            st = target.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            if target.is_symlink():
                return f"{str(target)!r} is a symbolic link to a path that does not exist; {hint}"
            if target.parent == target:
                return None
            target = target.parent
        except OSError as exc:
            return f"cannot use {str(path)!r}: {exc.strerror or exc}; {hint}"
        except ValueError as exc:
            return f"cannot use {str(path)!r}: {exc}; {hint}"
    where = repr(str(path)) if target == path else f"{str(target)!r} (on the way to {str(path)!r})"
    if not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else "not a directory"
        return f"{where} is {kind}; {hint}"
    # Found now, not after --timeout of retries: nothing can be spooled or published there. access()
    # answers for the real UID, which is the one named.
    with contextlib.suppress(OSError):
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            return f"{where} is on a read-only file system; mount a writable volume there (an emptyDir is)"
    if not os.access(target, os.R_OK | os.W_OK | os.X_OK):
        return (
            f"{where} is not readable and writable by UID {os.getuid()} (mode {stat.filemode(st.st_mode)}, "
            f"owner UID {st.st_uid}); mount a volume there that this user may write (an emptyDir is), or run "
            "as its owner"
        )
    return None


def _program_problem(command: str) -> str | None:
    program = shlex.split(command)[0]
    if shutil.which(program) is not None:
        return None
    shown = repr(program[:200])
    if "/" not in program:
        return f"program {shown} is not found in PATH; give its full path, or install it in infantry's image"
    st = _stat(Path(program))
    if isinstance(st, str):
        return f"program {shown} cannot be run: {st}; give the path of an executable in infantry's container"
    return f"program {shown} is not an executable file; give the path of one (chmod +x), in infantry's container"


def child_environment() -> dict[str, str]:
    """The environment hook commands inherit."""
    return dict(os.environ)
