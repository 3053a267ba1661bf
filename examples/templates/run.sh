#!/usr/bin/env bash
# The confd demo with infantry's templates: etcd keys become an nginx upstream; add and remove backends.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../../.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" "$here/pod.py"
