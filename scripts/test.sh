#!/usr/bin/env bash
# Install into .venv and run every check: ruff (lint + format), the import rules (import-linter) and
# the pytest suite (CPU, minutes), spread over one pytest-xdist worker per core (at most 4;
# PYTEST_WORKERS=N overrides, 1 runs it in one process). `--fast`, as the first argument, runs only the
# quick tests: none marked slow, server, pacs, browser or install (pyproject.toml lists the markers),
# in one process, about a minute. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k gallery`,
# `bash scripts/test.sh --fast -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
FAST=0
if [ "${1:-}" = "--fast" ]; then
    FAST=1
    shift
fi
EXTRAS=test
. scripts/_venv.sh

# Debian packages some tests need when missing: jq (scripts/demo.sh), chromium (/docs rendered offline),
# orthanc and orthanc-dicomweb (a real PACS for the DICOMweb tests, tests/orthanc.py), postgresql (a
# private cluster for the PostgreSQL gallery, app/local_postgres.py). Not for --fast:
# none of its tests uses them.
missing=()
command -v jq >/dev/null || missing+=(jq)
command -v chromium >/dev/null || missing+=(chromium)
command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ "$FAST" = 0 ] && [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "test.sh: ${missing[*]} missing and not installable here (needs root and apt-get); the tests that use them are skipped" >&2
    fi
fi
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/lint-imports" --no-cache  # the import rules of ARCHITECTURE.md (pyproject.toml)
if [ "$FAST" = 1 ]; then
    exec "$VENV/bin/python" -m pytest -q -m "not slow and not server and not pacs and not browser and not install" "$@"
fi
# Whole test modules per worker (--dist loadfile), so a module's fixtures (a trained base model, a
# server, the PACS) are made once; each worker computes on one thread (tests/conftest.py).
WORKERS=${PYTEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
[ "$WORKERS" -le 4 ] || WORKERS=4
if [ "$WORKERS" -ge 2 ]; then
    exec "$VENV/bin/python" -m pytest -q -n "$WORKERS" --dist loadfile "$@"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
