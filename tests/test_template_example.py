"""examples/templates: etcd keys rendered into an nginx upstream, behind nginx -t, with real processes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, require_binary, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "templates"


def load_template_pod() -> Any:
    spec = importlib.util.spec_from_file_location("template_pod", EXAMPLE / "pod.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_servers() -> None:
    for name, package in (("etcd", "etcd-server"), ("etcdctl", "etcd-client"), ("nginx", "nginx-light")):
        require_binary(name, package)


# -- the check gate alone --------------------------------------------------------------------------


def staged(tmp_path: Path, upstream: str) -> Path:
    """A staged set as the templates render it, with ``upstream`` as the upstream block."""
    directory = tmp_path / "staged"
    directory.mkdir()
    (directory / "site.conf").write_text(
        "server {\n    listen 127.0.0.1:8080;\n    location / { proxy_pass http://web; }\n}\n"
    )
    (directory / "upstream.conf").write_text(upstream)
    return directory


def check(directory: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return subprocess.run(["sh", str(EXAMPLE / "check.sh"), str(directory)], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/sbin:/usr/bin:/bin", "TMPDIR": str(scratch)})  # fmt: skip


def test_check_passes_a_set_nginx_accepts_and_only_reads_it(tmp_path: Path) -> None:
    require_binary("nginx", "nginx-light")
    directory = staged(tmp_path, "upstream web {\n    server 127.0.0.1:8081;\n    server 127.0.0.1:8082;\n}\n")
    before = {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in directory.iterdir()}
    result = check(directory, tmp_path)
    assert result.returncode == 0, result.stderr
    assert {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in directory.iterdir()} == before
    assert not any((tmp_path / "scratch").iterdir())  # its temporary nginx.conf is gone


@pytest.mark.parametrize(
    ("upstream", "nginx_says"),
    [
        ("upstream web {\n    server 127.0.0.1:99999;\n}\n", "invalid port"),
        ("upstream web {\n}\n", "no servers are inside upstream"),
        ("upstream web {\n    server 127.0.0.1:8081\n}\n", "unexpected"),
    ],
    ids=["bad-port", "no-servers", "syntax"],
)
def test_check_refuses_a_set_nginx_refuses(tmp_path: Path, upstream: str, nginx_says: str) -> None:
    require_binary("nginx", "nginx-light")
    result = check(staged(tmp_path, upstream), tmp_path)
    assert result.returncode != 0
    assert nginx_says in result.stderr  # nginx's own reason, which infantry logs and shows on /readyz
    assert not any((tmp_path / "scratch").iterdir())


# -- the story -------------------------------------------------------------------------------------


def test_templates_follow_backends_in_etcd_and_keep_the_last_good_set(tmp_path: Path) -> None:
    require_servers()
    module = load_template_pod()
    pod = module.TemplatePod(tmp_path)
    one, two, nowhere = pod.address("one"), pod.address("two"), module.NOWHERE
    try:
        pod.start_store()
        pod.configure(keepalive=8)  # the store keeps this when every backend has gone
        pod.register(one)
        result = pod.install()
        assert result.returncode == 0, result.stderr
        published = pod.published()
        assert set(published) == {"upstream.conf", "site.conf"}  # rendered files only: raw is none
        assert f"server {one};" in published["upstream.conf"] and two not in published["upstream.conf"]
        assert "keepalive 8;" in published["upstream.conf"]
        assert f"listen 127.0.0.1:{pod.http_port};" in published["site.conf"]
        pod.start_nginx()
        pod.start_watch()
        assert set(pod.answers()) == {"backend one"}
        master, workers = pod.nginx_pids()

        # A second backend registers: nginx is reloaded and sends requests to both, in turn.
        pod.register(two)
        wait_until("nginx to send requests to both backends", lambda: pod.serves({"one", "two"}))
        wait_until("the old workers to finish", lambda: pod.reloaded(workers))
        assert pod.nginx_pids()[0] == master  # reloaded by HUP, not restarted
        answers = pod.answers(4)
        assert answers in (["backend one", "backend two"] * 2, ["backend two", "backend one"] * 2)  # round robin
        wait_until("/readyz", lambda: pod.probe("/readyz")[0] == 200)

        # A backend nginx would refuse: the check gate keeps the set out, nothing is reloaded.
        before, (_, workers) = pod.published(), pod.nginx_pids()
        pod.register(nowhere)
        wait_until("the check to refuse the set", lambda: "refused" in pod.probe("/readyz")[1])
        status, body = pod.probe("/readyz")
        assert status == 503 and "invalid port" in body, body
        assert pod.probe("/healthz")[0] == 200
        assert pod.published() == before and nowhere not in pod.published()["upstream.conf"]
        assert pod.serves({"one", "two"})
        assert pod.nginx_pids()[1] == workers
        pod.deregister(nowhere)
        wait_until("/readyz once the store is good again", lambda: pod.probe("/readyz")[0] == 200)

        # A key smuggling a server of its own into the upstream block: nginx -t would pass it, the template does not.
        hostile = (
            f"127.0.0.1:1;}}server{{listen 127.0.0.1:{free_port()};return 200 pwned;}}upstream x{{server 127.0.0.1:1"
        )
        pod.register(hostile)
        wait_until("the template to refuse the key", lambda: "is not HOST:PORT" in pod.probe("/readyz")[1])
        assert pod.published() == before and "pwned" not in pod.published()["upstream.conf"]
        assert pod.nginx_pids()[1] == workers
        pod.deregister(hostile)
        wait_until("/readyz once the key is gone", lambda: pod.probe("/readyz")[0] == 200)

        # The first backend leaves: only the second answers.
        _, workers = pod.nginx_pids()
        pod.deregister(one)
        wait_until("nginx to send requests to backend two only", lambda: pod.serves({"two"}))
        wait_until("the old workers to finish", lambda: pod.reloaded(workers))
        assert set(pod.answers()) == {"backend two"}
        assert one not in pod.published()["upstream.conf"]
        wait_until("/readyz", lambda: pod.probe("/readyz")[0] == 200)

        # No backend left: the template fails, nothing is published, the last good set stays live.
        before, (_, workers) = pod.published(), pod.nginx_pids()
        pod.deregister_all()
        wait_until(
            "the template's fail() to refuse the set",
            lambda: "no backends under /services/web/" in pod.probe("/readyz")[1],
        )
        assert pod.probe("/readyz")[0] == 503
        assert pod.probe("/healthz")[0] == 200  # a refusal is not ill health, until --stale-after
        assert pod.published() == before
        assert pod.serves({"two"})
        assert pod.nginx_pids()[1] == workers
        assert "no backends under /services/web/" in pod.log("watch.log")

        # A backend registers again: infantry converges by itself.
        pod.register(one)
        wait_until("nginx to send requests to backend one again", lambda: pod.serves({"one"}))
        wait_until("/readyz once a backend is back", lambda: pod.probe("/readyz")[0] == 200)
    finally:
        pod.stop()


def test_template_pod_script_runs_by_hand() -> None:
    require_servers()
    result = subprocess.run([str(EXAMPLE / "run.sh")], capture_output=True, text=True, timeout=120,
                            env={"PYTHON": sys.executable, "PATH": "/usr/sbin:/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "nginx answers: backend one, backend one, backend one, backend one" in out
    assert "backend one, backend two" in out or "backend two, backend one" in out
    assert "nginx answers: backend two, backend two, backend two, backend two" in out
    assert "the last good set stays: True" in out
    assert "nginx was not reloaded: True" in out
    assert out.rstrip().endswith("==> stopped")
