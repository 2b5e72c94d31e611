#!/usr/bin/env bash
# The long fuzzing runs (the default suite runs short, reproducible versions of the same tests):
# hypothesis into the decoder (random bytes; mutated DICOM: plain, RLE, deflated, encapsulated JPEG and
# JPEG 2000 frames; PNG and JPEG), then schemathesis against a real server. New random inputs each run.
#   bash bench/fuzz.sh [DECODER_EXAMPLES] [API_EXAMPLES]      (defaults 3000 and 150)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
CXR_REID_FUZZ_EXAMPLES=${1:-3000} "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_fuzz_decoder.py
CXR_REID_FUZZ_EXAMPLES=${2:-150} "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_api_contract.py
