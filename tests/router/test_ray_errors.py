"""``archroute serve --ray`` refuses what it cannot serve with one line, before anything
serves: the extra missing, a cluster that cannot be reached, replica counts below 1,
resources the cluster does not have, a taken port. Real ``archroute`` processes."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from router.rayserve.cluster import RayServeError, check_reachable, resource_problem
from router.settings import load_settings
from tests.router.servers import ROOT, free_port

FAKES = {"transformer": {"name": "t-fake", "kind": "fake"},
         "hybrid": {"name": "h-fake", "kind": "fake"}}
RULES = {"archroute-rules": {"policy": "rules"}}
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="the `ray` extra is not installed")


def serve_ray(tmp: Path, config: dict, env: dict[str, str] | None = None,
              timeout_s: float = 120) -> tuple[int, str, float]:
    """(exit code, stderr + stdout, seconds) of ``archroute serve --ray`` on ``config``."""
    (tmp / "r.yaml").write_text(yaml.safe_dump(config))
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    if env is None or "RAY_ADDRESS" not in env:
        full.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--ray", "--config",
                        str(tmp / "r.yaml"), "--port", str(free_port())],
                       cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout_s)
    return p.returncode, p.stderr + p.stdout, time.monotonic() - t0


def error_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if " ERROR " in ln or ln.startswith("archroute")]


def test_replicas_below_one_is_a_settings_error(tmp_path: Path) -> None:
    for over in ({"router_replicas": 0},
                 {"backends": {**FAKES, "transformer": {**FAKES["transformer"], "replicas": 0}}},
                 {"backends": {**FAKES, "hybrid": {**FAKES["hybrid"], "replicas": 2,
                                                   "max_replicas": 1}}},
                 {"ray": {"span_replicas": 0}}):
        code, out, _ = serve_ray(tmp_path, {"backends": FAKES, "profiles": RULES, **over})
        assert code == 2, out
        assert "invalid settings" in out and ("replicas" in out), out


@needs_ray
def test_unreachable_cluster_is_one_line_within_seconds(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, took = serve_ray(tmp_path, {"backends": FAKES, "profiles": RULES},
                                env={"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert code == 2, out
    assert took < 30  # Ray alone waits minutes for a cluster that is not there
    [line] = [ln for ln in error_lines(out) if "cannot be reached" in ln]
    assert f"127.0.0.1:{port}" in line


def test_check_reachable_forms() -> None:
    with pytest.raises(RayServeError, match="HOST:PORT"):
        check_reachable("no-port-here")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        check_reachable(f"ray://127.0.0.1:{srv.getsockname()[1]}")  # no error


def test_resource_problem_names_the_deployment() -> None:
    s = load_settings(overrides={"backends": {
        **FAKES, "transformer": {**FAKES["transformer"], "num_gpus": 1, "replicas": 2}}},
        environ={})
    why = resource_problem(s, {"CPU": 2.0}, [{"CPU": 2.0}])
    assert why is not None and "'transformer'" in why and "GPU" in why
    s = load_settings(overrides={"router_replicas": 3, "backends": {
        **FAKES, "hybrid": {**FAKES["hybrid"], "num_cpus": 1.5}}}, environ={})
    why = resource_problem(s, {"CPU": 2.0}, [{"CPU": 2.0}])
    assert why is not None and "need" in why and "CPU" in why and "hybrid 1 x 1.5" in why
    s = load_settings(overrides={"backends": FAKES}, environ={})
    assert resource_problem(s, {"CPU": 2.0}, [{"CPU": 2.0}]) is None


@pytest.mark.slow
@needs_ray
def test_resources_the_cluster_lacks_stop_the_start(tmp_path: Path) -> None:
    """A real local cluster of 1 CPU asked for a GPU: one line, the cluster stopped."""
    cfg = {"backends": {**FAKES, "transformer": {**FAKES["transformer"], "num_gpus": 1}},
           "profiles": RULES, "ray": {"num_cpus": 1}, "decision_log": ""}
    code, out, _ = serve_ray(tmp_path, cfg)
    assert code == 2, out
    [line] = [ln for ln in error_lines(out) if "GPU" in ln]
    assert "'transformer'" in line and "no node" in line


def test_ray_missing_is_one_line(tmp_path: Path) -> None:
    """Without the extra (``ray`` not importable): one line naming the extra."""
    (tmp_path / "ray").mkdir()  # a package named ray that fails to import, first on the path
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    code, out, _ = serve_ray(tmp_path, {"backends": FAKES, "profiles": RULES},
                             env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert code == 2, out
    [line] = [ln for ln in error_lines(out) if "archroute[ray]" in ln]
    assert "--ray needs Ray Serve" in line
