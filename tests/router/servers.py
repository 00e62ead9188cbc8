"""Start ArchRoute servers as real subprocesses (uvicorn) on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m router.cli ARGS --port P`` (or another ``module``) until :meth:`stop`;
    ``url`` is its base URL."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 log_path: Path | None = None, module: str = "router.cli",
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
                    "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--port", str(self.port)],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 90.0) -> Server:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.args}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"server not up within {timeout_s} s: {self.proc.args}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def kill(self) -> None:
        """Die abruptly (SIGKILL), as a crashed server would."""
        self.proc.kill()
        self.proc.wait()


def reference_available() -> bool:
    ref = ROOT / "models" / "reference"
    return all((ref / a / "config.json").exists() for a in ("transformer", "hybrid"))


def serve_config(config: dict, tmp: Path) -> Server:
    """A real ``archroute serve`` process on ``config`` (written to ``tmp/router.yaml``),
    ready; its log in ``tmp/router.log``. Stop it with ``.stop()``."""
    import yaml

    (tmp / "router.yaml").write_text(yaml.safe_dump(config))
    return Server(["serve", "--config", str(tmp / "router.yaml")],
                  log_path=tmp / "router.log").wait_ready()


@contextmanager
def reference_engines():
    """The embedded pair as two real ``serve-model`` engines, ready: (transformer, hybrid)
    :class:`Server` objects, stopped afterwards."""
    t = Server(["serve-model", "reference:transformer", "--name", "ref-t", "--torch-threads", "1"])
    h = Server(["serve-model", "reference:hybrid", "--name", "ref-h", "--torch-threads", "1"])
    try:
        yield t.wait_ready(), h.wait_ready()
    finally:
        t.stop()
        h.stop()


# a request the chat-tuned pair's classifier sends to the hybrid: code generation with listed
# tests (MBPP mbpp-863, score 0.332 under the robust threshold 0.346; docs/classifier.md)
CODE_GEN = [{"role": "user", "content": (
    "Write a Python function for the following task.\n\nWrite a function to find the length "
    "of the longest sub-sequence such that elements in the subsequences are consecutive "
    "integers.\n\nIt should pass these assertions:\n```python\nassert find_longest_conseq_"
    "subseq([1, 2, 2, 3], 4) == 3\nassert find_longest_conseq_subseq([1, 9, 3, 10, 4, 20, 2], "
    "7) == 4\nassert find_longest_conseq_subseq([36, 41, 56, 35, 44, 33, 34, 92, 43, 32, 42], "
    "11) == 5\n```")}]
