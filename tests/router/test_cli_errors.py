"""The ``archroute`` command as a newcomer meets it (issue #27, item 10 and items 3, 5): no
silent abbreviations, errors as one line (the traceback with ``-v``), missing data named with
the command that makes it, and no default output path that overwrites a shipped artifact."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from router.cli import build_parser
from tests.router.servers import ROOT


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv", [["eval", "--suite", "real"], ["bench", "span", "--repeat", "3"],
                                  ["serve", "--conf", "x.yaml"]])
def test_abbreviations_are_refused(argv, capsys):
    """``--suite`` must not silently mean ``--suites`` (and start a full run)."""
    with pytest.raises(SystemExit) as exc:
        build_parser(argv).parse_args(argv)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_error_is_one_line_and_traceback_with_verbose():
    """An unreachable upstream: one clear line, not a 72-line traceback; -v shows it all."""
    spec = "http://127.0.0.1:9/v1#m"  # port 9 (discard): nothing listens
    r = run("generate", "--backend", spec, "hi", "--max-tokens", "2")
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("archroute generate: error:") and "unreachable" in lines[0]
    assert "-v" in lines[0]
    r = run("-v", "generate", "--backend", spec, "hi", "--max-tokens", "2")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_labels_name_the_command(tmp_path):
    missing = tmp_path / "real.jsonl"
    r = run("train", "--labels", str(missing), "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert "not found" in r.stderr and "archroute label --requests" in r.stderr
    assert "Traceback" not in r.stderr


def test_train_default_out_is_not_the_shipped_artifact():
    from classifiers.artifact import DEFAULT_DIR
    from classifiers.training.cli import DEFAULT_OUT

    args = build_parser(["train"]).parse_args(["train"])
    assert args.out is None  # resolved to DEFAULT_OUT when it runs
    assert (ROOT / DEFAULT_OUT).resolve() != DEFAULT_DIR.resolve()


@pytest.mark.slow
def test_pid_file_and_sighup(tmp_path):
    """docs/learning-loop.md's reload by signal: ``kill -HUP $(cat PID_FILE)`` reaches that
    router only; serve-model survives a SIGHUP (it used to die silently) and removes its pid
    file when stopped."""
    import signal
    import time

    import httpx

    from tests.router.servers import Server

    pid_file = tmp_path / "model.pid"
    server = Server(["serve-model", "fake", "--pid-file", str(pid_file)]).wait_ready()
    try:
        assert int(pid_file.read_text()) == server.proc.pid
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert server.proc.poll() is None, "serve-model died on SIGHUP"
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
    finally:
        server.stop()
    assert not pid_file.exists()
