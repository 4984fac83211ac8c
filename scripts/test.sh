#!/usr/bin/env bash
# The test command of the README: set up .venv if needed, then run the default test suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 "$@"
