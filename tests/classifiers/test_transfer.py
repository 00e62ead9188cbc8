"""Transfer to unseen sources (classifiers.training.train_router) and the hashed n-gram text model
(classifiers.textrep): thresholds, summaries, group folds, leave-one-source-out without
leakage, `train_real` end to end, and the text model's tokens and files."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest

from classifiers import artifact
from classifiers.features import FEATURE_NAMES, extract
from classifiers.request import RoutingRequest
from classifiers.textrep import N_BUCKETS, TEXT_CHARS, HashedTextModel, buckets, matrix, tokens
from classifiers.training import train_router as transfer
from classifiers.training.realdata import read_requests
from classifiers.training.train_router import (
    COST_BUDGET,
    SHIPPED,
    VARIANTS,
    RealRouter,
    group_folds,
    leave_one_source_out,
    make_router,
    quality_threshold,
    reliability,
    routing_request,
    routing_summary,
)

EVAL = "selfinstruct_user_eval"


@pytest.fixture()
def fast_bootstrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer bootstrap resamples inside leave-one-source-out / train_real (speed only)."""
    monkeypatch.setattr(transfer, "routing_summary",
                        functools.partial(transfer.routing_summary, n_boot=40))


# ---- quality_threshold ----------------------------------------------------------------------

def _mean_loss(t: float, p, lt, lh) -> float:
    return float(np.where(p >= t, lt, lh).mean())


