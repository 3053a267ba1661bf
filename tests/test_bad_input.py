"""Every bad input is one line on stderr, exit 2 naming the setting, with a hint; and never a secret.

The command-line cases run infantry as a user does (a subprocess), so the whole line a user sees is
checked: one log line, no traceback, the setting's name, a hint.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from infantry.errors import SettingsError
from infantry.settings import Wait, load_settings, redact_url
from tests.support import infantry

SECRET = "R3loadPass"


def closed_port() -> int:
    """A loopback port nobody listens on (bound then released, so the kernel will not hand it out at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_refused(result: subprocess.CompletedProcess[str], setting: str, hint: str) -> None:
    """Exit 2 at once, one line on stderr naming ``setting`` and holding ``hint``, nothing published."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    message = lines[0].partition(" ERROR infantry.cli: ")[2]
    assert message.startswith(setting) or f": {setting}" in message, message
    assert hint in message, message


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    (root / "app.yaml").write_text("a: 1\n")
    return root


def install(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return infantry("install", "--source", store.as_uri(), *args, timeout=30)


def test_dest_that_is_a_regular_file(store: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    assert_refused(install(store, "--dest", str(afile)), "--dest", "is a file; give a directory")
    assert_refused(install(store, "--dest", str(afile / "sub")), "--dest", "on the way to")
    assert afile.read_text() == "mine\n"


@pytest.mark.parametrize("command", ["install", "watch"])
def test_dest_the_user_may_not_write_is_refused_at_once(command: str) -> None:
    """A volume that starts root-owned and 0755 (a named volume made from an image's /configs) is a
    settings error, found at start: not a source retried until --timeout."""
    if os.geteuid() != 0:
        pytest.fail("the tests run as root (as `make test` does), to run infantry as another user")
    shared = Path(tempfile.mkdtemp(prefix="infantry-dest-"))
    try:
        shared.chmod(0o755)
        (shared / "store").mkdir(mode=0o755)
        (shared / "store" / "app.yaml").write_text("a: 1\n")
        (shared / "configs").mkdir(mode=0o755)  # root's, as Docker makes it from an image's directory
        result = subprocess.run(
            ["setpriv", "--reuid=65532", "--regid=65532", "--clear-groups", sys.executable, "-m", "infantry",
             command, "--source", (shared / "store").as_uri(), "--dest", str(shared / "configs")],
            capture_output=True, text=True, timeout=30, env={k: v for k, v in os.environ.items()
                                                           if not k.startswith("INFANTRY_")},
        )  # fmt: skip
        assert_refused(result, "--dest", "is not readable and writable by UID 65532 (mode drwxr-xr-x, owner UID 0)")
        assert list((shared / "configs").iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_dest_that_is_a_dangling_link_or_on_a_read_only_file_system(store: Path, tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_refused(install(store, "--dest", str(tmp_path / "dangling")), "--dest",
                   "is a symbolic link to a path that does not exist")  # fmt: skip
    if os.geteuid() != 0:
        pytest.fail("the tests run as root (as `make test` does), to mount a read-only file system")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], check=True)
    try:
        assert_refused(install(store, "--dest", str(read_only / "configs")), "--dest",
                       "(on the way to")  # fmt: skip
        assert "is on a read-only file system" in install(store, "--dest", str(read_only)).stderr
    finally:
        subprocess.run(["umount", str(read_only)], check=True)


def test_dest_given_in_the_environment_is_named_as_its_variable(store: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    result = infantry("install", "--source", store.as_uri(), env={"INFANTRY_DEST": str(afile)})
    assert_refused(result, "INFANTRY_DEST", "give a directory")


@pytest.mark.parametrize("option", ["--ca-file", "--bearer-token-file", "--client-cert"])
def test_files_that_must_exist(store: Path, tmp_path: Path, option: str) -> None:
    extra = ["--client-key", str(tmp_path / "key.pem")] if option == "--client-cert" else []
    result = install(store, "--dest", str(tmp_path / "D"), option, "/nonexistent", *extra)
    assert_refused(result, option, "no such file or directory; give the path of")
    assert not (tmp_path / "D").exists()


def test_a_directory_is_not_a_ca_file(store: Path, tmp_path: Path) -> None:
    result = install(store, "--dest", str(tmp_path / "D"), "--ca-file", str(tmp_path))
    assert_refused(result, "--ca-file", "is not a regular file")


def test_a_per_source_file_in_the_config_file_is_checked_too(store: Path, tmp_path: Path) -> None:
    config = tmp_path / "infantry.yaml"
    config.write_text(f"sources:\n  - url: {store.as_uri()}\n    ca_file: /nonexistent/ca.pem\n")
    result = infantry("install", "--config", str(config), "--dest", str(tmp_path / "D"))
    assert_refused(result, "source #1: ca-file", "/nonexistent/ca.pem")


def test_a_bad_etcd_endpoint_list_is_refused_with_one_line(tmp_path: Path) -> None:
    result = infantry("install", "--source", "etcd://h1,h2:2379/app", "--dest", str(tmp_path / "D"))
    assert_refused(result, "--source", "no port for 'h1'")
    result = infantry("install", "--source", "etcd://h1:2379,h1:2379/app", "--dest", str(tmp_path / "D"))
    assert_refused(result, "--source", "endpoint h1:2379 is given twice")


def test_a_missing_fallback_is_refused_before_trying_the_source(tmp_path: Path) -> None:
    started = time.monotonic()
    result = infantry(
        "install",
        "--source",
        f"http://127.0.0.1:{closed_port()}/app.yaml",
        "--dest",
        str(tmp_path / "D"),
        "--timeout",
        "20",
        "--fallback",
        str(tmp_path / "baked"),
    )
    assert_refused(result, "--fallback", "give a directory, baked into the image")
    assert time.monotonic() - started < 15, "the source was tried until --timeout"
    (tmp_path / "baked").write_text("")
    result = infantry(
        "install", "--source", "file:///x", "--dest", str(tmp_path / "D"), "--fallback", str(tmp_path / "baked")
    )
    assert_refused(result, "--fallback", "is not a directory")


def test_check_program_is_found_before_anything_is_fetched(store: Path, tmp_path: Path) -> None:
    dest = tmp_path / "D"
    assert_refused(install(store, "--dest", str(dest), "--check", "/nonexistent/validator"), "--check", "cannot be run")
    assert_refused(
        install(store, "--dest", str(dest), "--check", "no-such-validator-anywhere --strict"),
        "--check",
        "is not found in PATH",
    )
    script = tmp_path / "validate"
    script.write_text("#!/bin/sh\nexit 0\n")
    assert_refused(install(store, "--dest", str(dest), "--check", str(script)), "--check", "not an executable file")
    assert_refused(install(store, "--dest", str(dest), "--check", "'unclosed"), "--check", "check its quotes")
    assert not dest.exists()
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    assert install(store, "--dest", str(dest), "--check", str(script)).returncode == 0


def test_check_program_resolves_through_path_like_the_runner(store: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "my-validator"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = infantry(
        "install", "--source", store.as_uri(), "--dest", str(tmp_path / "D"), "--check", "my-validator", env=env
    )
    assert result.returncode == 4, result.stderr  # found, ran, and refused the set


def test_watch_checks_its_hook_programs_at_start(store: Path, tmp_path: Path) -> None:
    for option in ("--exec", "--verify-cmd", "--check"):
        result = infantry(
            "watch", "--source", store.as_uri(), "--dest", str(tmp_path / "D"), option, "/nonexistent/hook", timeout=30
        )
        assert_refused(result, option, "cannot be run")


@pytest.mark.parametrize(
    ("value", "hint"),
    [("999", "digits 0 to 7"), ("0o8", "digits 0 to 7"), ("", "like 0644"), ("0200", "readable by its owner")],
)
def test_file_mode(store: Path, tmp_path: Path, value: str, hint: str) -> None:
    assert_refused(install(store, "--dest", str(tmp_path / "D"), "--file-mode", value), "--file-mode", hint)


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-1", "0"])
def test_durations_are_positive_and_finite(value: str) -> None:
    with pytest.raises(SettingsError, match="--timeout: "):
        load_settings({"timeout": value}, {})
    with pytest.raises(SettingsError, match="--wait: "):
        load_settings({"wait": value if value not in ("-1", "0") else f"5:{value}"}, {})


# --- config files (item 11) ---------------------------------------------------------------------


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "infantry.yaml"
    path.write_text(text)
    return path


def from_file(tmp_path: Path, text: str) -> dict[str, object]:
    settings = load_settings({"config": str(config(tmp_path, text))}, {})
    return dict(settings)


def test_config_scalars_are_read_as_yaml_1_2(tmp_path: Path) -> None:
    values = from_file(tmp_path, "wait: 1:5\nprocess: on\nusername: no\ncpu: yes\nimage: 2001-12-14\n")
    assert values["wait"] == Wait(1, 5)
    assert (values["process"], values["username"], values["cpu"], values["image"]) == ("on", "no", "yes", "2001-12-14")
    assert from_file(tmp_path, "install_only: true\ninterval: 1.5\n")["install_only"] is True


@pytest.mark.parametrize("text", ['file_mode: "644"', "file_mode: '0644'", 'file-mode: "0o644"'])
def test_config_file_mode_as_an_octal_string(tmp_path: Path, text: str) -> None:
    assert from_file(tmp_path, text + "\n")["file_mode"] == 0o644


@pytest.mark.parametrize("text", ["file_mode: 644", "file_mode: 0644", "file_mode: 0o644"])
def test_config_file_mode_as_a_number_is_refused_saying_to_quote_it(tmp_path: Path, text: str) -> None:
    path = config(tmp_path, text + "\n")
    with pytest.raises(SettingsError) as caught:
        load_settings({"config": str(path)}, {})
    assert str(caught.value) == f'{path}: file_mode: give it as an octal string, e.g. "0644" (quoted)'


def test_config_unknown_key_names_the_file_and_offers_the_closest(tmp_path: Path) -> None:
    path = config(tmp_path, "intervall: 5\n")
    with pytest.raises(SettingsError) as caught:
        load_settings({"config": str(path)}, {})
    assert str(caught.value) == f"{path}: unknown key 'intervall'; did you mean 'interval'?"
    path.write_text("sources:\n  - url: file:///x\n    ca-fil: /ca.pem\n")
    with pytest.raises(SettingsError, match=r"unknown key 'ca-fil' in source #1; did you mean 'ca-file'\?"):
        load_settings({"config": str(path)}, {})


def test_config_yaml_error_is_one_line_with_line_and_column(tmp_path: Path) -> None:
    path = config(tmp_path, "interval: 5\nsource: [unclosed\n")
    with pytest.raises(SettingsError) as caught:
        load_settings({"config": str(path)}, {})
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML at line 3, column 1: "), message
    assert "\n" not in message
    path.write_text("a: 1\n\tb: 2\n")
    with pytest.raises(SettingsError, match=r"at line 2, column 1: found character '\\t'"):
        load_settings({"config": str(path)}, {})


def test_config_error_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    path = config(tmp_path, "wait: [1,\n  2\ninterval: {\n")
    result = infantry("install", "--config", str(path), "--dest", str(tmp_path / "D"))
    assert_refused(result, str(path), "not valid YAML at line")
    path.write_text("dest: /configs\nwatch_timout: 5\n")
    assert_refused(infantry("watch", "--config", str(path)), str(path), "did you mean 'watch-timeout'?")
    path.write_bytes(b"interval: \xff\n")
    assert_refused(infantry("install", "--config", str(path)), str(path), "not UTF-8")


def test_config_value_errors_name_the_file(tmp_path: Path) -> None:
    path = config(tmp_path, "interval: -1\n")
    with pytest.raises(SettingsError, match=f"^{path}: interval: Input should be greater than 0$"):
        load_settings({"config": str(path)}, {})


def test_config_aliases_of_collections_are_refused(tmp_path: Path) -> None:
    path = config(tmp_path, "source: &s [file:///x]\nheader: *s\n")
    with pytest.raises(SettingsError, match="aliases of lists or mappings are not accepted"):
        load_settings({"config": str(path)}, {})


# --- secrets in messages (item 4) ---------------------------------------------------------------


@pytest.mark.parametrize("option", ["--reload-url", "--verify-url"])
@pytest.mark.parametrize(
    "url", [f"ftp://u:{SECRET}@h/x", f"http://h:99999/x?token={SECRET}", f"https://u:{SECRET}@/x", f"http://[{SECRET}/"]
)
def test_rejected_reload_urls_never_echo_a_password(store: Path, tmp_path: Path, option: str, url: str) -> None:
    result = infantry("watch", "--source", store.as_uri(), "--dest", str(tmp_path / "D"), option, url)
    assert result.returncode == 2, result.stderr
    assert f"{option}: " in result.stderr
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "url",
    [
        f"gopher://u:{SECRET}@h/x",
        f"etcd://u:{SECRET}@h1:2379,h2/app",
        f"http://u:{SECRET}@h:port/x",
        f"etcd://u:{SECRET}@h/app?x={SECRET}",
        f"file://u:{SECRET}@host/x",
    ],
)
def test_rejected_source_urls_never_echo_a_password(url: str) -> None:
    with pytest.raises(SettingsError, match="--source #1: ") as caught:
        load_settings({"source": [url]}, {})
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        f"reload_url: {{user: {SECRET}}}\n",
        f"verify_url: [{SECRET}]\n",
        f"header: [{{X-Key: {SECRET}}}]\n",
        f'header: ["X-Key: {SECRET}\\x01"]\n',
        f"sources:\n  - url: http://h/x\n    headers: {{X-Key: [{SECRET}]}}\n",
        f'sources:\n  - url: http://h/x\n    headers: {{X-Key: "{SECRET}\\r\\n"}}\n',
        f"sources:\n  - {{url: [http://u:{SECRET}@h/x]}}\n",
        f"sources: http://u:{SECRET}@h:port/x\n",
        f"username: [{SECRET}]\n",
    ],
)
def test_pydantic_never_quotes_a_secret_from_a_config_file(tmp_path: Path, text: str) -> None:
    path = config(tmp_path, text)
    with pytest.raises(SettingsError) as caught:
        load_settings({"config": str(path)}, {})
    assert SECRET not in str(caught.value)
    assert str(path) in str(caught.value)


def test_redact_url_survives_urls_that_do_not_parse() -> None:
    assert SECRET not in redact_url(f"http://[{SECRET}/x")
    assert redact_url(f"https://me:{SECRET}@h:8443/p?k={SECRET}") == "https://me:***@h:8443/p?***"
    assert redact_url(f"https://{SECRET}@h/p") == "https://***@h/p"  # a token given as the user name
    assert redact_url(f"https://me%3A{SECRET}@h/p") == "https://***@h/p"
    assert redact_url("git+ssh://git@h/r.git") == "git+ssh://git@h/r.git"


def test_a_config_that_is_a_fifo_is_refused_at_once_not_waited_on(store: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    result = infantry("install", "--source", f"file://{store}", "--dest", str(tmp_path / "D"), "--config", str(fifo))
    assert_refused(result, "config", "not a regular file")


def test_a_reload_method_that_is_no_http_method_is_refused_at_start(store: Path, tmp_path: Path) -> None:
    result = infantry(
        "watch", "--source", f"file://{store}", "--dest", str(tmp_path / "D"),
        "--reload-url", f"http://127.0.0.1:{closed_port()}/reload", "--reload-method", "BAD METHOD",
    )  # fmt: skip
    assert_refused(result, "--reload-method", "HTTP method")
