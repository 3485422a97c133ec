#!/usr/bin/env bash
# Make .venv in the repository root when missing and install the project into it (again when
# pyproject.toml changed). Sourced by demo.sh and test.sh, so each README command sets itself up.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "blipdiff needs Python 3.11 or newer: '$python' was not found (set PYTHON=...)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "blipdiff needs Python 3.11 or newer; '$python' is $("$python" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$python" -m venv .venv; then
    rm -rf .venv
    echo "'$python -m venv' failed: on Debian or Ubuntu, install python3-venv first" >&2
    exit 1
  fi
fi

stamp=.venv/.blipdiff-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  pip=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
  "${pip[@]}" install --upgrade pip
  # The CPU build first, so that no dependency pulls a CUDA build; a torch already in .venv stays.
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    "${pip[@]}" install torch==2.13.0
  fi
  "${pip[@]}" install --editable .
  echo "$wanted" >"$stamp"
fi
# FiftyOne's bundled mongod needs OpenSSL 1.1 on Debian 12 and recent Ubuntu: provided inside .venv.
.venv/bin/python -m blipdiff.infra.mongodb