def test_quality_threshold_picks_the_loss_minimising_cut() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
    # the transformer is better (lower loss) on the top three scores only
    lt = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    lh = np.array([2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    t = quality_threshold(p, lt, lh)
    assert 0.6 < t <= 0.7
    assert t == pytest.approx(0.65)  # the middle between the scores it separates
    np.testing.assert_array_equal(p >= t, [True] * 3 + [False] * 5)
    best = min(_mean_loss(c, p, lt, lh) for c in [0.0, *p, 1.01])
    assert _mean_loss(t, p, lt, lh) == pytest.approx(best) == pytest.approx(1.0)


def test_quality_threshold_is_a_brute_force_optimum_on_random_data() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(5, 40))
        p = np.round(rng.random(n), 1)  # with ties
        lt, lh = rng.random(n), rng.random(n)
        t = quality_threshold(p, lt, lh)
        cands = [0.0, *np.unique(p), 1.01]
        assert _mean_loss(t, p, lt, lh) == pytest.approx(min(_mean_loss(c, p, lt, lh)
                                                             for c in cands))
        # never cuts through a group of tied scores
        assert not np.any(p == t) or t == 0.0


def test_quality_threshold_respects_max_transformer() -> None:
    p = np.linspace(0.95, 0.05, 10)
    lt = np.array([1.0] * 8 + [2.0] * 2)  # the transformer wins on the top 8
    lh = np.array([2.0] * 8 + [1.0] * 2)
    assert (p >= quality_threshold(p, lt, lh)).sum() == 8
    for cap in (0.5, 0.3, 0.0):
        t = quality_threshold(p, lt, lh, max_transformer=cap)
        routed = p >= t
        assert routed.sum() <= cap * len(p)
        assert routed.sum() == int(cap * len(p))  # as many as allowed: each one helps
        assert routed[:routed.sum()].all()  # and the highest scores
    # a cap that does not bind changes nothing
    assert quality_threshold(p, lt, lh, max_transformer=1.0) == quality_threshold(p, lt, lh)


def test_quality_threshold_degenerate_cases() -> None:
    p = np.array([0.2, 0.7, 0.4, 0.9])
    ones, twos = np.ones(4), np.full(4, 2.0)
    # the transformer is better everywhere: all to the transformer
    assert quality_threshold(p, ones, twos) == 0.0
    # the hybrid is better everywhere: a threshold above every score
    t = quality_threshold(p, twos, ones)
    assert t > p.max() and not (p >= t).any()
    assert t <= 1.01
    # even at p = 1 (the largest possible score) nothing reaches it
    t1 = quality_threshold(np.array([1.0, 0.5]), np.full(2, 2.0), np.ones(2))
    assert t1 > 1.0
    # a cap of 0 with the transformer better everywhere: all hybrid
    assert (p >= quality_threshold(p, ones, twos, max_transformer=0.0)).sum() == 0
    # every score equal: only all-or-nothing is possible
    flat = np.full(4, 0.5)
    assert quality_threshold(flat, np.array([1.0, 1, 3, 1]), twos) == 0.0  # mean 1.5 < 2
    assert quality_threshold(flat, np.array([3.0, 3, 3, 1]), twos) > 0.5  # mean 2.5 > 2


# ---- routing_summary ------------------------------------------------------------------------

def _labels(n: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    gap = rng.normal(0.05, 0.3, n)  # lt - lh: negative = transformer better
    lh = 1.5 + rng.random(n)
    return gap, lh + gap, lh


def test_routing_summary_on_a_perfect_score() -> None:
    gap, lt, lh = _labels()
    p = 1.0 / (1.0 + np.exp(10 * gap))  # decreasing in the gap: ranks perfectly
    s = routing_summary(p, 0.5, gap, lt, lh, n_boot=100)
    assert s["auc"] == pytest.approx(1.0)
    assert s["accuracy"] == pytest.approx(1.0)
    assert s["recovered"] == pytest.approx(1.0)
    assert s["regret_vs_best"] <= 0
    assert s["loss"]["router"] == pytest.approx(s["loss"]["oracle"])
    assert s["loss"]["oracle"] <= min(s["loss"]["always_transformer"], s["loss"]["always_hybrid"])
    assert s["loss"]["random"] == pytest.approx((lt.mean() + lh.mean()) / 2)
    assert s["n"] == len(p) and s["n_decisive"] == int((np.abs(gap) > 0.05).sum())
    assert s["routed_transformer"] == pytest.approx((gap < 0).mean())
    assert s["auc_ci"][0] <= 1.0 <= s["auc_ci"][1] + 1e-12
    assert s["recovered_ci"][0] == pytest.approx(1.0) and s["recovered_ci"][1] == pytest.approx(1.0)
    assert s["regret_vs_best_ci"][1] <= 0


def test_routing_summary_on_a_constant_score() -> None:
    gap, lt, lh = _labels()
    best_is_t = lt.mean() <= lh.mean()
    p = np.full(len(gap), 0.5)
    s = routing_summary(p, 0.5 if best_is_t else 0.6, gap, lt, lh, n_boot=100)
    assert s["best_single"] == ("transformer" if best_is_t else "hybrid")
    assert s["auc"] == pytest.approx(0.5)
    assert s["recovered"] == pytest.approx(0.0)
    assert s["regret_vs_best"] == pytest.approx(0.0)


@pytest.mark.parametrize("best", ["transformer", "hybrid"])
def test_routing_summary_router_equal_to_the_best_single_backend(best: str) -> None:
    gap, lt, lh = _labels(seed=1)
    if (lt.mean() <= lh.mean()) != (best == "transformer"):
        lt, lh, gap = lh, lt, -gap
    route = np.full(len(gap), best == "transformer")
    s = routing_summary(np.random.default_rng(0).random(len(gap)), 0.5, gap, lt, lh,
                        n_boot=50, route=route)
    assert s["best_single"] == best
    assert s["regret_vs_best"] == pytest.approx(0.0, abs=1e-12)
    assert s["recovered"] == pytest.approx(0.0, abs=1e-12)
    assert s["regret_vs_best_ci"] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert s["routed_transformer"] == (1.0 if best == "transformer" else 0.0)


def test_routing_summary_is_deterministic_per_seed() -> None:
    gap, lt, lh = _labels()
    p = np.random.default_rng(5).random(len(gap))
    assert routing_summary(p, 0.5, gap, lt, lh, n_boot=50, seed=2) == \
        routing_summary(p, 0.5, gap, lt, lh, n_boot=50, seed=2)


# ---- group_folds ----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 4, 10])
def test_group_folds_keep_groups_whole_and_cover_every_row(k: int) -> None:
    rng = np.random.default_rng(k)
    names = np.array([f"src{i}/kind{i % 3}" for i in range(7)])
    groups = rng.choice(names, size=300, p=np.arange(1, 8) / 28)
    folds = group_folds(groups, k)
    assert len(folds) == min(k, len(np.unique(groups)))
    stacked = np.stack(folds)
    assert (stacked.sum(axis=0) == 1).all()  # every row in exactly one test fold
    for g in np.unique(groups):
        m = groups == g
        owners = {i for i, f in enumerate(folds) if f[m].any()}
        assert len(owners) == 1 and folds[owners.pop()][m].all()
    assert all(f.any() for f in folds)


def test_group_folds_balance_sizes() -> None:
    groups = np.array(["a"] * 40 + ["b"] * 30 + ["c"] * 20 + ["d"] * 10)
    sizes = sorted(int(f.sum()) for f in group_folds(groups, 2))
    assert sizes == [50, 50]


# ---- leave_one_source_out -------------------------------------------------------------------

SOURCES = ("dolly", "mbpp", "wikisplit", "xquad_en")


def _synthetic(n_per: int = 60, seed: int = 0, informative: bool = True,
               eval_rows: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Rows over four sources (+ an eval-only one). X: an informative column that sets the
    sign of the gap in every source, two columns that mostly say which source a row is, and
    a last column with the row's index (masked out of the model; for leak checks)."""
    rng = np.random.default_rng(seed)
    rows, X = [], []
    groups = [*[(g, n_per) for g in SOURCES], *([(EVAL, eval_rows)] if eval_rows else [])]
    for j, (g, n) in enumerate(groups):
        for i in range(n):
            x0 = rng.normal()
            if informative:
                gap = -0.3 * np.sign(x0) + rng.normal(0, 0.05) + 0.1 * (j - 1.5)
            else:
                gap = rng.choice([-0.3, 0.3]) + rng.normal(0, 0.05)
            lh = 1.0 + rng.random()
            idx = len(rows)
            rows.append({"id": f"{g}-{i}", "key": f"{g}-{i}", "group": g,
                         "kind": ("qa", "code")[i % 2], "gap": float(gap),
                         "loss_transformer": float(lh + gap), "loss_hybrid": float(lh),
                         "messages": [{"role": "user", "content": f"Request {i} of {g}."}]})
            X.append([x0, j + rng.normal(0, 0.3), rng.normal(j, 1.0), float(idx)])
    return np.array(X), rows


class Recorder(RealRouter):
    """A RealRouter that records which rows it was fitted on and which it predicted."""

    log: list[tuple[set[int], set[int]]] = []

    def fit(self, X, reqs, gap, lt, lh, groups, **kw):
        self.seen_ = {int(i) for i in X[:, -1]}
        self.units_ = set(groups)
        return super().fit(X, reqs, gap, lt, lh, groups, **kw)

    def predict_proba(self, X, reqs):
        Recorder.log.append((self.seen_, {int(i) for i in X[:, -1]}))
        return super().predict_proba(X, reqs)


def _recorder() -> Recorder:
    return Recorder(use_text=False, n_estimators=30,
                    feature_mask=np.array([True, True, True, False]))


def test_loso_never_trains_on_the_source_it_predicts(fast_bootstrap) -> None:
    X, rows = _synthetic(n_per=50, eval_rows=30)
    reqs = [routing_request(r) for r in rows]
    groups = np.array([r["group"] for r in rows])
    Recorder.log = []
    res = leave_one_source_out(X, reqs, rows, make_model=_recorder, progress=False)
    assert len(Recorder.log) == len(SOURCES) + 1  # one per source + one for the eval-only rows
    predicted: set[int] = set()
    eval_idx = set(np.flatnonzero(groups == EVAL).tolist())
    for seen, pred in Recorder.log:
        held_out = set(groups[sorted(pred)])
        assert len(held_out) == 1  # one whole source at a time
        assert not seen & set(np.flatnonzero(np.isin(groups, list(held_out))).tolist())
        assert not seen & eval_idx  # evaluation-only rows are never trained on
        if held_out == {EVAL}:  # ... and predicted by a model of every trainable source
            assert seen == set(range(len(rows))) - eval_idx
        else:
            assert seen == set(range(len(rows))) - eval_idx - pred
        predicted |= pred
    assert predicted == set(range(len(rows)))
    p = np.array(res["p"])
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    for prof in ("quality", "cost"):
        per = res[prof]["per_source"]
        assert set(per) == {*SOURCES, EVAL}
        assert per[EVAL]["eval_only"] and not any(per[g]["eval_only"] for g in SOURCES)
        assert per[EVAL]["n"] == 30
        # pooled: the trainable sources only
        assert res[prof]["pooled"]["n"] == len(SOURCES) * 50
        assert np.isfinite(res["threshold"][prof]).all()
    # the informative column transfers to every held-out source
    assert res["quality"]["pooled"]["auc"] > 0.9
    assert per[EVAL]["auc"] > 0.9
    for g in SOURCES:
        assert res["quality"]["per_source"][g]["auc"] > 0.85, g
    assert res["quality"]["pooled"]["recovered"] > 0.5
    # the cost profile never routes more than its budget in any fold (on the fold's own data
    # it is a cap; on the held-out source it holds only roughly)
    assert res["cost"]["pooled"]["routed_transformer"] <= COST_BUDGET + 0.15


def test_loso_on_noise_gives_chance_auc(fast_bootstrap) -> None:
    X, rows = _synthetic(n_per=60, informative=False, seed=4)
    reqs = [routing_request(r) for r in rows]
    res = leave_one_source_out(X[:, :3], reqs, rows, progress=False,
                               make_model=lambda: RealRouter(use_text=False, n_estimators=30))
    assert abs(res["quality"]["pooled"]["auc"] - 0.5) < 0.12


def test_eval_only_source_alone_is_predicted_not_trained(fast_bootstrap) -> None:
    X, rows = _synthetic(n_per=40, eval_rows=25, seed=7)
    reqs = [routing_request(r) for r in rows]
    Recorder.log = []
    res = leave_one_source_out(X, reqs, rows, make_model=_recorder, progress=False,
                               profiles=("quality",))
    assert "cost" not in res and set(res["threshold"]) == {"quality"}
    groups = np.array([r["group"] for r in rows])
    eval_idx = set(np.flatnonzero(groups == EVAL).tolist())
    fits_with_eval = [s for s, _ in Recorder.log if s & eval_idx]
    assert fits_with_eval == []
    assert sum(1 for _, pred in Recorder.log if pred == eval_idx) == 1
    assert np.isfinite(np.array(res["p"])[sorted(eval_idx)]).all()


def test_a_train_only_source_is_in_every_training_set_and_never_tested(fast_bootstrap) -> None:
    X, rows = _synthetic(n_per=40, seed=9)
    mix = SOURCES[0]  # stands for the synthetic mix: trained on, never held out or pooled
    reqs = [routing_request(r) for r in rows]
    groups = np.array([r["group"] for r in rows])
    mix_idx = set(np.flatnonzero(groups == mix).tolist())
    Recorder.log = []
    res = leave_one_source_out(X, reqs, rows, make_model=_recorder, progress=False,
                               profiles=("quality",), train_only=[mix])
    assert len(Recorder.log) == len(SOURCES) - 1
    for seen, pred in Recorder.log:
        assert mix_idx <= seen and not pred & mix_idx
    assert mix not in res["quality"]["per_source"]
    assert res["quality"]["pooled"]["n"] == 40 * (len(SOURCES) - 1)


def test_real_router_fit_and_thresholds() -> None:
    X, rows = _synthetic(n_per=50, seed=2)
    X = X[:, :3]
    reqs = [routing_request(r) for r in rows]
    gap = np.array([r["gap"] for r in rows])
    lt = np.array([r["loss_transformer"] for r in rows])
    lh = np.array([r["loss_hybrid"] for r in rows])
    units = np.array([f"{r['group']}/{r['kind']}" for r in rows])
    for kind in ("lightgbm", "logistic", "regressor"):
        m = RealRouter(use_text=False, n_estimators=30, kind=kind).fit(X, reqs, gap, lt, lh, units)
        assert set(m.thresholds_) == {"quality", "cost"}
        assert all(0.0 <= t <= 1.01 for t in m.thresholds_.values())
        assert m.oof_ is not None and m.oof_.shape == (len(rows),)
        assert (m.oof_ >= m.thresholds_["cost"]).mean() <= COST_BUDGET
        p = m.predict_proba(X, reqs)
        assert p.shape == (len(rows),) and ((p >= 0) & (p <= 1)).all()
        from sklearn.metrics import roc_auc_score

        assert roc_auc_score(gap < 0, p) > 0.9, kind
        assert (m.reg_ is not None) == (kind == "lightgbm")


def test_make_router_variants() -> None:
    for name, cfg in VARIANTS.items():
        m = make_router(name, seed=3)
        assert m.kind == cfg["kind"] and m.use_text == cfg["use_text"] and m.seed == 3
        assert m.feature_mask is not None and m.feature_mask.shape == (len(FEATURE_NAMES),)
        assert [n for n, k in zip(FEATURE_NAMES, m.feature_mask, strict=True) if k] == \
            [n for n in FEATURE_NAMES if n in cfg["features"]]
    assert SHIPPED in VARIANTS
    with pytest.raises(KeyError):
        make_router("nope")


def test_reliability_bins() -> None:
    p = np.array([0.05, 0.15, 0.15, 0.95, 1.0, 0.5])
    gap = np.array([0.3, 0.3, -0.3, -0.3, -0.3, 0.0])  # the last is a tie: not counted
    table = reliability(p, gap)
    assert sum(r["n"] for r in table) == 5
    by = {tuple(r["bin"]): r for r in table}
    assert by[(0.1, 0.2)]["observed"] == 0.5 and by[(0.1, 0.2)]["n"] == 2
    assert by[(0.9, 1.0)]["n"] == 2 and by[(0.9, 1.0)]["observed"] == 1.0  # p = 1 included


# ---- train_real end to end ------------------------------------------------------------------

COPYISH = (
    "Repeat the following sentence exactly: {s}",
    "Fix the bug in this function and return the corrected code:\n\ndef add(a, b):\n"
    "    return a - b  # {n}\n",
    "Extract the name mentioned in the text below.\n\n{s}",
    "Rewrite this sentence in the passive voice: {s}",
    "Split this sentence into two shorter sentences: {s}",
)
NOVEL = (
    "Write a short poem about {t}.",
    "Explain why {t} matters to people, in your own words.",
    "Give me some ideas for a weekend trip to {t}.",
    "What do you think about {t}? Tell me your opinion.",
    "Compose a friendly email inviting my team to talk about {t}.",
)
TOPICS = ("the sea", "winter mornings", "old libraries", "mountain towns", "city gardens",
          "trains at night", "the harbor", "a quiet village")
SENTENCES = ("The river rose slowly through the night and flooded the lower fields.",
             "Maria Lopez opened the bakery on Elm Street in 1998 with her brother.",
             "The committee approved the budget after a long and heated debate.",
             "Our cat sleeps on the warm windowsill every afternoon.")


def _real_rows(n: int = 300, eval_rows: int = 24, seed: int = 0) -> list[dict]:
    """Label rows as `archroute label --requests` writes them: copy-like instructions have
    the transformer better (negative gap), open-ended ones the hybrid, in every source."""
    rng = np.random.default_rng(seed)
    rows = []
    groups = [*[(g, n // len(SOURCES)) for g in SOURCES], (EVAL, eval_rows)]
    for g, k in groups:
        for i in range(k):
            copy = bool(rng.random() < 0.5)
            tmpl = (COPYISH if copy else NOVEL)[int(rng.integers(5))]
            text = tmpl.format(s=SENTENCES[int(rng.integers(len(SENTENCES)))], n=i,
                               t=TOPICS[int(rng.integers(len(TOPICS)))])
            msgs = [{"role": "user", "content": text}]
            if rng.random() < 0.2:
                msgs = [{"role": "user", "content": "Hello!"},
                        {"role": "assistant", "content": "Hi, how can I help?"}, *msgs]
            gap = (-0.25 if copy else 0.2) + rng.normal(0, 0.08)
            lh = 1.2 + rng.random()
            rows.append({"key": f"{g}:{i}", "id": f"{g}-{i:04d}", "group": g, "source": g,
                         "kind": "copy" if copy else "open", "pair": "fake-t/fake-h",
                         "messages": msgs, "gap": float(gap), "loss_transformer": float(lh + gap),
                         "loss_hybrid": float(lh)})
    return rows


def _no_nan(text: str):
    def refuse(token: str):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def _train_real(tmp, rows: list[dict], **variant) -> tuple[dict, list[RealRouter]]:
    """`train_real` with the shipped variant (its settings overridden by ``variant``), few
    bootstrap resamples and inner folds; returns the results and every model it made (the
    last one ships)."""
    reqdir = tmp / "requests"
    reqdir.mkdir()
    for g in (*SOURCES, EVAL, "unused_source"):
        line = {"id": f"{g}-0001", "source": g, "kind": "open_qa",
                "messages": [{"role": "user", "content": "Where does the river go?"}],
                "reference": "To the harbor."}
        (reqdir / f"{g}.jsonl").write_text(json.dumps(line) + "\n")
    assert len(read_requests([reqdir])) == len(SOURCES) + 2  # valid request files
    made: list[RealRouter] = []

    def recording_make_router(name: str, seed: int = 0) -> RealRouter:
        made.append(make_router(name, seed))
        return made[-1]

    mp = pytest.MonkeyPatch()
    mp.setattr(transfer, "routing_summary", functools.partial(transfer.routing_summary, n_boot=40))
    mp.setitem(transfer.VARIANTS, SHIPPED, {**VARIANTS[SHIPPED], **variant})
    mp.setattr(transfer, "INNER_FOLDS", 2)  # fewer text-model fits: speed only
    mp.setattr(transfer, "make_router", recording_make_router)
    try:
        res = transfer.train_real(rows, tmp / "artifact", tmp / "results" / "real.json",
                                  [str(reqdir)], variants=[SHIPPED], plots_dir=tmp / "plots",
                                  progress=False)
    finally:
        mp.undo()
    return res, made


@pytest.fixture(scope="module")
def trained_real(tmp_path_factory):
    """`train_real` on ~300 rows. The shipped variant as is, except its regularisation for
    thousands of rows (``min_child_samples`` 100: a fit on fewer than 200 decisive rows cannot
    split at all and predicts a constant) and fewer trees, so that it learns here, fast."""
    tmp = tmp_path_factory.mktemp("real")
    rows = _real_rows()
    res, made = _train_real(tmp, rows, min_child_samples=10, n_estimators=60)
    return tmp, rows, res, made


def test_train_real_writes_the_artifact(trained_real) -> None:
    tmp, rows, res, _ = trained_real
    art = tmp / "artifact"
    meta = json.loads((art / "meta.json").read_text())
    assert meta["format_version"] == artifact.FORMAT_VERSION
    th = meta["thresholds"]
    assert set(th) == {"quality", "cost", "risk-0.05", "risk-0.1", "risk-0.2"}
    assert th["risk-0.05"] <= th["risk-0.1"] <= th["risk-0.2"]  # more risk allowed: more hybrid
    assert all(0.0 <= v <= 1.01 for v in meta["thresholds"].values())
    assert meta["thresholds"] == res["thresholds"]
    uses_text = VARIANTS[SHIPPED]["use_text"]
    names = meta["feature_names"]
    assert (names[-1] == artifact.TEXT_FEATURE) == uses_text
    assert (art / "text_weights.npy").exists() == uses_text
    kind = VARIANTS[SHIPPED]["kind"]
    assert (art / "regressor.txt").exists() == (kind == "lightgbm")  # a regressor is stored once
    assert meta["regressor_is_classifier"] == (kind == "regressor")
    base = names[:-1] if uses_text else names
    assert base == [n for n in FEATURE_NAMES if n in VARIANTS[SHIPPED]["features"]]
    td = meta["training_data"]
    assert td["kind"] == "real requests" and len(td["sha256"]) == 64
    assert td["n_train"] == sum(r["group"] != EVAL for r in rows)
    files = {f["file"]: f for f in td["files"]}
    assert set(files) == {f"{g}.jsonl" for g in (*SOURCES, EVAL)}  # not the unused file
    assert all(len(f["sha256"]) == 64 and f["rows"] == 1 for f in files.values())
    assert files[f"{EVAL}.jsonl"]["eval_only"]
    assert meta["cost_budget_transformer_share"] == COST_BUDGET
    assert len(meta["self_check"]) == len(artifact.SELF_CHECK_PROMPTS)


def test_train_real_artifact_loads_and_reproduces_its_self_check(trained_real, caplog) -> None:
    tmp, rows, _, _ = trained_real
    with caplog.at_level(logging.WARNING, logger="classifiers.artifact"):
        clf = artifact.load(tmp / "artifact")
    assert not [r for r in caplog.records if "differ" in r.getMessage()]
    checks = clf.meta["self_check"]
    p = clf.predict_proba([RoutingRequest.from_prompt(c["prompt"]) for c in checks])
    np.testing.assert_allclose(p, [c["p_transformer"] for c in checks], rtol=0, atol=1e-9)
    assert clf.thresholds == clf.meta["thresholds"]
    assert (clf.text is not None) == VARIANTS[SHIPPED]["use_text"]
    # it learned the synthetic contrast: copy-like requests score higher than open ones
    reqs = [routing_request(r) for r in rows]
    y = np.array([r["kind"] == "copy" for r in rows])
    pp = clf.predict_proba(reqs)
    assert pp[y].mean() > pp[~y].mean() + 0.2
    # the model's inputs are the named columns of the full feature vector (+ the text logit),
    # whichever way the artifact computes them; named_features agrees with the batch path
    X = clf.features(reqs[:20])
    base = [n for n in clf.feature_names if n != artifact.TEXT_FEATURE]
    cols = [FEATURE_NAMES.index(n) for n in base]
    full = np.stack([extract(q) for q in reqs[:20]])
    np.testing.assert_allclose(X[:, :len(cols)], full[:, cols], rtol=0, atol=1e-12)
    if clf.text is not None:
        np.testing.assert_allclose(X[:, -1], clf.text.logits(reqs[:20]), rtol=0, atol=1e-12)
    row, named = clf.named_features(reqs[0])
    np.testing.assert_allclose(row, X[:1], rtol=0, atol=1e-12)
    assert list(named) == list(clf.feature_names)
    assert [named[n] for n in clf.feature_names] == pytest.approx(row[0].tolist(), abs=1e-12)


def _assert_artifact_matches_model(art, model: RealRouter, rows: list[dict]) -> None:
    clf = artifact.load(art)
    reqs = [routing_request(r) for r in rows]
    X = np.stack([extract(q) for q in reqs])
    np.testing.assert_allclose(clf.predict_proba(reqs), model.predict_proba(X, reqs),
                               rtol=0, atol=1e-9)
    if model.kind == "lightgbm":
        np.testing.assert_allclose(clf.predict_gap(reqs), model.predict_gap(X, reqs),
                                   rtol=0, atol=1e-9)
    assert clf.thresholds == model.thresholds_


def test_train_real_artifact_predicts_what_the_final_model_predicts(trained_real) -> None:
    tmp, rows, _, made = trained_real
    # one model per held-out source (+ the eval-only rows), the random split, the final fit
    assert len(made) == len(SOURCES) + 1 + 2
    _assert_artifact_matches_model(tmp / "artifact", made[-1], rows[::7])


def test_train_real_with_a_gap_regressor_ships_a_consistent_artifact(tmp_path) -> None:
    rows = _real_rows(n=200, eval_rows=0, seed=3)
    res, made = _train_real(tmp_path, rows, kind="regressor", use_text=False,
                            min_child_samples=10, n_estimators=40)
    final = made[-1]
    assert final.kind == "regressor"
    _assert_artifact_matches_model(tmp_path / "artifact", final, rows[::5])
    clf = artifact.load(tmp_path / "artifact")
    assert clf.text is None and clf.feature_names[-1] != artifact.TEXT_FEATURE
    # the score is minus the gap: the transformer-better (copy) rows score higher
    y = np.array([r["kind"] == "copy" for r in rows])
    p = clf.predict_proba([routing_request(r) for r in rows])
    assert p[y].mean() > p[~y].mean()
    assert res["leave_one_source_out"][SHIPPED]["quality"]["pooled"]["auc"] > 0.8


def test_train_real_writes_results_and_plot(trained_real) -> None:
    tmp, _, res, _ = trained_real
    path = tmp / "results" / "real.json"
    data = json.loads(path.read_text())
    assert list(data["leave_one_source_out"]) == [SHIPPED]
    shipped = data["leave_one_source_out"][SHIPPED]
    assert "p" not in shipped and "threshold" not in shipped
    for prof in ("quality", "cost"):
        assert set(shipped[prof]["per_source"]) == {*SOURCES, EVAL}
        assert shipped[prof]["per_source"][EVAL]["eval_only"]
    assert shipped["quality"]["pooled"]["auc"] > 0.8
    assert data["random_split"]["n"] > 0
    assert data["reliability"] and data["thresholds"] == res["thresholds"]
    md = path.with_suffix(".md").read_text()
    assert "Leave-one-source-out" in md and f"{EVAL} (eval only)" in md
    assert "pooled (trainable sources)" in md and "Random 80/20 split" in md
    png = tmp / "plots" / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_real_json_files_are_strict_json(trained_real) -> None:
    """No NaN/Infinity tokens: other tools (jq, JavaScript, ...) cannot read them."""
    tmp, _, _, _ = trained_real
    _no_nan((tmp / "results" / "real.json").read_text())
    _no_nan((tmp / "artifact" / "meta.json").read_text())


def test_no_nan_helper_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        _no_nan('{"a": NaN}')


# ---- textrep ------------------------------------------------------------------------------

def test_tokens_see_head_and_tail_of_the_last_user_turn() -> None:
    middle = " filler" * 200
    last = "Please summarise alpha beta." + middle + " Finish with omega zeta."
    req = RoutingRequest.from_messages([
        {"role": "user", "content": "earlier turn about giraffes"},
        {"role": "assistant", "content": "answer about elephants"},
        {"role": "user", "content": last}])
    toks = tokens(req)
    assert "h:please" in toks and "h:alpha_beta" in toks
    assert "t:omega" in toks and "t:omega_zeta" in toks
    assert "shape:long" in toks and "shape:turns3" in toks
    # only the last user turn's words, and nothing from its middle beyond the head/tail
    assert not any("giraffes" in t or "elephants" in t for t in toks)
    assert len(last) > 2 * TEXT_CHARS
    # a short turn is all head
    short = tokens(RoutingRequest.from_prompt("Write a poem with 12 lines"))
    assert "h:write_a" in short and "h:0" not in short and "h:lines" in short
    assert "h:with_0" in short  # digits are normalised
    assert not any(t.startswith("t:") for t in short)
    assert "shape:fenced" in tokens(RoutingRequest.from_prompt("fix:\n```\nx = 1\n```"))


def test_buckets_and_matrix() -> None:
    reqs = [RoutingRequest.from_prompt("Repeat this exactly: the cat sat."),
            RoutingRequest.from_prompt("Write a poem about the sea.")]
    b = buckets(reqs[0])
    assert b.dtype == np.int64 and (np.diff(b) > 0).all() and (b < N_BUCKETS).all()
    M = matrix(reqs)
    assert M.shape == (2, N_BUCKETS)
    np.testing.assert_array_equal(M[0].indices, b)
    assert set(M.data.tolist()) == {1.0}
    assert matrix([]).shape == (0, N_BUCKETS)


def _text_model() -> tuple[HashedTextModel, list[RoutingRequest]]:
    rows = _real_rows(n=80, eval_rows=0, seed=1)
    reqs = [routing_request(r) for r in rows]
    y = np.array([r["kind"] == "copy" for r in rows], int)
    return HashedTextModel().fit(reqs, y), reqs


def test_text_model_save_load_round_trip(tmp_path) -> None:
    m, reqs = _text_model()
    m.save(tmp_path / "w.npy")
    back = HashedTextModel.load(tmp_path / "w.npy")
    np.testing.assert_array_equal(back.logits(reqs), m.logits(reqs))
    assert back.bias == pytest.approx(m.bias, rel=1e-6)  # stored as float32, like the weights
    assert back.weights is not None and back.weights.dtype == np.float32
    # it learned the words
    y = np.array([bool(r.last_user.startswith(("Repeat", "Fix", "Extract", "Rewrite", "Split")))
                  for r in reqs])
    lg = m.logits(reqs)
    assert lg[y].min() > lg[~y].max()


def test_text_model_load_rejects_a_wrong_size_file(tmp_path) -> None:
    np.save(tmp_path / "short.npy", np.zeros(N_BUCKETS, np.float32))
    with pytest.raises(ValueError, match="expected"):
        HashedTextModel.load(tmp_path / "short.npy")
    np.save(tmp_path / "2d.npy", np.zeros((2, N_BUCKETS + 1), np.float32))
    with pytest.raises(ValueError):
        HashedTextModel.load(tmp_path / "2d.npy")


def test_artifact_refuses_a_text_file_mismatch(trained_real, tmp_path) -> None:
    import shutil

    tmp, _, _, _ = trained_real
    if not VARIANTS[SHIPPED]["use_text"]:
        pytest.skip("the shipped variant has no text model")
    art = tmp_path / "a"
    shutil.copytree(tmp / "artifact", art)
    np.save(art / "text_weights.npy", np.zeros(10, np.float32))  # wrong size
    with pytest.raises(artifact.ArtifactError, match="expected"):
        artifact.load(art)
    (art / "text_weights.npy").unlink()  # named in feature_names but missing
    with pytest.raises(artifact.ArtifactError, match="different features"):
        artifact.load(art)
    meta = json.loads((art / "meta.json").read_text())
    meta["feature_names"] = [*meta["feature_names"][:-1], "no_such_feature", "text_logit"]
    (art / "meta.json").write_text(json.dumps(meta))
    np.save(art / "text_weights.npy", np.zeros(N_BUCKETS + 1, np.float32))
    with pytest.raises(artifact.ArtifactError, match="different features"):
        artifact.load(art)


def test_artifact_save_refuses_unknown_features(tmp_path) -> None:
    from classifiers.training.estimators import LightGBMRouter

    X = np.random.default_rng(0).random((60, 2))
    r = LightGBMRouter(n_estimators=5, cv=0).fit(X, (X[:, 0] > 0.5).astype(int))
    with pytest.raises(artifact.ArtifactError, match="unknown features"):
        artifact.save(tmp_path / "x", r, feature_names=["chars_log", "bogus"])


def test_robust_threshold_keeps_every_source_within_tolerance() -> None:
    """Source A: the hybrid is better where p is low (routing pays); source B: the
    transformer wins everywhere by a lot, but B's scores sit just under 0.5. The
    expected-gap threshold (0.5) sends B's rows to the hybrid; the robust one must not."""
    from classifiers.training.train_router import REGRET_TOL, robust_threshold

    rng = np.random.default_rng(0)
    pa = rng.uniform(0.2, 0.9, 400)
    lt_a = np.full(400, 5.0)
    lh_a = np.where(pa < 0.5, 4.6, 5.4)
    pb = rng.uniform(0.40, 0.48, 100)
    lt_b, lh_b = np.full(100, 3.0), np.full(100, 3.5)
    p = np.concatenate((pa, pb))
    lt, lh = np.concatenate((lt_a, lt_b)), np.concatenate((lh_a, lh_b))
    src = np.array(["a"] * 400 + ["b"] * 100)

    def worst(t: float) -> float:
        lr = np.where(p >= t, lt, lh)
        return max(lr[src == s].mean() - min(lt[src == s].mean(), lh[src == s].mean())
                   for s in ("a", "b"))

    assert worst(0.5) > REGRET_TOL  # the expected-gap rule hurts source b
    t = robust_threshold(p, lt, lh, src)
    assert worst(t) <= REGRET_TOL
    lr = np.where(p >= t, lt, lh)
    assert lr[src == "a"].mean() < lt_a.mean()  # and still routes a's hybrid rows
