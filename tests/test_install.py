"""`infantry install` as a new user runs it: real nginx, real archives, exit codes from DESIGN.md."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from tests.archives import files_tar, make_zip
from tests.support import Nginx, TlsFiles, Watch, free_port, infantry, log_lines, read_as_app, tree, wait_until


def test_install_tar_gz_bundle(nginx: Nginx, tmp_path: Path) -> None:
    (nginx.root / "bundle.tar.gz").write_bytes(
        files_tar({"./app.yaml": b"color: blue\n", "./conf.d/extra.conf": b"x=1\n", "./run.sh": b"#!/bin/sh\n"})
    )
    dest = tmp_path / "D"
    result = infantry("install", "--source", nginx.url("bundle.tar.gz"), "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    assert os.readlink(dest / "..data").startswith("..2")
    assert read_as_app(dest) == {"app.yaml": "color: blue\n", "conf.d/extra.conf": "x=1\n", "run.sh": "#!/bin/sh\n"}
    assert "published" in result.stderr


def test_an_archive_past_max_files_is_refused_naming_the_setting(nginx: Nginx, tmp_path: Path) -> None:
    # Directories count as archive members too: the refusal says which setting sets the bound.
    members = {"./a/x.yaml": b"1\n", "./b/y.yaml": b"2\n", "./c/z.yaml": b"3\n"}
    (nginx.root / "bundle.tar.gz").write_bytes(files_tar(members))
    (nginx.root / "bundle.zip").write_bytes(make_zip({name[2:]: data for name, data in members.items()}))
    for name in ("bundle.tar.gz", "bundle.zip"):
        result = infantry("install", "--source", nginx.url(name), "--dest", str(tmp_path / name), "--max-files", "1")
        assert result.returncode == 5, result.stderr
        assert "max-files" in result.stderr and len(log_lines(result.stderr)) == 1, result.stderr


def test_install_zip_and_plain_documents(nginx: Nginx, tmp_path: Path) -> None:
    (nginx.root / "bundle.zip").write_bytes(make_zip({"a/b.txt": b"zipped", "c.txt": b"c"}))
    (nginx.root / "settings.yaml").write_text("plain: true\n")
    dest = tmp_path / "D"
    result = infantry(
        "install", "--source", nginx.url("bundle.zip"), "--source", nginx.url("settings.yaml"), "--dest", str(dest)
    )
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"a/b.txt": "zipped", "c.txt": "c", "settings.yaml": "plain: true\n"}


def test_closed_port_exits_3_within_the_timeout_and_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "D"
    started = time.monotonic()
    result = infantry(
        "install", "--source", f"http://127.0.0.1:{free_port()}/bundle.tar.gz", "--dest", str(dest), "--timeout", "2"
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    # The 2 s timeout plus interpreter start-up on a busy machine: far from the 60 s default.
    assert elapsed < 2 + 4, elapsed
    assert tree(dest) == {}
    assert "unreachable after 2s" in result.stderr


def test_fallback_is_published_loudly_when_the_store_is_down(tmp_path: Path) -> None:
    fallback = tmp_path / "baked"
    fallback.mkdir()
    (fallback / "app.yaml").write_text("safe: defaults\n")
    dest = tmp_path / "D"
    url = f"http://127.0.0.1:{free_port()}/app.yaml"
    result = infantry("install", "--source", url, "--dest", str(dest), "--timeout", "1", "--fallback", str(fallback))
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"app.yaml": "safe: defaults\n"}
    assert "WARNING" in result.stderr and "FALLBACK" in result.stderr


def test_watch_reports_a_fallback_until_the_store_replaces_it(
    nginx: Nginx, tmp_path: Path, watches: list[Watch]
) -> None:
    fallback = tmp_path / "baked"
    fallback.mkdir()
    (fallback / "app.yaml").write_text("safe: defaults\n")
    (nginx.root / "app.yaml").write_text("from: the store\n")
    nginx.stop()
    dest = tmp_path / "D"
    args = ["--source", nginx.url("app.yaml"), "--dest", str(dest)]
    assert infantry("install", *args, "--timeout", "1", "--fallback", str(fallback)).returncode == 0
    watch = Watch(tmp_path, [*args, "--interval", "0.3"])
    watches.append(watch)
    wait_until("the health endpoint", lambda: watch.get("/metrics")[0] == 200)
    assert watch.get("/readyz")[0] == 503  # the store has not answered yet
    wait_until("the fallback to be reported", lambda: watch.metric("infantry_fallback_active") == 1)
    nginx.start()
    wait_until("the store's content", lambda: read_as_app(dest) == {"app.yaml": "from: the store\n"}, timeout=15)
    wait_until("the fallback to be cleared", lambda: watch.metric("infantry_fallback_active") == 0)
    assert not (dest / "..fallback").exists()


def test_check_command_rejects_with_exit_4_and_publishes_nothing(nginx: Nginx, tmp_path: Path) -> None:
    (nginx.root / "app.yaml").write_text("this is bad\n")
    dest = tmp_path / "D"
    seen = tmp_path / "seen"
    check = f'sh -c \'echo "$INFANTRY_STAGED $1" > {seen}; grep -rq good "$1"\' check'
    result = infantry("install", "--source", nginx.url("app.yaml"), "--dest", str(dest), "--check", check)
    assert result.returncode == 4, result.stderr
    staged_env, staged_arg = seen.read_text().split()
    assert staged_env == staged_arg and staged_arg.startswith(str(dest))
    assert read_as_app(dest) == {}
    assert not os.path.lexists(dest / "..data")
    (nginx.root / "app.yaml").write_text("this is good\n")
    result = infantry("install", "--source", nginx.url("app.yaml"), "--dest", str(dest), "--check", check)
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"app.yaml": "this is good\n"}


def test_settings_errors_exit_2_naming_the_setting(tmp_path: Path) -> None:
    result = infantry("install", "--dest", str(tmp_path / "D"))
    assert result.returncode == 2
    assert "source" in result.stderr
    result = infantry("install", "--source", "file:///x", "--timeout", "soon")
    assert result.returncode == 2
    assert "--timeout" in result.stderr
    result = infantry("install", "--source", "file:///x", env={"INFANTRY_MAX_FILES": "-3"})
    assert result.returncode == 2
    assert "INFANTRY_MAX_FILES" in result.stderr


def test_two_sources_claiming_one_path_is_a_settings_error(tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "app.yaml").write_text(name)
    dest = tmp_path / "D"
    both = ["--source", (tmp_path / "one").as_uri(), "--source", (tmp_path / "two").as_uri()]
    result = infantry("install", *both, "--dest", str(dest))
    assert result.returncode == 2
    assert "both provide 'app.yaml'" in result.stderr
    assert tree(dest) == {}
    config = tmp_path / "infantry.yaml"
    one, two = (tmp_path / "one").as_uri(), (tmp_path / "two").as_uri()
    config.write_text(f"sources:\n  - url: {one}\n    dir: one\n  - url: {two}\n    dir: two\n")
    result = infantry("install", "--config", str(config), "--dest", str(dest))
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"one/app.yaml": "one", "two/app.yaml": "two"}


def test_bearer_token_is_read_from_a_file_and_never_logged(nginx: Nginx, tmp_path: Path) -> None:
    (nginx.root / "bearer").mkdir()
    (nginx.root / "bearer" / "app.yaml").write_text("secret config\n")
    token = tmp_path / "token"
    token.write_text("wrong-token-value\n")
    dest = tmp_path / "D"
    args = ["install", "--source", nginx.url("bearer/app.yaml"), "--dest", str(dest), "--bearer-token-file", str(token)]
    result = infantry(*args, "--timeout", "3")
    assert result.returncode == 3
    assert "401" in result.stderr and "wrong-token-value" not in result.stderr
    token.write_text("sesame\n")
    result = infantry(*args)
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"app.yaml": "secret config\n"}
    assert nginx.requests("bearer/app.yaml")[-1][4] == "Bearer sesame"


def test_basic_auth_and_secrets_in_urls_stay_out_of_logs(nginx: Nginx, tmp_path: Path) -> None:
    (nginx.root / "basic").mkdir()
    (nginx.root / "basic" / "app.yaml").write_text("basic\n")
    password = tmp_path / "password"
    password.write_text("wonderland\n")
    dest = tmp_path / "D"
    result = infantry(
        "install",
        "--source",
        nginx.url("basic/app.yaml"),
        "--dest",
        str(dest),
        "--username",
        "alice",
        "--password-file",
        str(password),
        "--log-level",
        "debug",
    )
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"app.yaml": "basic\n"}
    assert "wonderland" not in result.stderr
    leaky = f"http://alice:hunter2@127.0.0.1:{nginx.port}/basic/app.yaml?token=s3cr3t"
    result = infantry(
        "install", "--source", leaky, "--dest", str(tmp_path / "E"), "--timeout", "2", "--log-level", "debug"
    )
    assert result.returncode == 3
    assert "hunter2" not in result.stderr and "s3cr3t" not in result.stderr
    assert "alice:***@" in result.stderr


def test_https_with_ca_file_and_client_certificate(nginx_tls: Nginx, tls_files: TlsFiles, tmp_path: Path) -> None:
    (nginx_tls.root / "app.yaml").write_text("over tls\n")
    url = nginx_tls.tls_url("app.yaml")
    dest = tmp_path / "D"
    result = infantry(
        "install",
        "--source",
        url,
        "--dest",
        str(dest),
        "--ca-file",
        str(tls_files.ca),
        "--client-cert",
        str(tls_files.client_cert),
        "--client-key",
        str(tls_files.client_key),
    )
    assert result.returncode == 0, result.stderr
    assert read_as_app(dest) == {"app.yaml": "over tls\n"}
    # Without the client certificate nginx refuses; without the CA the server is not trusted.
    no_cert = infantry(
        "install", "--source", url, "--dest", str(tmp_path / "E"), "--ca-file", str(tls_files.ca), "--timeout", "2"
    )
    assert no_cert.returncode == 3 and "HTTP 400" in no_cert.stderr
    # An untrusted certificate is permanent: exit 3 at once (not after --timeout), with a hint.
    started = time.monotonic()
    no_ca = infantry("install", "--source", url, "--dest", str(tmp_path / "F"), "--timeout", "120")
    assert no_ca.returncode == 3 and "certificate is not trusted" in no_ca.stderr, no_ca.stderr
    assert "ca-file" in no_ca.stderr and "Traceback" not in no_ca.stderr
    assert time.monotonic() - started < 60
    assert tree(tmp_path / "E") == {} and tree(tmp_path / "F") == {}


def test_retry_after_is_honoured(nginx: Nginx, tmp_path: Path) -> None:
    result = infantry("install", "--source", nginx.url("busy.yaml"), "--dest", str(tmp_path / "D"), "--timeout", "3.5")
    assert result.returncode == 3
    times = [float(row[0]) for row in nginx.requests("busy.yaml")]
    assert all(row[1] == "503" for row in nginx.requests("busy.yaml"))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 2 and min(gaps) >= 0.95, gaps
