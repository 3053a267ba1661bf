"""A sidecar loads only what its mode needs: `watch` on etcd, without --listen or --config, imports no
file watcher, YAML, Prometheus client, JSON patch or template engine, and none of infantry's archive,
inject or webhook code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import Etcd, read_as_app

# Runs the real command line in this process until the set is published and the watch has gone
# round again, then writes the names of the modules loaded and stops as a pod would (SIGTERM).
RUNNER = """
import os, runpy, signal, sys, threading, time
out, published = sys.argv[1], sys.argv[2]
def dump():
    deadline = time.monotonic() + 60
    while not os.path.exists(published) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the loop goes round after the publish: telling, tidying, the next poll
    with open(out, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=dump, daemon=True).start()
sys.argv = ["infantry", *sys.argv[3:]]
runpy.run_module("infantry", run_name="__main__")
"""

NOT_FOR_ETCD_WATCH = (
    "watchdog",
    "yaml",
    "prometheus_client",
    "jsonpatch",
    "jinja2",
    "tarfile",
    "infantry.archive",
    "infantry.inject",
    "infantry.webhook",
    "infantry.templates",
    "infantry.yamlfile",
    "infantry.sources.file",
    "infantry.sources.git",
)


def loaded_by(tmp_path: Path, *args: str, published: str) -> set[str]:
    out = tmp_path / "modules.txt"
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(out), published, *args], capture_output=True, text=True, timeout=120
    )
    assert out.exists(), result.stderr
    return set(out.read_text().split())


def test_watch_on_etcd_imports_only_what_it_needs(etcd: Etcd, tmp_path: Path) -> None:
    etcd.put("/app/app.conf", "x")
    dest = tmp_path / "D"
    modules = loaded_by(
        tmp_path, "watch", "--source", etcd.url(), "--dest", str(dest), "--interval", "0.2",
        published=str(dest / "app.conf"),
    )  # fmt: skip
    assert read_as_app(dest) == {"app.conf": "x"}
    assert "infantry.sources.etcd" in modules and "httpx" in modules  # it did run the etcd watch
    assert sorted(set(NOT_FOR_ETCD_WATCH) & modules) == []


def test_the_same_modules_come_when_their_option_is_given(etcd: Etcd, tmp_path: Path) -> None:
    etcd.put("/app/app.conf", "x")
    config = tmp_path / "infantry.yaml"
    config.write_text(f"source: [{etcd.url()}]\n")
    dest = tmp_path / "D"
    modules = loaded_by(
        tmp_path, "watch", "--config", str(config), "--dest", str(dest), "--listen", "127.0.0.1:0",
        published=str(dest / "app.conf"),
    )  # fmt: skip
    assert {"yaml", "infantry.yamlfile", "prometheus_client"} <= modules  # the test above can fail


def test_metrics_nobody_can_read_accept_every_call_the_real_ones_get() -> None:
    from infantry.health import Metrics, NullMetrics

    real, null = Metrics(), NullMetrics()
    instruments = [name for name, value in vars(real).items() if name != "registry" and hasattr(value, "collect")]
    assert len(instruments) >= 10
    for name in instruments:
        instrument = getattr(null, name)
        instrument.labels("a", "b").inc()
        instrument.set(1)
        instrument.observe(0.5)
        instrument.clear()
    null.set_version("v" * 64, 3)
    null.set_commits(["c" * 40])
