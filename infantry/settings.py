"""Every setting infantry has, in one model, and the only code that reads the environment.

Precedence is flag, then ``INFANTRY_*`` variable, then the ``--config`` YAML file, then the default.
The README's settings table is generated from this model by ``settings_table()``.
"""

from __future__ import annotations

import os
import re
import signal as signal_module
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from infantry import __version__
from infantry.errors import SettingsError
from infantry.snapshot import Limits, check_path

ENV_PREFIX = "INFANTRY_"
SCHEMES = ("file", "http", "https", "etcd", "etcds")


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
            raise ValueError(f"expected MIN[:MAX] in seconds, got {text!r}") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"expected 0 <= MIN <= MAX, got {text!r}")
        return cls(lo, hi)


def _split_words(value: Any) -> Any:
    """A list in an environment variable is separated by whitespace or newlines."""
    return value.split() if isinstance(value, str) else value


class SourceSpec(BaseModel):
    """One source: a URL, where its files go in the destination, and how to authenticate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="The source URL: file://, http(s):// or etcd(s)://.")
    dir: str = Field("", description="Sub-directory of the destination for this source's files.")
    name: str | None = Field(None, description="File name for a single HTTP document (default: last URL segment).")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP request headers.")
    bearer_token_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @field_validator("headers")
    @classmethod
    def _header_values(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            _check_header(name, text)
        return value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in SCHEMES:
            raise ValueError(f"unsupported source URL scheme {scheme!r} (supported: {', '.join(SCHEMES)})")
        return url

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


class Settings(BaseSettings):
    """infantry's settings. Field names are the option names with ``-`` as ``_``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    source: Annotated[list[SourceSpec], NoDecode] = Field(
        default_factory=list, description="Source URL; repeat for several sources."
    )
    dest: Path = Field(Path("/configs"), description="Destination directory (the shared emptyDir).")
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
    check_timeout: float = Field(30.0, gt=0, description="Seconds the check command may take.")
    timeout: float = Field(60.0, gt=0, description="`install`: seconds to keep trying the source before giving up.")
    fallback: Path | None = Field(None, description="`install`: directory published when the source stays unreachable.")
    interval: float = Field(10.0, gt=0, description="Seconds between polls (HTTP) or resyncs (file).")
    wait: Annotated[Wait, NoDecode] = Field(
        Wait(0.0, 0.0), description="Debounce `MIN[:MAX]` seconds before publishing a change."
    )
    publish_timeout: float = Field(
        60.0, gt=0, description="Seconds writing a set into the destination may take (the check has its own)."
    )
    request_timeout: float = Field(
        30.0, gt=0, description="HTTP and etcd: seconds one whole request may take, body included."
    )
    watch_timeout: float = Field(
        660.0,
        gt=0,
        description="etcd: a watch stream silent this long is broken and reopened "
        "(keep it above etcd's progress-notify interval, 10 minutes by default).",
    )
    stale_after: float | None = Field(
        None,
        gt=0,
        description="`/healthz` fails once a source has not answered, or the destination has not matched "
        "the store, for this many seconds (default: 3 intervals, at least 30, and above the wait's MAX).",
    )
    signal: str = Field("HUP", description="Signal sent to the app on reload.")
    process: str | None = Field(None, description="Signal every process with this executable name or argv[0].")
    pid_file: Path | None = Field(None, description="Signal the process whose PID is in this file.")
    reload_url: str | None = Field(None, description="URL called on reload; a 2xx answer is expected.")
    reload_method: str = Field("POST", description="HTTP method for `reload-url`.")
    reload_timeout: float = Field(10.0, gt=0, description="Seconds allowed for the reload call, retries included.")
    verify_url: str | None = Field(
        None, description="After a reload, GET this URL until it answers 2xx; if it never does, roll back."
    )
    verify_cmd: str | None = Field(
        None, description="After a reload, run this command until it exits 0; if it never does, roll back."
    )
    verify_timeout: float = Field(10.0, gt=0, description="Seconds the app has to pass verification after a reload.")
    exec: str | None = Field(None, description="Command run on reload (no shell).")
    exec_timeout: float = Field(30.0, gt=0, description="Seconds the reload command may take.")
    listen: str | None = Field(None, description="`HOST:PORT` serving `/healthz`, `/readyz`, `/status` and `/metrics`.")
    header: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra HTTP header `Name: value` for every source; repeatable."
    )
    bearer_token_file: Path | None = Field(None, description="File holding a bearer token, re-read on each request.")
    username: str | None = Field(None, description="User name for HTTP basic auth.")
    password_file: Path | None = Field(None, description="File holding the basic-auth password.")
    ca_file: Path | None = Field(None, description="CA bundle used to verify HTTPS sources.")
    client_cert: Path | None = Field(None, description="Client certificate (PEM) for HTTPS sources.")
    client_key: Path | None = Field(None, description="Key of the client certificate (PEM).")
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

    @field_validator("source", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> Any:
        value = _split_words(value)
        if isinstance(value, list | tuple):
            return [{"url": item} if isinstance(item, str) else item for item in value]
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
        return int(value, 8) if isinstance(value, str) else value

    @field_validator("file_mode")
    @classmethod
    def _mode_range(cls, value: int) -> int:
        if not 0 <= value <= 0o777 or not value & 0o400:
            raise ValueError(f"expected an octal mode readable by its owner, like 0644, got {value:o}")
        return value

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
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
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

    def resolved_sources(self) -> list[SourceSpec]:
        """The sources, with the top-level auth and TLS options filled in where a source sets none."""
        defaults: dict[str, Any] = {
            "bearer_token_file": self.bearer_token_file,
            "username": self.username,
            "password_file": self.password_file,
            "ca_file": self.ca_file,
            "client_cert": self.client_cert,
            "client_key": self.client_key,
        }
        common = dict(_parse_header(line) for line in self.header)
        resolved = []
        for spec in self.source:
            update = {key: value for key, value in defaults.items() if getattr(spec, key) is None}
            update["headers"] = {**common, **spec.headers}
            resolved.append(spec.model_copy(update=update))
        return resolved


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


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML settings file. Keys may use ``-`` or ``_``; ``sources`` is accepted for ``source``."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"config: cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SettingsError(f"config: {path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SettingsError(f"config: {path} must hold a mapping of settings")
    values = {str(key).replace("-", "_"): value for key, value in loaded.items()}
    if "sources" in values:
        if "source" in values:
            raise SettingsError(f"config: {path} has both 'source' and 'sources'")
        values["source"] = values.pop("sources")
    if "config" in values:
        raise SettingsError(f"config: {path} cannot name another config file")
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


def load_settings(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings: flag over environment over config file over default."""
    env = read_environment(os.environ if environ is None else environ)
    config_path = flags.get("config") or env.get("config")
    from_file = read_config_file(Path(config_path)) if config_path else {}
    merged = {**from_file, **env, **flags}
    try:
        return Settings(**merged)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, env, flags)) from None


def describe_validation_error(exc: ValidationError, env: Mapping[str, Any], flags: Mapping[str, Any]) -> str:
    """One line per problem, naming the setting the way the user gave it."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        field = loc[0] if loc else ""
        if not field:
            name = "settings"
        elif field in flags:
            name = f"--{field.replace('_', '-')}"
        elif field in env:
            name = env_name(field)
        else:
            name = field.replace("_", "-")
        where = ".".join(loc[1:])
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{name}{'.' + where if where else ''}: {message}")
    return "; ".join(lines)


def settings_table() -> str:
    """The README's table of settings, generated from the model."""
    rows = ["| Option | Environment | Default | Meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default: Any = info.get_default(call_default_factory=True)
        if isinstance(default, Wait):
            shown = f"`{default.min:g}`"
        elif isinstance(default, ByteSize):
            shown = f"`{default.human_readable(decimal=False)}`"
        elif name == "file_mode":
            shown = f"`{default:04o}`"
        elif default in (None, [], {}):
            shown = ""
        else:
            shown = f"`{default}`"
        rows.append(f"| `--{name.replace('_', '-')}` | `{env_name(name)}` | {shown} | {info.description or ''} |")
    return "\n".join(rows) + "\n"


def child_environment() -> dict[str, str]:
    """The environment hook commands inherit."""
    return dict(os.environ)
