#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
export HF_HUB_OFFLINE=1
exec .venv/bin/pytest "$@"
