"""``archroute bench route`` runs end to end (a real router on fake backends): it imports
helpers from the router-overhead bench, whose signatures once changed under it unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.router.servers import ROOT


@pytest.mark.slow
def test_bench_route_runs():
    r = subprocess.run([sys.executable, "-m", "router.cli", "bench", "route", "--requests", "3",
                        "--warmup", "1", "--lengths", "64"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "p50 ms" in r.stdout and "64" in r.stdout
