"""The probe profile end to end (issue #24 item 4): requests labelled on the embedded pair
by ``archroute label`` (which records the probe), a probe artifact from ``archroute train
--probe``, a real ``archroute serve`` process with an ``archroute-probe`` profile, the
official openai SDK, and decision records that show the probe's features and its time."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from classifiers.probe import PROBE_FEATURES
from router.decision_log import read_log
from tests.router.servers import ROOT, reference_available, serve_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not reference_available(), reason="embedded reference pair "
                                 "not built yet")]

SENTENCES = (
    "The river rose slowly through the night and covered the lower fields.",
    "Farmers moved their animals to the hill behind the old church.",
    "A small boat drifted past the harbor lights before dawn.",
    "The library kept its rarest maps in a cold room under the stairs.",
    "Every winter the village held a market in the frozen square.",
    "She wrote the letter twice before she decided to send it.",
    "The engine coughed, stopped, and then started again with a roar.",
    "Children ran along the beach collecting shells and smooth stones.",
    "The bridge was closed for repairs until the end of the month.",
    "He planted tomatoes, beans and a row of bright sunflowers.",
    "The orchestra tuned their instruments while the hall filled up.",
    "A storm knocked out the power across the northern districts.",
)


def requests(seed: int, n: int) -> dict[str, list[dict]]:
    """Copy requests (the transformer's kind) and story continuations (the hybrid's), in the
    request-file format, two sources. On the chat-tuned pair "Write a short story that begins:
    <sentence>" is no longer the hybrid's kind (of 16 labelled: 8 hybrid, 6 transformer, 2 ties;
    the answer may restate the sentence); "Continue this story: <sentence>" is (16 of 16 hybrid,
    gap >= 0.17 nats/token)."""
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {"copy": [], "story": []}
    for i in range(n):
        a, b = rng.sample(SENTENCES, 2)
        out["copy"].append({"id": f"copy-{seed}-{i}", "source": "probe-test", "kind": "copy",
                            "messages": [{"role": "user", "content": f"Repeat exactly: {a} {b}"}],
                            "reference": f"{a} {b}"})
        c = rng.sample(SENTENCES, 3)
        out["story"].append({
            "id": f"story-{seed}-{i}", "source": "probe-test", "kind": "story",
            "messages": [{"role": "user", "content": f"Continue this story: {c[0]}"}],
            "reference": f"{c[1]} {c[2]} Nobody in the town could remember a day like it."})
    return out


def archroute(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=ROOT, check=True,
                   env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)


def test_probe_profile_on_the_embedded_pair(tmp_path: Path) -> None:
    files = []
    for name, rows in requests(0, 24).items():
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels, art = tmp_path / "labels.jsonl", tmp_path / "probe-artifact"
    archroute("label", "--requests", *map(str, files), "--out", str(labels), "--threads", "1",
              "--no-progress")
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert rows and all(set(r["probe"]) == set(PROBE_FEATURES) for r in rows)
    archroute("train", "--probe", "--labels", str(labels), "--out", str(art), "--seed", "0")
    meta = json.loads((art / "meta.json").read_text())
    assert set(PROBE_FEATURES) <= set(meta["feature_names"])

    dlog = tmp_path / "decisions.sqlite"
    router = serve_config({
        "decision_log": str(dlog), "torch_threads": 1, "probe_timeout_s": 60,
        "profiles": {"archroute-probe": {"policy": "probe",
                                         "policy_args": {"artifact": str(art)}}}}, tmp_path)
    try:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
        held_out = requests(1, 2)  # prompts the artifact was not trained on
        served: dict[str, set[str]] = {}
        for name, reqs in held_out.items():
            for r in reqs:
                raw = client.chat.completions.with_raw_response.create(
                    model="archroute-probe", messages=r["messages"], max_tokens=4,
                    temperature=0)
                assert raw.parse().choices[0].message.content is not None
                assert raw.headers["x-archroute-policy"] == "probe"
                assert float(raw.headers["x-archroute-probe-ms"]) > 0
                served.setdefault(name, set()).add(raw.headers["x-archroute-backend"])
        assert served == {"copy": {"reference-transformer"}, "story": {"reference-hybrid"}}
        metrics = httpx.get(router.url + "/metrics").text
    finally:
        router.stop()
    assert "archroute_probe_seconds_count 4.0" in metrics
    assert "archroute_probe_fallbacks_total{" not in metrics
    logged = read_log(dlog)
    assert len(logged) == 4
    for row in logged:
        feats = row["features"]
        assert row["policy"] == "probe" and feats["probe_ms"] > 0
        assert {"probe_gap", "probe_gap_repeat", "probe_loss_t", "probe_loss_h"} <= set(feats)
    assert sorted(row["decision"] for row in logged) == ["hybrid"] * 2 + ["transformer"] * 2
