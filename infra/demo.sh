#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run the pipeline on the bundled sample.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec .venv/bin/blipdiff demo "$@"
