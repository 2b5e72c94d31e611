"""``scripts/cluster-demo.sh`` as a test: PostgreSQL, three replicas of the shipped model, a feed, a
replica killed mid-request and PostgreSQL restarted under load; it passes only when nothing
acknowledged was lost or stored twice and the replicas converged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.local_postgres import PostgresUnavailableError, bindir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cluster_demo_passes() -> None:
    try:
        bindir()
    except PostgresUnavailableError as exc:
        pytest.skip(str(exc))
    done = subprocess.run(
        [sys.executable, "scripts/cluster_demo.py", "--json", "--images", "16"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout)
    assert figures["lost"] == 0 and figures["stored_twice"] == 0
    assert figures["misfile_alert_on_replicas"] == 3
    assert len(set(figures["replica_images"])) == 1 and figures["replica_images"][0] == figures["stored"]
    assert figures["stored"] >= figures["acknowledged"]
