"""The ``real`` built-in suite (real requests from a request folder) and per-policy operating
thresholds (each policy's ``default_threshold()``, ``--threshold`` overriding it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.harness.builtin import REAL_PER_SOURCE, REQUESTS_ENV, load_builtin, real_suite
from evals.harness.config import EvalConfig
from evals.harness.evaluate import load_suite, run_eval
from evals.harness.results import EvalResult
from evals.harness.suites import SuiteError
from router.policies import Policy
from tests.evals.harness_fakes import planted_pair

FIX = Path(__file__).parent / "fixtures" / "harness"


def _row(i: int, src: str, kind: str, prompt: str, ref: str) -> dict:
    return {"id": f"{src}-{i:02d}", "source": src, "kind": kind,
            "messages": [{"role": "user", "content": prompt}], "reference": ref}


def _write_requests(folder: Path) -> Path:
    """Two tiny request files: ``alpha`` (5 rows, kind copy) and ``beta`` (3 rows, two kinds)."""
    folder.mkdir(parents=True, exist_ok=True)
    alpha = [_row(i, "alpha", "copy", f"repeat line {i}: the cat sat", f" the cat sat {i}")
             for i in range(5)]
    beta = [_row(i, "beta", "qa" if i else "chat", f"explain tides, part {i}", f" tides {i} rise")
            for i in range(3)]
    beta[2]["messages"] = [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "explain the moon"}]
    for name, rows in (("alpha", alpha), ("beta", beta)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows),
                                              encoding="utf-8")
    (folder / "README.md").write_text("not a request file\n")
    return folder


@pytest.fixture
def requests_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = _write_requests(tmp_path / "requests")
    monkeypatch.setenv(REQUESTS_ENV, str(folder))
    return folder


def test_real_suite_from_env_folder(requests_dir: Path) -> None:
    s = load_builtin("real", real_per_source=2)
    assert s.name == "real" and len(s) == 4
    assert s.domains() == {"alpha": 2, "beta": 2}
    assert str(requests_dir) in s.source
    ids = [r.id for r in s.requests]
    assert all(i.startswith(("alpha-", "beta-")) for i in ids)
    for r in s.requests:
        assert r.prompt is None and r.messages and r.messages[-1].role == "user"
        assert r.reference and r.metric is None
        assert r.kind == ("copy" if r.domain == "alpha" else ("chat" if r.id == "beta-00" else "qa"))
    files = {f["file"]: f for f in s.meta["files"]}
    assert set(files) == {"alpha.jsonl", "beta.jsonl"}
    assert all(len(f["sha256"]) == 64 and f["license"] for f in files.values())
    assert files["alpha.jsonl"]["rows"] == 5 and s.meta["per_source"] == 2


def test_real_suite_is_deterministic(requests_dir: Path) -> None:
    a, b = real_suite(per_source=3), real_suite(per_source=3)
    assert a.requests == b.requests and a.content_hash == b.content_hash
    assert real_suite(per_source=2).content_hash != a.content_hash
    everything = real_suite(per_source=100)  # more than a file holds: all of it, in file order
    assert [r.id for r in everything.requests] == [f"alpha-{i:02d}" for i in range(5)] + [
        f"beta-{i:02d}" for i in range(3)]
    conv = next(r for r in everything.requests if r.id == "beta-02")
    assert [m.role for m in conv.messages] == ["system", "user"]


def test_real_suite_env_may_name_one_file(requests_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv(REQUESTS_ENV, str(requests_dir / "beta.jsonl"))
    s = real_suite()
    assert s.domains() == {"beta": 3} and len(s.meta["files"]) == 1


def test_real_suite_missing_folder_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(REQUESTS_ENV, str(missing))
    with pytest.raises(SuiteError, match=REQUESTS_ENV) as err:
        load_suite("real", EvalConfig(suites=["real"]))
    assert str(missing) in str(err.value) and "missing" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(REQUESTS_ENV, str(empty))
    with pytest.raises(SuiteError, match=f"no \\*.jsonl.*{REQUESTS_ENV}"):
        real_suite()


def test_real_suite_refuses_a_broken_file(requests_dir: Path) -> None:
    with (requests_dir / "alpha.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"id": "alpha-99", "source": "alpha"}\n')
    with pytest.raises(SuiteError, match=r"alpha.jsonl:6: missing keys"):
        real_suite()


def test_real_suite_is_not_a_default() -> None:
    assert "real" not in EvalConfig().suites  # needs data outside the repository


def test_real_suite_eval_records_data_provenance(requests_dir: Path, tmp_path: Path) -> None:
    from evals.harness.report import render_markdown

    cfg = EvalConfig(suites=["real"], real_per_source=2, cache_dir=str(tmp_path / "cache"),
                     out=str(tmp_path / "out"), bootstrap=0, policies=["rules", "oracle"])
    res = run_eval(cfg, backends=planted_pair(), progress=False)
    assert res.suites[0].name == "real" and res.suites[0].n_scored == 4
    assert res.suites[0].domains == {"alpha": 2, "beta": 2}
    assert set(res.by_domain) == {"alpha", "beta"}
    assert res.provenance.seeds["real_suite"]
    files = res.provenance.data["real"]
    assert [f["file"] for f in files] == ["alpha.jsonl", "beta.jsonl"]
    res.save(tmp_path / "results.json")
    back = EvalResult.load(tmp_path / "results.json")
    assert back.provenance.data == res.provenance.data
    assert "data of real: alpha.jsonl" in render_markdown(back)


def test_default_request_folder_has_one_domain_per_file(monkeypatch) -> None:
    from classifiers.training.realdata import DEFAULT_DIR

    if not DEFAULT_DIR.is_dir() or not any(DEFAULT_DIR.glob("*.jsonl")):
        pytest.skip(f"the shared request folder {DEFAULT_DIR} is not here (set {REQUESTS_ENV} "
                    "or fetch the shared data to run this check)")
    monkeypatch.delenv(REQUESTS_ENV, raising=False)
    s = real_suite(per_source=1)
    stems = sorted(p.stem for p in DEFAULT_DIR.glob("*.jsonl"))
    assert sorted(s.domains()) == stems and set(s.domains().values()) == {1}
    assert "selfinstruct_user_eval" in s.domains()  # the eval-only file is in the suite
    assert s.meta["eval_only"] == ["selfinstruct_user_eval"]
    assert REAL_PER_SOURCE == EvalConfig().real_per_source == 40


# ---- per-policy thresholds -----------------------------------------------------------------

class _FixedScore(Policy):
    """Scores 0.6 on 'repeat' prompts and 0.4 otherwise; its own threshold is 0.7, so by
    default nothing goes to the transformer, while --threshold 0.5 sends the repeats."""

    name = "fixed-score"

    def score(self, req) -> float:
        return 0.6 if "repeat" in req.text else 0.4

    def default_threshold(self) -> float:
        return 0.7


@pytest.fixture
def fixed_policy(monkeypatch):
    from router import policies

    monkeypatch.setitem(policies._REGISTRY, "fixed-score", _FixedScore)
    return "fixed-score"


def _cfg(tmp_path: Path, **kw) -> EvalConfig:
    base = dict(suites=[str(FIX / "suite.jsonl")], cache_dir=str(tmp_path / "cache"),
                out=str(tmp_path / "out"), bootstrap=0,
                policies=["fixed-score", "always-transformer", "rules", "oracle"])
    base.update(kw)
    return EvalConfig(**base)


def test_policies_use_their_default_threshold(tmp_path: Path, fixed_policy: str) -> None:
    assert EvalConfig().threshold is None
    res = run_eval(_cfg(tmp_path), backends=planted_pair(), progress=False)
    fixed = res.policy(fixed_policy)
    assert fixed.threshold == pytest.approx(0.7)
    assert fixed.metrics["share_transformer"][0] == 0.0  # 0.6 < 0.7 everywhere
    assert res.policy("always-transformer").threshold == 0.5  # the base class default
    assert res.policy("oracle").threshold == 0.5
    assert res.policy("oracle").metrics["accuracy"][0] == 1.0


def test_threshold_override_applies_to_every_policy(tmp_path: Path, fixed_policy: str) -> None:
    res = run_eval(_cfg(tmp_path, threshold=0.5), backends=planted_pair(), progress=False)
    assert {p.name: p.threshold for p in res.policies} == {
        "fixed-score": 0.5, "always-transformer": 0.5, "rules": 0.5, "oracle": 0.5}
    assert res.policy(fixed_policy).metrics["share_transformer"][0] == pytest.approx(3 / 6)


def test_cli_threshold_and_report(tmp_path: Path, fixed_policy: str) -> None:
    from evals.harness.report import render_markdown
    from router.cli import main

    def run(out: Path, *extra: str) -> EvalResult:
        rc = main(["eval", "--suites", str(FIX / "suite.jsonl"), "--out", str(out),
                   "--bootstrap", "0", "--no-progress", "--policies", fixed_policy, "rules", "oracle",
                   "--cache-dir", str(tmp_path / "cache"), *extra])
        assert rc == 0
        return EvalResult.load(out / "results.json")

    own = run(tmp_path / "own")
    assert own.provenance.config["threshold"] is None
    assert own.policy(fixed_policy).threshold == pytest.approx(0.7)
    md = render_markdown(own)
    assert "each policy at its own default threshold" in md
    assert "| policy | threshold |" in md and "| fixed-score | 0.700 |" in md
    over = run(tmp_path / "over", "--threshold", "0.3")
    assert {p.threshold for p in over.policies} == {0.3}
    assert over.policy(fixed_policy).metrics["share_transformer"][0] == 1.0
    assert "threshold 0.30 for every policy" in render_markdown(over)


def test_cli_real_suite_missing_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    from router.cli import main

    monkeypatch.setenv(REQUESTS_ENV, str(tmp_path / "nowhere"))
    for extra in (["--out", str(tmp_path / "o")], ["--write-suites", str(tmp_path / "w")]):
        assert main(["eval", "--suites", "real", "--no-progress", "--policies", "rules",
                     "--cache-dir", str(tmp_path / "cache"), *extra]) == 2
        assert REQUESTS_ENV in capsys.readouterr().err
