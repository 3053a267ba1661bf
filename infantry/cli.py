"""The ``infantry`` command: builds the settings once, runs the job, and maps errors to exit codes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from infantry import __version__, logs
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
    "config",
    "layout",
    "file_mode",
    "max_file_size",
    "max_total_size",
    "max_files",
    "check",
    "check_timeout",
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

F = TypeVar("F", bound=Callable[..., Any])


def setting_options(names: tuple[str, ...]) -> Callable[[F], F]:
    """Click options for the named settings, with help taken from the settings model."""

    def decorate(func: F) -> F:
        for name in reversed(names):
            info = Settings.model_fields[name]
            repeatable = name in ("source", "header")
            func = click.option(
                f"--{name.replace('_', '-')}",
                name,
                multiple=repeatable,
                default=None,
                metavar=name.upper(),
                help=(info.description or "") + f"  [env: INFANTRY_{name.upper()}]",
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


def _run(given: dict[str, Any], job: Callable[[Settings], Coroutine[Any, Any, int]]) -> None:
    """Build the settings, run ``job``, and exit with the code its outcome or error calls for."""
    try:
        settings = load_settings(_flags(given))
    except SettingsError as exc:
        logs.configure("text", "info")
        logger.error("%s", exc)
        sys.exit(2)
    logs.configure(settings.log_format, settings.log_level)
    try:
        code = asyncio.run(job(settings))
    except InfantryError as exc:
        code = next(code for kind, code in EXIT_CODES if isinstance(exc, kind))
        logger.error("%s", exc)
    except Exception:
        logger.exception("unexpected error; this is a bug in infantry")
        code = 1
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="infantry")
def main() -> None:
    """Fetch configuration into a shared directory and keep it fresh."""


@main.command()
@setting_options(INSTALL)
def install(**given: Any) -> None:
    """Fetch the configuration once into --dest, then exit (an initContainer)."""

    async def job(settings: Settings) -> int:
        from infantry.agent import build_agent

        agent = build_agent(settings, child_environment(), with_notifiers=False)
        await agent.install()
        return 0

    _run(given, job)


@main.command()
@setting_options(WATCH)
def watch(**given: Any) -> None:
    """Keep --dest in step with the sources and tell the app to reload (a sidecar)."""

    async def job(settings: Settings) -> int:
        from infantry.agent import build_agent
        from infantry.health import HealthServer

        agent = build_agent(settings, child_environment(), with_notifiers=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = None
        if settings.listen:
            host, _, port = settings.listen.rpartition(":")
            try:
                server = HealthServer(host or "0.0.0.0", int(port), agent.health, agent.metrics, agent.source_names)
            except OSError as exc:
                raise SettingsError(f"listen: cannot listen on {settings.listen}: {exc.strerror}") from exc
            server.start()
            logger.info("serving /healthz, /readyz and /metrics on %s", settings.listen)
        try:
            await agent.watch(stop)
        finally:
            if server is not None:
                server.stop()
        logger.info("stopped")
        return 0

    _run(given, job)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
