"""A 2-minute smoke version of the reference pair's reproduce pipeline: corpus (stdlib
code only), tokenizer, both architectures for a few steps with the curriculum machinery,
export, and loading the result through HFBackend."""

import json

import pytest

from models.base import GenerationParams
from models.hf import HFBackend
from models.training import corpus, train_reference

pytestmark = pytest.mark.slow


def test_reproduce_pipeline_smoke(tmp_path):
    cdir, run, out = tmp_path / "corpus", tmp_path / "run", tmp_path / "ref"
    manifest = corpus.build(cdir, ["code"], tmp_path / "debs", max_mb=0.4)
    assert manifest["sources"]["code"]["train_docs"] > 0
    assert train_reference.main(["tokenizer", "--corpus", str(cdir), "--out", str(run),
                                 "--vocab", "300"]) == 0
    phases = tmp_path / "phases.json"
    phases.write_text(json.dumps([
        {"start": 0, "copy_share": 0.5, "synth_share": 0.2},
        {"start": 2, "copy_batch": {"size": 2, "len": 32, "span": [4, 8]},
         "qk_gain": 1.41421356, "reset_optimizer": True,
         "lr": {"kind": "interp", "from": 1e-3, "to": 1e-4, "until": 4}},
        {"start": 3, "batch_size": 1, "copy_batch": {"size": 2, "len": 64, "span": [4, 16],
                                                     "gap": 8, "natural": True},
         "lr": {"kind": "interp", "from": 1e-3, "to": 1e-4, "until": 4}},
    ]))
    common = ["--run", str(run), "--threads", "1", "--steps", "4", "--seq-len", "128",
              "--batch-size", "2", "--hidden", "32", "--heads", "2", "--intermediate", "64",
              "--eval-every", "2", "--ckpt-every", "2", "--eval-windows", "2",
              "--phases", str(phases)]
    for arch in ("transformer", "hybrid"):
        assert train_reference.main(["train", "--arch", arch, *common]) == 0
        rows = [json.loads(x) for x in (run / arch / "metrics.jsonl").read_text().splitlines()]
        assert {r["step"] for r in rows if "val" in r} >= {0, 2, 4}
        assert all(r["tokens"] > 0 for r in rows if "val" in r and r["step"] > 0)
    # resuming a finished run does nothing new and keeps the checkpoint
    assert train_reference.main(["train", "--arch", "hybrid", *common]) == 0
    assert train_reference.main(["export", "--run", str(run), "--out", str(out)]) == 0
    t = HFBackend("t", out / "transformer")
    h = HFBackend("h", out / "hybrid")
    assert (t.info().architecture, h.info().architecture) == ("transformer", "hybrid")
    assert t.context_length == 128
    r = h.generate("def f(x):", GenerationParams(max_tokens=4, temperature=0))
    assert r.completion_tokens <= 4
