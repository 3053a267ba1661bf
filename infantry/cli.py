"""The ``infantry`` command: builds the settings once, runs the job, and maps errors to exit codes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from infantry import __version__, logs, memory
from infantry.errors import CheckFailed, InfantryError, PublishError, SettingsError, SourceError, UnsafeDataError
from infantry.settings import Settings, child_environment, load_settings

logger = logging.getLogger("infantry.cli")

EXIT_CODES: tuple[tuple[type[InfantryError], int], ...] = (
    (SettingsError, 2),
    (SourceError, 3),
    (CheckFailed, 4),
    (UnsafeDataError, 5),
    (PublishError, 1),
    (InfantryError, 1),
)

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
    "log_format",
    "log_level",
)
INSTALL = (*COMMON, "timeout", "fallback")
# render fetches and renders as install does, and writes nothing: no destination is checked at start.
RENDER = tuple(name for name in (*COMMON, "timeout") if name not in ("dest", "layout", "file_mode", "publish_timeout"))
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

INJECT = (
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

F = TypeVar("F", bound=Callable[..., Any])


SHORT = {"file": "-f"}


def setting_options(names: tuple[str, ...]) -> Callable[[F], F]:
    """Click options for the named settings, with help taken from the settings model."""

    def decorate(func: F) -> F:
        for name in reversed(names):
            info = Settings.model_fields[name]
            declarations = [f"--{name.replace('_', '-')}", name, *([SHORT[name]] if name in SHORT else [])]
            help_text = (info.description or "") + f"  [env: INFANTRY_{name.upper()}]"
            if info.annotation is bool:
                func = click.option(*declarations, is_flag=True, default=None, help=help_text)(func)
            else:
                func = click.option(
                    *declarations,
                    multiple=name in ("source", "header", "template"),
                    default=None,
                    metavar=name.upper(),
                    help=help_text,
                )(func)
        return func

    return decorate


def _flags(given: dict[str, Any]) -> dict[str, Any]:
    """Only the options given on the command line, so the environment and file can fill the rest."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in given.items()
        if value is not None and value != ()
    }


def _one_line(exc: BaseException) -> str:
    """An error's message on one line, however its parts were joined."""
    return " ".join(str(exc).split())


def _run(
    given: dict[str, Any], job: Callable[[Settings], Coroutine[Any, Any, int]], check_at_start: tuple[str, ...] = ()
) -> None:
    """Build the settings, check what ``check_at_start`` names, run ``job``, and exit with the code its
    outcome or error calls for."""
    try:
        settings = load_settings(_flags(given), check_at_start=check_at_start)
    except SettingsError as exc:
        logs.configure("text", "info")
        logger.error("%s", _one_line(exc))
        sys.exit(2)
    logs.configure(settings.log_format, settings.log_level)
    try:
        code = asyncio.run(job(settings))
    except InfantryError as exc:
        code = next(code for kind, code in EXIT_CODES if isinstance(exc, kind))
        logger.error("%s", _one_line(exc))
    except Exception:
        logger.exception("unexpected error; this is a bug in infantry")
        code = 1
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="infantry")
def main() -> None:
    """Fetch configuration into a shared directory and keep it fresh."""
    memory.one_arena()


@main.command()
@setting_options(INSTALL)
def install(**given: Any) -> None:
    """Fetch the configuration once into --dest, then exit (an initContainer)."""

    async def job(settings: Settings) -> int:
        from infantry.install import run_install
        from infantry.process import start_reaper

        start_reaper(asyncio.get_running_loop())
        await run_install(settings, child_environment())
        return 0

    _run(given, job, INSTALL)


@main.command()
@click.option("--diff", "diff", metavar="DEST", default=None, help="Show a unified diff from what DEST holds.")
@setting_options(RENDER)
def render(diff: str | None, **given: Any) -> None:
    """Fetch once, render the templates, and print the set install would publish; writes nothing."""

    async def job(settings: Settings) -> int:
        from infantry.render import run_render

        await run_render(settings, child_environment(), Path(diff) if diff else None, sys.stdout.buffer)
        return 0

    _run(given, job, RENDER)


@main.command()
@setting_options(WATCH)
def watch(**given: Any) -> None:
    """Keep --dest in step with the sources and tell the app to reload (a sidecar)."""

    async def job(settings: Settings) -> int:
        from infantry.health import HealthServer
        from infantry.process import start_reaper
        from infantry.watch import build_watcher

        loop = asyncio.get_running_loop()
        start_reaper(loop)
        watcher = build_watcher(settings, child_environment())
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = None
        if settings.listen:
            host, _, port = settings.listen.rpartition(":")
            try:
                server = HealthServer(host or "0.0.0.0", int(port), watcher.report, watcher.metrics)
            except OSError as exc:
                raise SettingsError(f"listen: cannot listen on {settings.listen}: {exc.strerror}") from exc
            logger.info("serving /healthz, /readyz, /status and /metrics on %s", settings.listen)
        await watcher.run(stop, server)
        logger.info("stopped")
        return 0

    _run(given, job, WATCH)


@main.command()
@click.option("--native/--classic", "native", default=None, help="Inject a native sidecar, or install + sidecar.")
@setting_options(INJECT)
def inject(native: bool | None, **given: Any) -> None:
    """Add infantry to the workloads in Kubernetes YAML (-f FILE, or standard input); write YAML out."""
    if native is not None:
        given["mode"] = "native" if native else "classic"

    async def job(settings: Settings) -> int:
        from infantry.inject import inject_document, read_documents

        documents = read_documents(settings.file, sys.stdin)
        out = [
            inject_document(doc, settings, annotate_only=settings.annotate_only, warn=_warn, where=f"document {i + 1}")
            for i, doc in enumerate(documents)
            if doc is not None
        ]
        sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False, default_flow_style=False, allow_unicode=True))
        return 0

    _run(given, job)


def _warn(message: str) -> None:
    logger.warning("%s", message)


@main.command()
@setting_options(WEBHOOK)
def webhook(**given: Any) -> None:
    """Serve the mutating admission webhook that injects infantry into opted-in pods (HTTPS only)."""

    async def job(settings: Settings) -> int:
        from infantry.webhook import serve

        await asyncio.to_thread(serve, settings, _stop_event())
        return 0

    _run(given, job, WEBHOOK)


def _stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT; the handlers only record."""
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
