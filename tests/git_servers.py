"""Real git servers on loopback for the git source's tests: a repository to push to, ``git daemon``,
``git http-backend`` behind nginx and fcgiwrap (smart HTTP, basic auth and a bearer token), and sshd.

Each server's binary is required: its absence fails the test (``make test`` installs Debian's git,
nginx-light, fcgiwrap and openssh-server when run as root), never skips it.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import TlsFiles, free_port, port_open, require_binary, wait_until

GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "infantry tests",
    "GIT_AUTHOR_EMAIL": "tests@infantry.invalid",
    "GIT_COMMITTER_NAME": "infantry tests",
    "GIT_COMMITTER_EMAIL": "tests@infantry.invalid",
    "GIT_TERMINAL_PROMPT": "0",
}
HTTP_USER = "alice"
HTTP_PASSWORD = "g1t-wonderland"  # a test secret, listed in tests/secret_guard.py
HTTP_TOKEN = "g1t-sesame"


@dataclass(frozen=True)
class Link:
    """A symbolic link to put in a commit."""

    target: str


def git(*args: str, cwd: Path | None = None, stdin: bytes | None = None) -> str:
    """Run the git binary (the tests' own, never infantry's), failing the test on error."""
    binary = require_binary("git", "git")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", **GIT_ENV}
    result = subprocess.run(
        [binary, *args], cwd=cwd, input=stdin, capture_output=True, env=env, timeout=60, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode().strip()


class Repo:
    """A bare repository (what the servers serve) and a working clone that commits and pushes to it."""

    def __init__(self, root: Path, name: str = "repo.git") -> None:
        self.root = root
        self.bare = root / name
        self.work = root / f"{name}-work"
        root.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "--bare", "-b", "main", str(self.bare))
        git("config", "uploadpack.allowAnySHA1InWant", "true", cwd=self.bare)
        git("config", "http.receivepack", "false", cwd=self.bare)
        git("init", "-q", "-b", "main", str(self.work))
        git("remote", "add", "origin", str(self.bare), cwd=self.work)

    def commit(self, files: Mapping[str, str | bytes | Link], message: str = "change", branch: str = "main") -> str:
        """Make the tree exactly ``files`` in a new commit on ``branch`` and push it; its SHA."""
        git("checkout", "-q", "-B", branch, cwd=self.work)
        for entry in self.work.iterdir():
            if entry.name != ".git":
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for rel, content in files.items():
            path = self.work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Link):
                path.symlink_to(content.target)
            else:
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        git("push", "-q", "--force", "origin", f"{branch}:refs/heads/{branch}", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def force(self, branch: str, sha: str) -> None:
        """Point ``branch`` at ``sha`` on the server, whatever it pointed at before (a force-push)."""
        git("update-ref", f"refs/heads/{branch}", sha, cwd=self.bare)

    def delete(self, ref: str) -> None:
        git("update-ref", "-d", ref, cwd=self.bare)

    def tag(self, name: str, sha: str, *, annotated: bool = True) -> None:
        if annotated:
            git("tag", "-a", "-m", f"release {name}", name, sha, cwd=self.bare)
        else:
            git("tag", name, sha, cwd=self.bare)

    def raw_tree(self, entries: list[tuple[str, str, bytes]], branch: str = "main") -> str:
        """A commit whose root tree is made by hand (``(mode, name, content)``; for a gitlink, content is
        the commit it names), names git itself would refuse included; put on ``branch``. Its SHA."""
        lines = []
        for mode, name, content in entries:
            if mode == "160000":  # a gitlink (submodule): content is the commit it names
                lines.append(f"{mode} commit {content.decode()}\t{name}")
                continue
            sha = git("hash-object", "-w", "--stdin", cwd=self.bare, stdin=content)
            lines.append(f"{mode} blob {sha}\t{name}")
        tree = git("mktree", "--missing", cwd=self.bare, stdin=("\n".join(lines) + "\n").encode())
        commit = git("commit-tree", tree, "-m", "hand-made", cwd=self.bare)
        git("update-ref", f"refs/heads/{branch}", commit, cwd=self.bare)
        return commit

    def file_url(self, fragment: str = "") -> str:
        return f"git+file://{self.bare}" + (f"#{fragment}" if fragment else "")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_port(name: str, proc: subprocess.Popen[bytes], port: int, log: Path | None = None) -> None:
    deadline = time.monotonic() + 20
    while not port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            detail = log.read_text(errors="replace") if log is not None and log.exists() else ""
            pytest.fail(f"{name} did not start on port {port}: {detail}")
        time.sleep(0.02)


class GitDaemon:
    """``git daemon`` serving every repository under ``base`` on a loopback port (git://)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = require_binary("git", "git")
        self.log = self.base / "daemon.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GIT_ENV}
        self.proc = subprocess.Popen(
            [
                binary,
                "daemon",
                "--listen=127.0.0.1",
                f"--port={self.port}",
                f"--base-path={self.base}",
                "--export-all",
                "--reuseaddr",
                "--informative-errors",
                str(self.base),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
            env=env,
        )
        _wait_port("git daemon", self.proc, self.port, self.log)

    def url(self, name: str = "repo.git", fragment: str = "") -> str:
        return f"git+git://127.0.0.1:{self.port}/{name}" + (f"#{fragment}" if fragment else "")

    def stop(self) -> None:
        _stop(self.proc)
        wait_until("git daemon to release its port", lambda: not port_open(self.port), timeout=10)


class GitHttp:
    """``git http-backend`` behind nginx and fcgiwrap: smart HTTP at ``/open/``, with basic auth at
    ``/basic/`` and a bearer token at ``/bearer/``, every repository under ``base``."""

    def __init__(self, workdir: Path, base: Path, tls: TlsFiles | None = None) -> None:
        self.workdir = workdir
        self.base = base
        self.tls = tls
        self.port = free_port()
        self.tls_port = free_port() if tls is not None else None
        self.socket = workdir / "fcgiwrap.sock"
        self.nginx: subprocess.Popen[bytes] | None = None
        self.fcgi: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "htpasswd").write_text(f"{HTTP_USER}:{{PLAIN}}{HTTP_PASSWORD}\n")

    def _config(self) -> str:
        w = self.workdir
        user = "user root;" if os.geteuid() == 0 else ""
        backend = "/usr/lib/git-core/git-http-backend"
        fastcgi = f"""
            include_fastcgi_params;
            fastcgi_param SCRIPT_FILENAME {backend};
            fastcgi_param GIT_PROJECT_ROOT {self.base};
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param GIT_CONFIG_NOSYSTEM 1;
            fastcgi_param GIT_PROTOCOL $http_git_protocol;
            fastcgi_param PATH_INFO $1;
            fastcgi_param REMOTE_USER $remote_user;
            fastcgi_pass unix:{self.socket};
        """.replace(
            "include_fastcgi_params;",
            "\n".join(
                f"fastcgi_param {name} ${value};"
                for name, value in (
                    ("QUERY_STRING", "query_string"),
                    ("REQUEST_METHOD", "request_method"),
                    ("CONTENT_TYPE", "content_type"),
                    ("CONTENT_LENGTH", "content_length"),
                    ("REQUEST_URI", "request_uri"),
                    ("SERVER_PROTOCOL", "server_protocol"),
                    ("REMOTE_ADDR", "remote_addr"),
                )
            ),
        )
        return f"""
{user}
worker_processes 1;
daemon off;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format probe '$msec|$status|$request_method|$uri|$request_length|$bytes_sent';
    access_log {w}/access.log probe;
    client_body_temp_path {w}/tmp-body;
    proxy_temp_path {w}/tmp-proxy;
    fastcgi_temp_path {w}/tmp-fastcgi;
    uwsgi_temp_path {w}/tmp-uwsgi;
    scgi_temp_path {w}/tmp-scgi;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{self.port};
        location ~ ^/open(/.*)$ {{ {fastcgi} }}
        location ~ ^/basic(/.*)$ {{
            auth_basic "infantry git tests";
            auth_basic_user_file {w}/htpasswd;
            {fastcgi}
        }}
        location ~ ^/bearer(/.*)$ {{
            if ($http_authorization != "Bearer {HTTP_TOKEN}") {{ return 401; }}
            {fastcgi}
        }}
    }}{self._tls_server(fastcgi)}
}}
"""

    def _tls_server(self, fastcgi: str) -> str:
        if self.tls is None:
            return ""
        return f"""
    server {{
        listen 127.0.0.1:{self.tls_port} ssl;
        ssl_certificate {self.tls.server_cert};
        ssl_certificate_key {self.tls.server_key};
        location ~ ^/open(/.*)$ {{ {fastcgi} }}
    }}"""

    def start(self) -> None:
        nginx = require_binary("nginx", "nginx-light")
        fcgiwrap = require_binary("fcgiwrap", "fcgiwrap")
        require_binary("git", "git")
        if not Path("/usr/lib/git-core/git-http-backend").exists():
            pytest.fail("git http-backend is not installed; `make test` installs Debian's git when run as root")
        (self.workdir / "nginx.conf").write_text(self._config())
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **GIT_ENV}
        # In a session of its own: its workers are forked children, stopped with it as one group.
        fcgi = self.fcgi = subprocess.Popen(
            [fcgiwrap, "-c", "2", "-s", f"unix:{self.socket}"],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "fcgiwrap.log").open("wb"),
            env=env,
            start_new_session=True,
        )
        wait_until("fcgiwrap to listen", lambda: self.socket.exists() or fcgi.poll() is not None, timeout=20)
        if fcgi.poll() is not None:
            pytest.fail(f"fcgiwrap did not start: {(self.workdir / 'fcgiwrap.log').read_text()}")
        self.nginx = subprocess.Popen(
            [
                nginx,
                "-p",
                str(self.workdir),
                "-e",
                str(self.workdir / "error.log"),
                "-c",
                str(self.workdir / "nginx.conf"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "nginx.log").open("wb"),
        )
        _wait_port("nginx", self.nginx, self.port, self.workdir / "nginx.log")
        if self.tls_port is not None:
            _wait_port("nginx (TLS)", self.nginx, self.tls_port, self.workdir / "nginx.log")

    def url(self, area: str = "open", name: str = "repo.git", fragment: str = "", userinfo: str = "") -> str:
        at = f"{userinfo}@" if userinfo else ""
        return f"git+http://{at}127.0.0.1:{self.port}/{area}/{name}" + (f"#{fragment}" if fragment else "")

    def tls_url(self, name: str = "repo.git", fragment: str = "") -> str:
        return f"git+https://127.0.0.1:{self.tls_port}/open/{name}" + (f"#{fragment}" if fragment else "")

    def requests(self) -> list[list[str]]:
        """Every request nginx served: time, status, method, path, request bytes, response bytes."""
        log = self.workdir / "access.log"
        return [line.split("|") for line in log.read_text().splitlines()] if log.exists() else []

    def stop(self) -> None:
        _stop(self.nginx, signal.SIGQUIT)
        if self.fcgi is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.fcgi.pid, signal.SIGTERM)  # the workers too, not only the process started
        _stop(self.fcgi)
        wait_until("nginx to release its port", lambda: not port_open(self.port), timeout=10)


