#!/usr/bin/env bash
# PostgreSQL + three replicas on loopback + a feed, with a replica killed and PostgreSQL restarted
# under load; exit 0 only when no acknowledged image was lost or stored twice and every replica
# converged (scripts/cluster_demo.py says what it does). Needs the test venv (bash scripts/test.sh
# --fast makes it) and Debian's postgresql.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-.venv}/bin/python" scripts/cluster_demo.py "$@"
