#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
export HF_HUB_OFFLINE=1
# One test module per worker, so that a module's Ray, Prefect server and models start once.
exec .venv/bin/pytest --numprocesses 2 --dist loadfile "$@"