class Sshd:
    """An OpenSSH server on a loopback port that lets in one key, for ``git+ssh://``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.host_key = workdir / "host_key"
        self.client_key = workdir / "client_key"
        self.other_key = workdir / "other_key"
        self.known_hosts = workdir / "known_hosts"
        self.wrong_known_hosts = workdir / "wrong_known_hosts"
        self.user = getpass.getuser()

    def start(self) -> None:
        sshd = require_binary("sshd", "openssh-server")
        keygen = require_binary("ssh-keygen", "openssh-client")
        require_binary("ssh", "openssh-client")
        for key in (self.host_key, self.client_key, self.other_key):
            if not key.exists():
                subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
        host_public = (self.workdir / "host_key.pub").read_text().split()
        other_public = (self.workdir / "other_key.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_public[0]} {host_public[1]}\n")
        self.wrong_known_hosts.write_text(f"[127.0.0.1]:{self.port} {other_public[0]} {other_public[1]}\n")
        authorized = self.workdir / "authorized_keys"
        authorized.write_text((self.workdir / "client_key.pub").read_text())
        authorized.chmod(0o600)
        config = self.workdir / "sshd_config"
        config.write_text(
            f"""
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.workdir}/sshd.pid
AuthorizedKeysFile {authorized}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowUsers {self.user}
AcceptEnv GIT_PROTOCOL
LogLevel ERROR
"""
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        self.log = self.workdir / "sshd.log"
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=self.log.open("wb")
        )
        _wait_port("sshd", self.proc, self.port, self.log)

    def url(self, repo: Path, fragment: str = "") -> str:
        return f"git+ssh://{self.user}@127.0.0.1:{self.port}{repo}" + (f"#{fragment}" if fragment else "")

    def stop(self) -> None:
        _stop(self.proc)
        wait_until("sshd to release its port", lambda: not port_open(self.port), timeout=10)
