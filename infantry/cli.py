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

from infantry import __version__, logs, memory, options
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

F = TypeVar("F", bound=Callable[..., Any])


SHORT = {"file": "-f"}
# Commands whose start is logged with the settings they run with (status and inject print their output).
STARTS_LOGGED = ("install", "watch", "render", "webhook")


class GroupedOption(click.Option):
    """An option shown under a heading of its command's help (see GroupedCommand)."""

    def __init__(self, *args: Any, group: str = "Options", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """A command whose help lists its options under headings (Sources, Destination, Reload…), in the
    order of options.GROUPS, then its examples."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "group", "Options"), []).append(record)
        order = ["Options", *(group for group, _ in options.GROUPS)]
        for group in sorted(sections, key=lambda g: order.index(g) if g in order else len(order)):
            with formatter.section(group):
                formatter.write_dl(sections[group])

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        examples = EXAMPLES.get(self.name or "", ())
        if examples:
            with formatter.section("Examples"):
                for line in examples:
                    formatter.write(f"  {line}\n")  # as it is, to copy: never wrapped


# Two or three examples per command, shown at the end of its help.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "install": (
        "infantry install --source https://config.example.com/app/bundle.tar.gz --dest /configs --timeout 60",
        "infantry install --source etcd://etcd:2379/app/ --fallback /defaults --check 'nginx -t -p'",
        "infantry install --config /etc/infantry/config.yaml",
    ),
    "watch": (
        "infantry watch --source etcd://etcd:2379/app/ --process nginx --signal HUP --listen 0.0.0.0:8086",
        "infantry watch --source https://config.example.com/app.yaml --interval 30 --reload-url "
        "http://127.0.0.1:8080/-/reload",
        "infantry watch --config /etc/infantry/config.yaml --wait 0.5:5 --verify-url http://127.0.0.1:8080/healthz",
    ),
    "render": (
        "infantry render --source etcd://etcd:2379/app/ --template /etc/infantry/nginx.conf.j2:nginx.conf",
        "infantry render --config /etc/infantry/config.yaml --diff /configs",
    ),
    "status": (
        "infantry status --dest /configs",
        "infantry status --dest /configs --json",
    ),
    "inject": (
        "infantry inject -f deploy.yaml --source etcd://etcd:2379/app/ --process nginx | kubectl apply -f -",
        "infantry inject -f deploy.yaml --source etcd://etcd:2379/app/ --native",
        "infantry inject -f deploy.yaml --source etcd://etcd:2379/app/ --annotate-only",
    ),
    "webhook": (
        "infantry webhook --tls-cert-file /tls/tls.crt --tls-key-file /tls/tls.key",
        "infantry webhook --tls-cert-file /tls/tls.crt --tls-key-file /tls/tls.key --mode native --listen 0.0.0.0:9443",
    ),
}


def setting_options(command: str) -> Callable[[F], F]:
    """Click options for the settings ``command`` takes, with help taken from the settings model."""

    def decorate(func: F) -> F:
        # click shows options in the order they are declared: declared last first, in the groups' order.
        for name in sorted(options.COMMANDS[command], key=options.ORDER.index, reverse=True):
            info = Settings.model_fields[name]
            declarations = [f"--{name.replace('_', '-')}", name, *([SHORT[name]] if name in SHORT else [])]
            kwargs: dict[str, Any] = {
                "cls": GroupedOption,
                "group": options.GROUP_OF.get(name, "Options"),
                "default": None,
                "help": options.help_text(command, name),
            }
            if info.annotation is bool:
                func = click.option(*declarations, is_flag=True, **kwargs)(func)
            else:
                multiple = name in ("source", "header", "template")
                func = click.option(*declarations, multiple=multiple, metavar=options.metavar(name), **kwargs)(func)
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
    command = click.get_current_context().info_name or ""
    if command in STARTS_LOGGED:
        logger.info(
            "infantry %s %s: %s",
            __version__,
            command,
            options.changed(command, settings),
            extra=logs.fields(event="start", settings=options.effective(command, settings)),
        )
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


@main.command(cls=GroupedCommand, short_help="Fetch the configuration once into --dest, then exit (an initContainer).")
@setting_options("install")
def install(**given: Any) -> None:
    """Fetch the configuration once into --dest, then exit (an initContainer)."""

    async def job(settings: Settings) -> int:
        from infantry.install import run_install
        from infantry.process import start_reaper

        start_reaper(asyncio.get_running_loop())
        await run_install(settings, child_environment())
        return 0

    _run(given, job, options.INSTALL)


@main.command(cls=GroupedCommand, short_help="Fetch once, render the templates, and print the set; write nothing.")
@click.option(
    "--diff",
    "diff",
    metavar="DEST",
    default=None,
    cls=GroupedOption,
    group="Destination",
    help="Show a unified diff from what DEST holds (files and modes), instead of the set.",
)
@setting_options("render")
def render(diff: str | None, **given: Any) -> None:
    """Fetch once, render the templates, and print the set install would publish; writes nothing."""

    async def job(settings: Settings) -> int:
        from infantry.render import run_render

        await run_render(settings, child_environment(), Path(diff) if diff else None, sys.stdout.buffer)
        return 0

    _run(given, job, options.RENDER)


@main.command(
    cls=GroupedCommand, short_help="Keep --dest in step with the sources; tell the app to reload (a sidecar)."
)
@setting_options("watch")
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
            address = server.address
            logger.info(
                "serving /healthz, /readyz, /configured, /status and /metrics on %s",
                address,
                extra=logs.fields(event="listening", address=address),
            )
        await watcher.run(stop, server)
        logger.info("stopped")
        return 0

    _run(given, job, options.WATCH)


@main.command(cls=GroupedCommand, short_help="Show what --dest holds, and whether it is whole (exit 0) or not (1).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rather than text.")
@setting_options("status")
def status(as_json: bool, **given: Any) -> None:
    """Show what --dest holds: the live set, the one kept for rollback, and whether the layout is whole.

    It only reads the destination. Exit code 0 when the layout is whole, 1 when it is not, so it works
    as an exec probe.
    """

    async def job(settings: Settings) -> int:
        from infantry.status import run_status

        return run_status(settings.dest, settings.file_mode, as_json)

    _run(given, job)


@main.command(cls=GroupedCommand, short_help="Add infantry to the workloads in Kubernetes YAML; write the YAML out.")
@click.option(
    "--native/--classic",
    "native",
    default=None,
    cls=GroupedOption,
    group="Injection",
    help="A native sidecar (an initContainer with restartPolicy: Always), or install + sidecar.  [default: classic]",
)
@setting_options("inject")
def inject(native: bool | None, **given: Any) -> None:
    """Add infantry to the workloads in Kubernetes YAML (-f FILE, or standard input); write YAML out."""
    if native is not None:
        given["mode"] = "native" if native else "classic"

    async def job(settings: Settings) -> int:
        import yaml

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


@main.command(cls=GroupedCommand, short_help="Serve the mutating admission webhook that injects infantry (HTTPS).")
@setting_options("webhook")
def webhook(**given: Any) -> None:
    """Serve the mutating admission webhook that injects infantry into opted-in pods (HTTPS only)."""

    async def job(settings: Settings) -> int:
        from infantry.webhook import serve

        await asyncio.to_thread(serve, settings, _stop_event())
        return 0

    # Only the webhook's own files are looked for: the settings it passes on name files in the pods.
    _run(given, job, ("tls_cert_file", "tls_key_file"))


def _stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT; the handlers only record."""
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
