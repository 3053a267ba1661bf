"""The soak, short: `infantry watch` under every kind of fault in turn, against real etcd, a tmpfs and a reader.

benchmarks/soak.py does the work (and runs for ten minutes with faults at random); this runs its fixed
order once, about fifty seconds, and checks each of its verdicts, so that a failure names what broke.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import IN_CI, require_binary

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
KINDS = {"disk_full", "dest_edit", "store_restart", "reload_500", "hook_hang"}


@pytest.mark.timeout(400)
def test_watch_converges_and_health_tells_the_truth_under_every_fault(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the soak mounts a tmpfs, which needs root (CI runs as root)")
        pytest.skip("the soak mounts a tmpfs, which needs root")
    require_binary("etcd", "etcd-server")
    workdir, report_path = tmp_path / "soak", tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--order", "fixed", "--duration", "40", "--seed", "1",
         "--workdir", str(workdir), "--json", str(report_path)],
        capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    assert report_path.exists(), f"the soak did not finish:\n{result.stdout}\n{result.stderr[-5000:]}"
    report = json.loads(report_path.read_text())
    watch_log = Path(report["watch_log"]).read_text()
    context = f"{result.stdout}\nwatch log (tail):\n{watch_log[-6000:]}"

    assert report["watch_alive"], context
    assert report["watch_exit"] == 0, context
    assert {label.split(":")[0] for label in report["by_kind"]} == KINDS, context
    assert report["unconverged"] == [], context
    assert report["slow"] == [], context
    # /healthz is judged both ways, and was put to the test both ways.
    assert report["health_violations"] == 0, context
    assert report["health_required_503"] > 0, context
    assert report["health_required_200"] > 0, context
    assert report["reader_checked"] > 0, context
    assert report["reader_problems"] == 0, context
    assert report["checker_torn"] == 0, context
    assert report["failures"] == [], context  # bounded RSS, fds, threads, children; probes answered
    assert result.returncode == 0, context
