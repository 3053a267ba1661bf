"""The base images that docker/Dockerfile and docker/compose.yaml name, pulled or else stood in for.

The real images are tried first. Where no registry can be reached, a stand-in is built from Debian
packages with mmdebstrap, from this machine's own apt sources and apt settings (read here, at run time;
no mirror is written into the repository), imported, and tagged with exactly the name the files use.
Root filesystems are cached under ``~/.cache/infantry/base-images``, keyed by everything they are made
from, each beside its SHA-256, so a second run imports instead of building, and a damaged tarball is
built again rather than imported.

What each stand-in is, and how it differs from the real image, is in the README.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.docker_engine import DockerEngine, EngineError

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "infantry" / "base-images"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# apt settings of this machine that a build from its mirrors needs as well.
APT_SETTINGS = ("Acquire::Check-Valid-Until", "Acquire::Check-Date", "Acquire::http::Proxy", "Acquire::https::Proxy")

NGINX_CONF = """\
pid /tmp/nginx.pid;
worker_processes auto;
error_log /var/log/nginx/error.log notice;
events { worker_connections 1024; }
http {
    client_body_temp_path /tmp/client_temp;
    proxy_temp_path /tmp/proxy_temp;
    fastcgi_temp_path /tmp/fastcgi_temp;
    uwsgi_temp_path /tmp/uwsgi_temp;
    scgi_temp_path /tmp/scgi_temp;
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /var/log/nginx/access.log;
    server {
        listen 8080;
        location / { root /usr/share/nginx/html; index index.html; }
    }
}
"""


@dataclass(frozen=True)
class Recipe:
    """How to stand in for one image: Debian packages, then shell hooks run on the tree ($1), then
    the image settings (``docker import --change``) the real image has."""

    packages: tuple[str, ...]
    hooks: tuple[str, ...]
    changes: tuple[str, ...]
    host_files: tuple[Path, ...] = ()  # host files a hook copies in; their content is part of the key


RECIPES: dict[str, Recipe] = {
    # Debian's python3.11 with venv and pip, laid out like the official image: python, python3 and pip
    # in /usr/local/bin, pip free to install system-wide, and pip trusting this machine's CA bundle
    # (the bundle pip is given here, since the registry may be reached through an inspecting proxy).
    "python": Recipe(
        packages=("python3.11", "python3.11-venv", "python3-venv", "python3-pip", "ca-certificates"),
        hooks=(
            'ln -s /usr/bin/python3 "$1/usr/local/bin/python"',
            'ln -s /usr/bin/python3 "$1/usr/local/bin/python3"',
            'ln -s /usr/bin/pip3 "$1/usr/local/bin/pip"',
            'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
            f'cp {HOST_CA_BUNDLE} "$1/etc/ssl/certs/ca-certificates.crt"',
            f"printf '[global]\\ncert = {HOST_CA_BUNDLE}\\n' > \"$1/etc/pip.conf\"",
        ),
        changes=(
            "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
        ),
        host_files=(HOST_CA_BUNDLE,),
    ),
    # Debian's etcd-server and etcd-client, where the official image has them: /usr/local/bin.
    "quay.io/coreos/etcd": Recipe(
        packages=("etcd-server", "etcd-client"),
        hooks=(
            'ln -s /usr/bin/etcd "$1/usr/local/bin/etcd"',
            'ln -s /usr/bin/etcdctl "$1/usr/local/bin/etcdctl"',
        ),
        changes=(
            "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            'CMD ["/usr/local/bin/etcd"]',
            "EXPOSE 2379 2380",
        ),
    ),
    # Debian's nginx-light as the unprivileged image runs nginx: UID 101, port 8080, pid and temporary
    # files in /tmp, logs to the container's output; wget for the health check.
    "nginxinc/nginx-unprivileged": Recipe(
        packages=("nginx-light", "wget"),
        hooks=(
            "! grep -q '^[^:]*:[^:]*:101:' \"$1/etc/passwd\"",
            "echo 'nginx:x:101:101:nginx user:/nonexistent:/usr/sbin/nologin' >> \"$1/etc/passwd\"",
            "echo 'nginx:x:101:' >> \"$1/etc/group\"",
            'ln -sf /dev/stdout "$1/var/log/nginx/access.log"',
            'ln -sf /dev/stderr "$1/var/log/nginx/error.log"',
            f"printf '%s' '{NGINX_CONF}' > \"$1/etc/nginx/nginx.conf\"",
            'mkdir -p "$1/usr/share/nginx/html"',
            'echo "nginx stand-in" > "$1/usr/share/nginx/html/index.html"',
        ),
        changes=("USER 101", 'CMD ["nginx", "-g", "daemon off;"]', "EXPOSE 8080"),
    ),
}


def named_images() -> list[str]:
    """The images the Dockerfile builds from and the compose file runs, other than infantry's own."""
    names: list[str] = []
    text = DOCKERFILE.read_text()
    arguments = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    for base in re.findall(r"^FROM\s+(\S+)", text, re.M):
        base = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], base)
        if base not in names:
            names.append(base)
    for service in yaml.safe_load(COMPOSE.read_text())["services"].values():
        if "build" not in service and service["image"] not in names:
            names.append(service["image"])
    return names


