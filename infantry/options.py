"""Which settings each command takes, in which help group, with its default and variable.

The commands' options are made from these (see cli.setting_options), and the README's tables from the
commands' options (see infantry.docs), so neither can list an option a command does not take, or show a
default the model does not have.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from pydantic import ByteSize

from infantry.settings import Settings, SourceSpec, TemplateSpec, Wait, env_name, redact_url

# The order groups are shown in, and the settings in each (a setting is in one group, for every command).
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Sources",
        (
            "source",
            "config",
            "interval",
            "request_timeout",
            "watch_timeout",
            "timeout",
            "fallback",
            "header",
            "bearer_token_file",
            "username",
            "password_file",
            "ca_file",
            "client_cert",
            "client_key",
            "ssh_key_file",
            "ssh_known_hosts",
        ),
    ),
    ("Templates", ("template", "raw", "template_env", "render_timeout")),
    ("Destination", ("dest", "layout", "file_mode", "publish_timeout", "check", "check_timeout")),
    (
        "Reload",
        (
            "wait",
            "signal",
            "process",
            "pid_file",
            "reload_url",
            "reload_method",
            "reload_timeout",
            "exec",
            "exec_timeout",
        ),
    ),
    ("Verify", ("verify_url", "verify_cmd", "verify_timeout")),
    ("Health", ("listen", "stale_after", "health_port")),
    ("Limits", ("max_file_size", "max_total_size", "max_files")),
    (
        "Injection",
        (
            "file",
            "image",
            "mount_path",
            "containers",
            "mode",
            "install_only",
            "run_as_same_user",
            "annotate_only",
            "cpu",
            "memory",
            "secret",
            "config_map",
            "secret_source",
        ),
    ),
    ("Serving", ("tls_cert_file", "tls_key_file")),
    ("Logging", ("log_format", "log_level")),
)
GROUP_OF = {name: group for group, names in GROUPS for name in names}
ORDER = [name for _, names in GROUPS for name in names]

# What an option's value is, in its help line; the rest follow from their type (see metavar).
METAVARS = {
    "source": "URL",
    "reload_url": "URL",
    "verify_url": "URL",
    "template": "SRC:DEST",
    "raw": "PREFIX",
    "template_env": "NAME",
    "header": "'NAME: VALUE'",
    "wait": "MIN[:MAX]",
    "listen": "HOST:PORT",
    "file_mode": "OCTAL",
    "signal": "SIGNAL",
    "process": "NAME",
    "username": "NAME",
    "reload_method": "METHOD",
    "check": "COMMAND",
    "verify_cmd": "COMMAND",
    "exec": "COMMAND",
    "dest": "DIR",
    "fallback": "DIR",
    "file": "FILE",
    "image": "IMAGE",
    "mount_path": "PATH",
    "containers": "NAME",
    "cpu": "QUANTITY",
    "memory": "QUANTITY",
}


def metavar(name: str) -> str:
    """How an option's value is shown in help: its choices, or what it is."""
    if choices(name):
        return "|".join(choices(name))
    if name in METAVARS:
        return METAVARS[name]
    annotation = str(Settings.model_fields[name].annotation)
    if "ByteSize" in annotation:
        return "SIZE"
    if "Path" in annotation:
        return "FILE"
    if "float" in annotation:
        return "SECONDS"
    if "int" in annotation:
        return "N"
    return name.upper()


COMMON = (
    "source",
    "dest",
    "template",
    "raw",
    "template_env",
    "render_timeout",
    "config",
    "layout",
    "file_mode",
    "max_file_size",
    "max_total_size",
    "max_files",
    "check",
    "check_timeout",
    "publish_timeout",
    "request_timeout",
    "interval",
    "header",
    "bearer_token_file",
    "username",
    "password_file",
    "ca_file",
    "client_cert",
    "client_key",
    "ssh_key_file",
    "ssh_known_hosts",
    "log_format",
    "log_level",
)
INSTALL = (*COMMON, "timeout", "fallback")
# render fetches and renders as install does, and writes nothing: no destination is checked at start
# (--file-mode is what --diff compares modes with).
RENDER = tuple(
    name
    for name in (*COMMON, "timeout")
    if name not in ("dest", "layout", "publish_timeout", "check", "check_timeout")  # it stages nothing to check
)
WATCH = (
    *COMMON,
    "watch_timeout",
    "wait",
    "stale_after",
    "signal",
    "process",
    "pid_file",
    "reload_url",
    "reload_method",
    "reload_timeout",
    "verify_url",
    "verify_cmd",
    "verify_timeout",
    "exec",
    "exec_timeout",
    "listen",
)
# status reads a destination: it needs only where it is, and the file mode to read versions back by.
STATUS = ("dest", "file_mode", "log_format", "log_level")
# The settings of install and watch that inject and the webhook pass on to the containers they add, as
# INFANTRY_* variables (see infantry.inject). Not passed on: dest (it is --mount-path), listen (it is
# --health-port), config (it is --config-map), pid-file (another container's file), template-env (the
# injected containers' environment holds only infantry's own variables), and log-format and log-level,
# which are the commands' own (the infantry.dev/log-format and infantry.dev/log-level annotations set
# them for a pod).
POD = (
    "template",
    "raw",
    "interval",
    "request_timeout",
    "watch_timeout",
    "timeout",
    "fallback",
    "header",
    "bearer_token_file",
    "username",
    "password_file",
    "ca_file",
    "client_cert",
    "client_key",
    "ssh_key_file",
    "ssh_known_hosts",
    "render_timeout",
    "layout",
    "file_mode",
    "publish_timeout",
    "check",
    "check_timeout",
    "wait",
    "reload_method",
    "reload_timeout",
    "exec",
    "exec_timeout",
    "verify_url",
    "verify_cmd",
    "verify_timeout",
    "stale_after",
    "max_file_size",
    "max_total_size",
    "max_files",
)
# What inject and the webhook add, beyond the settings they pass on.
INJECTION = ("health_port", "secret", "config_map", "secret_source")
INJECT = (
    *POD,
    *INJECTION,
    "file",
    "source",
    "image",
    "mount_path",
    "containers",
    "process",
    "signal",
    "reload_url",
    "install_only",
    "cpu",
    "memory",
    "run_as_same_user",
    "annotate_only",
    "config",
    "log_format",
    "log_level",
)
WEBHOOK = (
    *POD,
    *INJECTION,
    "listen",
    "tls_cert_file",
    "tls_key_file",
    "image",
    "mount_path",
    "mode",
    "cpu",
    "memory",
    "config",
    "log_format",
    "log_level",
)
COMMANDS: dict[str, tuple[str, ...]] = {
    "install": INSTALL,
    "watch": WATCH,
    "render": RENDER,
    "status": STATUS,
    "inject": INJECT,
    "webhook": WEBHOOK,
}

