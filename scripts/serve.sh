#!/usr/bin/env bash
# Install into .venv and serve the shipped default model with a gallery in ./cxr-reid-data.
# Extra arguments go to `cxr-reid serve`, e.g. `bash scripts/serve.sh --port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=serve
. scripts/_venv.sh
exec "$VENV/bin/cxr-reid" serve "$@"