def repository(name: str) -> str:
    return name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name


def _host_suite() -> str:
    release = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=(\S+)", release, re.M)
    if not match:
        raise EngineError("this machine's Debian release has no codename in /etc/os-release")
    return match.group(1).strip('"')


def _host_sources() -> list[Path]:
    files = [Path("/etc/apt/sources.list")] if Path("/etc/apt/sources.list").is_file() else []
    files += sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    files += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    return [f for f in files if f.read_text().strip()]


def _host_apt_options() -> list[str]:
    dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=True).stdout
    options = []
    for line in dump.splitlines():
        key, _, value = line.partition(" ")
        if key in APT_SETTINGS:
            options.append(f"{key} {value.rstrip(';')}")
    return options


@dataclass
class Outcome:
    name: str
    how: str  # "pulled", "built", or "cached"
    seconds: float


def ensure(engine: DockerEngine) -> list[Outcome]:
    """Make every named base image present in ``engine``: pulled, or a stand-in built or cached."""
    outcomes = []
    for name in named_images():
        started = time.monotonic()
        if engine.docker("pull", "--quiet", name, check=False, timeout=120).returncode == 0:
            outcomes.append(Outcome(name, "pulled", time.monotonic() - started))
            continue
        recipe = RECIPES.get(repository(name))
        if recipe is None:
            raise EngineError(f"{name} cannot be pulled, and there is no stand-in recipe for {repository(name)}")
        tarball, how = _root_filesystem(name, recipe)
        engine.docker("import", *[f"--change={c}" for c in recipe.changes], str(tarball), name, timeout=600)
        outcomes.append(Outcome(name, how, time.monotonic() - started))
    return outcomes


def _root_filesystem(name: str, recipe: Recipe) -> tuple[Path, str]:
    suite, sources, options = _host_suite(), _host_sources(), _host_apt_options()
    key = hashlib.sha256()
    for part in (name, suite, *recipe.packages, *recipe.hooks, *options):
        key.update(part.encode() + b"\0")
    for path in (*sources, *recipe.host_files):
        key.update(path.read_bytes() + b"\0")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    tarball = CACHE / f"{stem}-{key.hexdigest()[:16]}.tar"
    checksum = tarball.with_suffix(".sha256")
    if tarball.is_file() and checksum.is_file() and checksum.read_text().strip() == _sha256(tarball):
        return tarball, "cached"
    # Missing, or damaged (a disk that filled, a cut copy): build it again.
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial")
    command = [
        "mmdebstrap",
        "--mode=root",
        "--variant=essential",
        "--quiet",
        f"--include={','.join(recipe.packages)}",
        *[f"--aptopt={option}" for option in options],
        *[f"--customize-hook={hook}" for hook in recipe.hooks],
        "--format=tar",
        suite,
        str(partial),
        *[str(path) for path in sources],
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise EngineError(f"mmdebstrap could not build a stand-in for {name}:\n{result.stderr[-4000:]}")
    for old in (*CACHE.glob(f"{stem}-*.tar"), *CACHE.glob(f"{stem}-*.sha256")):
        old.unlink()
    partial.rename(tarball)
    checksum.write_text(_sha256(tarball) + "\n")
    return tarball, "built"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
