#!/usr/bin/env bash
# The infantry pod as plain processes: etcd, install, nginx, watch; change a key; see nginx reload.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../../.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" "$here/pod.py"