# Where a setting means something else for one command than the model's description says.
OVERRIDES: dict[tuple[str, str], tuple[str, str]] = {
    ("webhook", "listen"): ("`HOST:PORT` serving `/mutate` and `/healthz` over HTTPS.", "0.0.0.0:8443"),
    ("status", "dest"): ("Destination directory to report on.", "/configs"),
}


def shown_default(name: str) -> str:
    """A setting's default as a user would type it; empty when it has none."""
    default: Any = Settings.model_fields[name].get_default(call_default_factory=True)
    if isinstance(default, Wait):
        return f"{default.min:g}"
    if isinstance(default, ByteSize):
        return default.human_readable(decimal=False)
    if name == "file_mode":
        return f"{default:04o}"
    if default in (None, [], {}) or isinstance(default, bool):
        return ""
    return str(default)


def choices(name: str) -> tuple[str, ...]:
    """The values a setting takes, when the model names them."""
    annotation = Settings.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return tuple(str(value) for value in typing.get_args(annotation))
    return ()


def describe(command: str, name: str) -> tuple[str, str]:
    """What a setting does for ``command``, and its default there."""
    if (command, name) in OVERRIDES:
        return OVERRIDES[command, name]
    return Settings.model_fields[name].description or "", shown_default(name)


def help_text(command: str, name: str) -> str:
    """The help of one option: what it does, its choices, default and variable."""
    meaning, default = describe(command, name)
    notes = []
    if choices(name):
        notes.append("one of: " + ", ".join(choices(name)))
    if default:
        notes.append(f"default: {default}")
    notes.append(f"env: {env_name(name)}")
    return f"{meaning.replace('`', '')}  [{'; '.join(notes)}]"


def grouped(command: str) -> list[tuple[str, list[str]]]:
    """The settings ``command`` takes, by help group, in the groups' order."""
    names = COMMANDS[command]
    return [
        (group, [n for n in members if n in names]) for group, members in GROUPS if any(n in names for n in members)
    ]


def _shown(value: Any) -> Any:
    """A setting's value as the start-up line shows it: plain JSON, with no secret in it."""
    if isinstance(value, SourceSpec):
        shown = redact_url(value.url)
        return f"{shown} -> {value.dir}/" if value.dir else shown
    if isinstance(value, TemplateSpec):
        return f"{redact_url(value.src)}:{value.dest}"
    if isinstance(value, Wait):
        return f"{value.min:g}:{value.max:g}"
    if isinstance(value, str) and "://" in value:
        return redact_url(value)  # --reload-url, --verify-url: credentials in a URL are a secret
    if isinstance(value, list):
        return [_shown(item) for item in value]
    if isinstance(value, ByteSize):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def effective(command: str, settings: Settings) -> dict[str, Any]:
    """The settings ``command`` runs with, for its start-up log line. Secrets are files infantry reads,
    so only their paths are shown; a header's value is never shown (it may be a token), only its name;
    a command's arguments are not shown, only its program; credentials and queries in a URL are
    redacted."""
    return {name: _setting(name, getattr(settings, name)) for name in COMMANDS[command]}


def changed(command: str, settings: Settings) -> str:
    """The settings of ``command`` that differ from their defaults, as ``name=value`` words."""
    words = []
    for name, value in effective(command, settings).items():
        if value != _setting(name, Settings.model_fields[name].get_default(call_default_factory=True)):
            words.append(
                f"{name.replace('_', '-')}={value if not isinstance(value, list) else ','.join(map(str, value))}"
            )
    return " ".join(words) or "all defaults"


# Commands are shown by their program alone: an argument may hold a token.
_COMMANDS = ("check", "exec", "verify_cmd")


def _setting(name: str, value: Any) -> Any:
    if name == "header":
        value = [text.partition(":")[0] + ": (hidden)" for text in value]
    elif name == "file_mode":
        value = f"{value:04o}"
    elif name in _COMMANDS and isinstance(value, str):
        words = value.split(None, 1)  # any white space separates arguments, as the command is run
        value = f"{words[0]} (arguments hidden)" if len(words) > 1 else value.strip()
    return _shown(value)
