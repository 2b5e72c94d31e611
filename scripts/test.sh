#!/usr/bin/env bash
# Install into .venv and run every check: ruff (lint + format) and the pytest suite (CPU, minutes).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gallery`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test
. scripts/_venv.sh

# Debian packages some tests need when missing: jq (scripts/demo.sh), chromium (/docs rendered offline),
# orthanc and orthanc-dicomweb (a real PACS for the DICOMweb tests, tests/orthanc.py).
missing=()
command -v jq >/dev/null || missing+=(jq)
command -v chromium >/dev/null || missing+=(chromium)
command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "test.sh: ${missing[*]} missing and not installable here (needs root and apt-get); the tests that use them are skipped" >&2
    fi
fi
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/python" -m pytest -q "$@"
