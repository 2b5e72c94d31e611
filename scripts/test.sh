#!/usr/bin/env bash
# Install into .venv and run every check: ruff (lint + format) and the pytest suite (CPU, minutes).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gallery`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test
. scripts/_venv.sh
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest -q "$@"
