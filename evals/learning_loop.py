"""The learning loop measured on the embedded reference pair (docs/learning-loop.md):

    python -m evals.learning_loop --n 200

Starts ``archroute serve`` on the in-process reference pair with the decision log, prompts
logged and exploration (epsilon 0.2 on ``archroute-auto``, the classifier profile), replays ``--n`` real requests
from the label file (each answered with ``max_tokens`` 1: the answer is not what is
measured), posts each request's reference answer to ``POST /v1/feedback``, and waits for the
router to score them. Then it reports:

- how the router's live labels compare with ``archroute label``'s offline ones for the same
  requests on the same pair (the gap, nats/token);
- ``archroute eval --from-log`` on that log, against the exact values (both losses are known);
- the latency of ``POST /v1/feedback`` (a synchronous commit) and of ``POST /admin/reload``;
- with ``--train``, the time ``archroute train --from-log --labels FILE`` takes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from evals.bench.router_overhead import _port


def main(argv: list[str] | None = None) -> int:
    from classifiers.training.labels import require_labels
    from classifiers.training.realdata import EVAL_ONLY
    from evals.from_log import evaluate, report
    from router.decision_log import read_log

    ap = argparse.ArgumentParser(prog="python -m evals.learning_loop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default="data/labels/real.jsonl")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--epsilon", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", action="store_true",
                    help="also time `archroute train --from-log --labels` (the quick fit)")
    a = ap.parse_args(argv)
    try:
        labelled = require_labels(a.labels, latest_only=True)
    except FileNotFoundError as exc:
        raise SystemExit(f"python -m evals.learning_loop: {exc}") from None
    rows = [r for r in labelled
            if r["gap"] == r["gap"] and r["group"] not in EVAL_ONLY and not r.get("ref_cut")
            and not r.get("prompt_cut")]  # a cut prompt would be refused whole (400)
    rng = np.random.default_rng(a.seed)
    rows = [rows[i] for i in sorted(rng.choice(len(rows), min(a.n, len(rows)), replace=False))]
    tmp = Path(tempfile.mkdtemp(prefix="archroute-loop-"))
    db = tmp / "decisions.sqlite"
    port = _port()
    cfg = {"port": port, "decision_log": str(db), "log_prompts": True, "default_max_tokens": 1,
           "exploration_seed": a.seed, "feedback_queue_size": max(64, a.n),
           "profiles": {"archroute-auto": {"policy": "classifier", "epsilon": a.epsilon,
                                           "policy_args": {"operating_point": "quality"}}}}
    (tmp / "router.json").write_text(json.dumps(cfg))
    env = {**os.environ, "ARCHROUTE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = (tmp / "router.log").open("wb")
    # (JSON is YAML: the settings loader reads it)
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--config",
                             str(tmp / "router.json")], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the router did not start; see {tmp / 'router.log'}")
            time.sleep(0.2)
        sent: dict[str, dict] = {}
        fb_ms = []
        t0 = time.perf_counter()
        with httpx.Client(base_url=url, timeout=120) as c:
            for r in rows:
                # the classifier profile (``archroute`` itself is span decoding, issue #23)
                resp = c.post("/v1/chat/completions",
                              json={"model": "archroute-auto", "messages": r["messages"]})
                if resp.status_code != 200:
                    raise SystemExit(f"chat: {resp.status_code} {resp.text}")
                body = resp.json()
                t = time.perf_counter()
                res = c.post("/v1/feedback", json={"id": body["id"], "reference": r["reference"]})
                fb_ms.append((time.perf_counter() - t) * 1000)
                if res.status_code != 200:
                    raise SystemExit(f"feedback: {res.status_code} {res.text}")
                sent[body["id"]] = r
            served_s = time.perf_counter() - t0
            done: dict[str, dict] = {}
            while len(done) < len(sent):
                for rid in sent.keys() - done.keys():
                    label = c.get(f"/v1/feedback/{rid}").json()["label"]
                    if label["status"] != "queued":
                        done[rid] = label
                time.sleep(0.5)
            scored_s = time.perf_counter() - t0
            reload_s = []
            for _ in range(3):
                t = time.perf_counter()
                assert c.post("/admin/reload").status_code == 200
                reload_s.append(time.perf_counter() - t)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    ok = [rid for rid, lb in done.items() if lb["status"] == "done"]
    diff = np.array([done[rid]["gap"] - sent[rid]["gap"] for rid in ok])
    print(f"{len(rows)} real requests from {a.labels} replayed through the router in "
          f"{served_s:.0f} s; {len(ok)} references scored live (all done {scored_s:.0f} s "
          f"after the first request); {len(done) - len(ok)} failed")
    print(f"live gap - offline gap (archroute label, same pair): max |diff| "
          f"{np.abs(diff).max():.2e}, mean |diff| {np.abs(diff).mean():.2e} nats/token")
    print(f"POST /v1/feedback (reference, committed before the answer): p50 "
          f"{np.percentile(fb_ms, 50):.1f} ms, p99 {np.percentile(fb_ms, 99):.1f} ms")
    print(f"POST /admin/reload (the shipped artifact, strict self-check): "
          f"{', '.join(f'{s * 1000:.0f}' for s in reload_s)} ms")
    print()
    print(report(evaluate(read_log(db), reward="loss")))
    if a.train:
        t = time.perf_counter()
        done_ = subprocess.run([sys.executable, "-m", "router.cli", "train", "--from-log",
                                str(db), "--labels", a.labels, "--out", str(tmp / "retrained")],
                               env=env, capture_output=True, text=True)
        print(f"\narchroute train --from-log {db.name} --labels {a.labels}: "
              f"{time.perf_counter() - t:.0f} s (rc {done_.returncode})")
        print(done_.stdout[-2000:] or done_.stderr[-2000:])
    print(f"\nlog: {db}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
