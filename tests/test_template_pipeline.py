"""Templates in the data path: install, watch and render, as real processes, over real sources.

The engine's functions and bounds are tested on their own in test_templates.py; here the rendered files
join the one set that is checked, published, reloaded once and followed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support import Etcd, SignalRecorder, Watch, holds_for, infantry, read_as_app, wait_until

UPSTREAM = """upstream web {
{%- for backend in keys("web") %}
    server {{ backend }};
{%- endfor %}
}
"""


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tree(tmp_path / "store", {"web/10.0.0.5:8080": "up", "web/10.0.0.6:8080": "up", "app/port": "8080"})


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    return tree(tmp_path / "templates", {"upstream.conf.j2": UPSTREAM, "port.j2": 'listen {{ key("app/port") }};\n'})


def config(tmp_path: Path, **settings: object) -> Path:
    path = tmp_path / "infantry.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return path


def test_install_publishes_the_rendered_files_and_no_raw_value(store: Path, templates: Path, tmp_path: Path) -> None:
    dest = tmp_path / "D"
    result = infantry(
        "install", "--source", store.as_uri(), "--dest", str(dest),
        "--template", f"{templates / 'upstream.conf.j2'}:nginx/upstream.conf",
        "--template", f"{(templates / 'port.j2').as_uri()}:nginx/port.conf",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {
        "nginx/upstream.conf": "upstream web {\n    server 10.0.0.5:8080;\n    server 10.0.0.6:8080;\n}\n",
        "nginx/port.conf": "listen 8080;\n",
    }


def test_raw_prefixes_mode_and_the_config_file(store: Path, templates: Path, tmp_path: Path) -> None:
    dest = tmp_path / "D"
    path = config(
        tmp_path,
        sources=[{"url": store.as_uri(), "dir": "values"}],
        templates=[{"src": (templates / "port.j2").as_uri(), "dest": "port.conf", "mode": "0600"}],
        raw=["values/app"],
    )
    (templates / "port.j2").write_text('listen {{ key("/values/app/port") }};\n')
    result = infantry("install", "--config", str(path), "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"port.conf": "listen 8080;\n", "values/app/port": "8080"}
    assert (dest / "port.conf").stat().st_mode & 0o777 == 0o600
    assert (dest / "values" / "app" / "port").stat().st_mode & 0o777 == 0o644
    # Published again by a second install: the same set, read back with its modes, is not written again.
    again = infantry("install", "--config", str(path), "--dest", str(dest))
    assert again.returncode == 0 and "nothing written" in again.stderr, again.stderr


def test_a_render_error_is_exit_5_naming_template_line_and_key(store: Path, tmp_path: Path) -> None:
    broken = tree(tmp_path / "t", {"app.j2": 'first line\nport {{ key("app/missing") }}\n'})
    dest = tmp_path / "D"
    result = infantry("install", "--source", store.as_uri(), "--dest", str(dest),
                      "--template", f"{broken / 'app.j2'}:app.conf")  # fmt: skip
    assert result.returncode == 5, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "template app.conf" in message and "line 2" in message and "'app/missing'" in message, message
    assert not dest.exists() or read_as_app(dest) == {}


def test_a_syntax_error_is_exit_2_for_install_watch_and_render(store: Path, tmp_path: Path) -> None:
    broken = tree(tmp_path / "t", {"app.j2": "fine\n{% for x in %}\n"})
    spec = f"{broken / 'app.j2'}:app.conf"
    for command in ("install", "watch", "render"):
        dest = ["--dest", str(tmp_path / "D")] if command != "render" else []
        result = infantry(command, "--source", store.as_uri(), *dest, "--template", spec)
        assert result.returncode == 2, (command, result.stderr)
        assert "template app.conf" in result.stderr and "line 2" in result.stderr, (command, result.stderr)


def test_missing_wait_fetches_again_until_the_key_comes_or_the_timeout(store: Path, tmp_path: Path) -> None:
    waiting = tree(tmp_path / "t", {"app.j2": '{{ key("late/value") }}\n'})
    config_path = config(
        tmp_path,
        source=[store.as_uri()],
        templates=[{"src": (waiting / "app.j2").as_uri(), "dest": "app.conf", "missing": "wait"}],
    )
    result = infantry("install", "--config", str(config_path), "--dest", str(tmp_path / "D"), "--timeout", "1.5")
    assert result.returncode == 5, result.stderr
    assert "'late/value' still missing after --timeout 1.5s" in result.stderr


def test_missing_skip_leaves_that_file_out(store: Path, tmp_path: Path) -> None:
    t = tree(tmp_path / "t", {"a.j2": '{{ key("nope") }}', "b.j2": '{{ key("app/port") }}'})
    path = config(
        tmp_path,
        source=[store.as_uri()],
        templates=[
            {"src": (t / "a.j2").as_uri(), "dest": "a.conf", "missing": "skip"},
            {"src": (t / "b.j2").as_uri(), "dest": "b.conf"},
        ],
    )
    result = infantry("install", "--config", str(path), "--dest", str(tmp_path / "D"))
    assert result.returncode == 0, result.stderr
    assert read_as_app(tmp_path / "D") == {"b.conf": "8080"}


def test_render_prints_the_set_and_a_diff_and_writes_nothing(store: Path, templates: Path, tmp_path: Path) -> None:
    dest = tmp_path / "D"
    spec = f"{templates / 'port.j2'}:port.conf"
    shown = infantry("render", "--source", store.as_uri(), "--template", spec)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "==> port.conf <==\nlisten 8080;\n"
    assert infantry("install", "--source", store.as_uri(), "--dest", str(dest), "--template", spec).returncode == 0
    (store / "app" / "port").write_text("9090")
    before = sorted(p.name for p in dest.iterdir())
    diff = infantry("render", "--source", store.as_uri(), "--template", spec, "--diff", str(dest))
    assert diff.returncode == 0, diff.stderr
    assert f"--- {dest}/port.conf" in diff.stdout and "-listen 8080;" in diff.stdout and "+listen 9090;" in diff.stdout
    assert sorted(p.name for p in dest.iterdir()) == before  # no spool, no snapshot: nothing written
    assert read_as_app(dest) == {"port.conf": "listen 8080;\n"}


def test_render_diff_shows_a_mode_change_and_never_reads_through_a_planted_data_link(
    store: Path, templates: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "D"
    spec = f"{templates / 'port.j2'}:port.conf"
    assert infantry("install", "--source", store.as_uri(), "--dest", str(dest), "--template", spec).returncode == 0
    same = infantry("render", "--source", store.as_uri(), "--template", spec, "--diff", str(dest))
    assert same.returncode == 0 and same.stdout == "", same.stdout + same.stderr
    moded = infantry(
        "render", "--source", store.as_uri(), "--template", spec, "--diff", str(dest), "--file-mode", "0600"
    )
    assert moded.returncode == 0 and moded.stdout == "mode of port.conf: 0644 -> 0600\n", moded.stdout + moded.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "port.conf").write_text("listen 8080;\n")
    (dest / "..data").unlink()
    (dest / "..data").symlink_to(elsewhere)
    planted = infantry("render", "--source", store.as_uri(), "--template", spec, "--diff", str(dest))
    assert planted.returncode == 0, planted.stderr
    assert "--- /dev/null" in planted.stdout and "+listen 8080;" in planted.stdout  # nothing counted as live


def test_watch_renders_again_reloads_once_and_keeps_the_last_good_set_on_a_render_error(
    store: Path, templates: Path, tmp_path: Path, watches: list[Watch], app: SignalRecorder
) -> None:
    dest = tmp_path / "D"
    watch = Watch(
        tmp_path,
        ["--source", store.as_uri(), "--dest", str(dest), "--interval", "0.2", "--stale-after", "3",
         "--template", f"{templates / 'upstream.conf.j2'}:upstream.conf",
         "--template", f"{templates / 'port.j2'}:port.conf",
         "--pid-file", str(app.pid_file), "--signal", "HUP"],
    )  # fmt: skip
    watches.append(watch)
    watch.wait_ready()
    (store / "web" / "10.0.0.7:8080").write_text("up")
    wait_until("the new backend", lambda: "10.0.0.7:8080" in read_as_app(dest).get("upstream.conf", ""))
    wait_until("one reload", lambda: app.count() == 1)
    assert read_as_app(dest)["port.conf"] == "listen 8080;\n"

    # A template that now fails: the last good set stays, the error is counted once, /readyz says why.
    (templates / "port.j2").write_text('listen {{ key("app/nope") }};\n')
    wait_until(
        "the render error counted", lambda: watch.metric("infantry_render_errors_total", template="port.conf") == 1
    )
    assert "'app/nope'" in watch.get("/readyz")[1]
    assert holds_for(lambda: watch.metric("infantry_render_errors_total", template="port.conf") == 1, 1.0)
    assert read_as_app(dest)["port.conf"] == "listen 8080;\n"
    wait_until("/healthz to fail after --stale-after", lambda: watch.get("/healthz")[0] == 503)
    assert watch.log().count("'app/nope'") == 1  # logged once, not once per retry

    (templates / "port.j2").write_text('listen {{ key("app/port") }} ssl;\n')
    wait_until("the fixed template", lambda: read_as_app(dest)["port.conf"] == "listen 8080 ssl;\n")
    wait_until("/healthz and /readyz to recover",
               lambda: watch.get("/healthz")[0] == 200 and watch.get("/readyz")[0] == 200)  # fmt: skip
    wait_until("the second reload", lambda: app.count() == 2)

    # A value no template reads changes the set's inputs but no file: nothing is written, nobody told.
    live = os.readlink(dest / "..data")
    (store / "unread").write_text("x")
    assert holds_for(lambda: os.readlink(dest / "..data") == live and app.count() == 2, 1.5)


def test_templates_and_values_from_etcd(etcd: Etcd, tmp_path: Path) -> None:
    etcd.put("/services/web/10.0.0.5:8080", "up")
    etcd.put("/templates/upstream.j2", UPSTREAM)
    dest = tmp_path / "D"
    result = infantry(
        "install", "--source", etcd.url("/services/"), "--dest", str(dest),
        "--template", f"{etcd.url('/templates/')}:upstream.conf",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"upstream.conf": "upstream web {\n    server 10.0.0.5:8080;\n}\n"}


def test_templates_sharing_a_directory_are_read_through_one_source(
    store: Path, tmp_path: Path, watches: list[Watch]
) -> None:
    many = tree(tmp_path / "many", {f"t{i:02d}.j2": f'{i} {{{{ key("app/port") }}}}\n' for i in range(40)})
    dest = tmp_path / "D"
    args = [arg for i in range(40) for arg in ("--template", f"{many / f't{i:02d}.j2'}:out/{i:02d}.conf")]
    watch = Watch(tmp_path, ["--source", store.as_uri(), "--dest", str(dest), "--interval", "0.2", *args])
    watches.append(watch)
    watch.wait_ready()
    assert read_as_app(dest)["out/07.conf"] == "7 8080\n"
    status = json.loads(watch.get("/status")[1])
    assert [s["name"] for s in status["sources"]] == [store.as_uri(), many.as_uri()]
    (many / "t07.j2").write_text('seven {{ key("app/port") }}\n')
    wait_until("the changed template", lambda: read_as_app(dest)["out/07.conf"] == "seven 8080\n")


def test_templates_in_a_directory_with_a_space_in_its_name(store: Path, tmp_path: Path) -> None:
    spaced = tree(tmp_path / "sp ace", {"o ne.j2": "one {{ key('app/port') }}", "t wo.j2": "two"})
    result = infantry("install", "--source", store.as_uri(), "--dest", str(tmp_path / "D"),
                      "--template", f"{spaced / 'o ne.j2'}:one", "--template", f"{spaced / 't wo.j2'}:two")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_as_app(tmp_path / "D") == {"one": "one 8080", "two": "two"}


def test_an_etcd_template_named_by_its_key(etcd: Etcd, tmp_path: Path) -> None:
    etcd.put("/values/app/port", "8080")
    etcd.put("/one/t.j2", "port {{ key('app/port') }}")
    args = [
        "--source",
        etcd.url("/values/"),
        "--dest",
        str(tmp_path / "D"),
        "--template",
        f"{etcd.url('/one/t.j2')}:o.conf",
    ]
    result = infantry("install", *args)
    assert result.returncode == 0, result.stderr
    assert read_as_app(tmp_path / "D") == {"o.conf": "port 8080"}
    # A key under the template's key, as if it were a prefix, is never read as the template.
    etcd.put("/one/t.j2/x", "not the template {{ fail('read') }}")
    result = infantry("install", *args)
    assert result.returncode == 5 and "'t.j2' is both a file and a directory" in result.stderr, result.stderr


def test_a_restart_with_a_broken_template_keeps_the_live_set(
    store: Path, templates: Path, tmp_path: Path, watches: list[Watch]
) -> None:
    """A template that does not compile stops `watch` from starting only when there is nothing to keep:
    a restart with a broken template in the store keeps the live set and says why, not a crash loop."""
    dest = tmp_path / "D"
    spec = f"{templates / 'port.j2'}:port.conf"
    assert infantry("install", "--source", store.as_uri(), "--dest", str(dest), "--template", spec).returncode == 0
    (templates / "port.j2").write_text("{% if %}\n")
    watch = Watch(tmp_path, ["--source", store.as_uri(), "--dest", str(dest), "--template", spec,
                             "--stale-after", "2"])  # fmt: skip
    watches.append(watch)
    wait_until("/readyz to name the broken template", lambda: "template port.conf" in watch.get("/readyz")[1])
    assert watch.proc.poll() is None
    wait_until("/healthz to fail after --stale-after", lambda: watch.get("/healthz")[0] == 503)
    assert read_as_app(dest) == {"port.conf": "listen 8080;\n"}
    (templates / "port.j2").write_text("listen {{ key('app/port') }} again;\n")
    wait_until("the fixed template", lambda: read_as_app(dest) == {"port.conf": "listen 8080 again;\n"})
