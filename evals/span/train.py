"""Training the learned span gate (:mod:`models.span.learned`) on per-token scores.

Target: ``d = log p_T(true token) - log p_H(true token)`` (nats), clipped to ``±CLIP``; the
gate regresses it (a small LightGBM ensemble exported to plain trees, :func:`fit_trees`, the
default; or ridge, :func:`fit_weights`), so its score estimates how much better the
transformer will predict the next token, and choosing the transformer when the score is
positive minimises the expected loss. Each source weighs the same in the fit
(:func:`source_weights`). The variants measured leave-one-source-out are in docs/span.md.

Features depend on the gate's own past decisions (the last role, the entropy of the model
that produced the last token), so training rolls out: round 0 collects features along the
roles of ``copy-2``, each later round along the roles of the gate fitted so far, and fits on
everything collected (DAgger-style). The threshold is the one that minimises the pooled loss
of the last round's rollout on the training data (a sort and a cumulative sum).

Data (:func:`evals.span.run.training_seqs`): the real suite's trainable files and requests
cut from the reference corpus's train split (``corpus-train:<domain>``, one source per
domain; the corpus suite is cut from the held-out split).

Leave-one-source-out (:func:`loso_gates`): for each source a gate trained on the others, its
threshold chosen on those others only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from evals.span.score import ScoredSeq
from models.span.learned import FEATURES, LearnedGate, LearnedState

log = logging.getLogger(__name__)

CLIP = 8.0  # nats: |d| beyond this is clipped (a few huge misses would dominate the fit)
L2 = 1.0  # ridge penalty (features are O(1))
ROUNDS = 3  # rollout rounds (round 0 follows copy-2)
MODEL = "trees"  # the shipped kind: "trees" (measured better leave-one-source-out) or "linear"
TREES = {"n_trees": 100, "leaves": 16}  # the shipped ensemble's size (fit_trees options)
_INDEX = {f: j for j, f in enumerate(FEATURES)}


@dataclass
class GateData:
    """Collected features: ``X`` (N, F) float64 in :data:`FEATURES` order, ``d`` (N,) the
    transformer's log-prob advantage on the true token, ``group`` (N,) the source of each
    token's request."""

    X: np.ndarray
    d: np.ndarray
    group: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[GateData]) -> GateData:
        return cls(np.concatenate([p.X for p in parts]), np.concatenate([p.d for p in parts]),
                   np.concatenate([p.group for p in parts]))


def _copy2(state: LearnedState) -> str:
    return "transformer" if state.matcher.match_len >= 2 else "hybrid"


def collect(seqs: Sequence[ScoredSeq], token_text: Callable[[int], str],
            policy: Callable[[LearnedState], str] | None = None,
            gate: LearnedGate | None = None) -> GateData:
    """Features at every answer position of ``seqs`` along a rollout: roles from ``policy``
    (a state -> role), else from ``gate``'s own decisions, else ``copy-2``'s."""
    g = gate or LearnedGate({})
    decide = policy or (None if gate is not None else _copy2)
    rows_i, rows_j, vals, d, group = [], [], [], [], []
    k = 0
    for s in seqs:
        st = LearnedState(g, s.prompt_ids.tolist(), token_text)
        ent = (s.ent[0].tolist(), s.ent[1].tolist())
        for i, tok in enumerate(s.answer_ids.tolist()):
            f = st.features()
            for name, v in f.items():
                rows_i.append(k)
                rows_j.append(_INDEX[name])
                vals.append(v)
            if decide is not None:
                role = decide(st)
            else:
                role = "transformer" if g.predict(f) > g.threshold else "hybrid"
            st.push(tok, role, ent[0 if role == "transformer" else 1][i])  # type: ignore[arg-type]
            k += 1
        d.append(s.lp[0] - s.lp[1])
        group.extend([s.source] * len(s))
    X = np.zeros((k, len(FEATURES)))
    X[rows_i, rows_j] = vals
    return GateData(X, np.concatenate(d).astype(np.float64) if d else np.zeros(0),
                    np.asarray(group))


def fit_weights(X: np.ndarray, d: np.ndarray, l2: float = L2, clip: float = CLIP,
                weight: np.ndarray | None = None) -> dict[str, float]:
    """Ridge regression of ``clip(d)`` on ``X`` (bias unpenalised); unused features get no
    weight. Returns {feature: weight} (non-zero ones only)."""
    y = np.clip(d, -clip, clip)
    w = np.ones(len(y)) if weight is None else weight
    used = np.flatnonzero(np.abs(X).sum(0) > 0)
    Xu = X[:, used]
    A = Xu.T @ (Xu * w[:, None])
    pen = np.full(len(used), l2 * w.sum() / max(len(y), 1))
    pen[[j for j, u in enumerate(used) if FEATURES[u] == "bias"]] = 0.0
    coef = np.linalg.solve(A + np.diag(pen), Xu.T @ (w * y))
    return {FEATURES[u]: float(c) for u, c in zip(used, coef, strict=True) if c != 0.0}


def best_threshold(score: np.ndarray, d: np.ndarray) -> float:
    """The threshold t minimising the pooled loss when the transformer takes the tokens with
    ``score > t`` (= maximising the sum of ``d`` over them): midway between two sorted
    scores (or below all / above all)."""
    order = np.argsort(-score)
    gain = np.concatenate([[0.0], np.cumsum(d[order])])  # gain[m]: the top m to the transformer
    m = int(np.argmax(gain))
    s = score[order]
    if m == 0:
        return float(s[0] + 1.0) if len(s) else 0.0
    if m == len(s):
        return float(s[-1] - 1.0)
    return float((s[m - 1] + s[m]) / 2)


def fit_trees(X: np.ndarray, d: np.ndarray, weight: np.ndarray | None = None,
              n_trees: int = 40, leaves: int = 8, lr: float = 0.1, min_leaf: int = 200,
              clip: float = CLIP) -> list:
    """A small LightGBM regression of ``clip(d)``, exported as plain trees
    (:func:`models.span.learned.tree_value`); deterministic (one thread, fixed seed)."""
    import lightgbm as lgb

    params = {"objective": "regression", "num_leaves": leaves, "learning_rate": lr,
              "min_data_in_leaf": min_leaf, "num_threads": 1, "seed": 0, "deterministic": True,
              "verbose": -1, "zero_as_missing": False, "use_missing": False}
    ds = lgb.Dataset(X, np.clip(d, -clip, clip), weight=weight, free_raw_data=False)
    booster = lgb.train(params, ds, num_boost_round=n_trees)
    return [_export(t["tree_structure"]) for t in booster.dump_model()["tree_info"]]


def _export(root: dict) -> tuple:
    """A LightGBM tree dump as (feature name or None, threshold, left, right, value) lists."""
    feat: list[str | None] = []
    thr: list[float] = []
    left: list[int] = []
    right: list[int] = []
    value: list[float] = []

    def add(node: dict) -> int:
        i = len(feat)
        feat.append(None)
        thr.append(0.0)
        left.append(-1)
        right.append(-1)
        value.append(0.0)
        if "leaf_value" in node or "split_feature" not in node:
            value[i] = _round(node.get("leaf_value", 0.0))
            return i
        if node.get("decision_type", "<=") != "<=":
            raise ValueError(f"unsupported split {node.get('decision_type')}")
        feat[i], thr[i], value[i] = FEATURES[node["split_feature"]], _round(node["threshold"]), 0.0
        left[i] = add(node["left_child"])
        right[i] = add(node["right_child"])
        return i

    add(root)
    return feat, thr, left, right, value


def _round(x: float) -> float:
    """7 significant digits: a smaller artifact; the threshold is chosen on the rounded
    trees, so training and decoding score alike."""
    return float(f"{float(x):.7g}")


def predict_matrix(gate: LearnedGate, X: np.ndarray) -> np.ndarray:
    """``gate``'s score for every row of ``X`` (columns in :data:`FEATURES` order),
    vectorised; equal to the per-token score."""
    w = np.array([gate.weights.get(f, 0.0) for f in FEATURES])
    out = X @ w
    for feat, thr, left, right, value in gate.trees:
        col = np.array([_INDEX[f] if f is not None else -1 for f in feat])
        thr_a, left_a, right_a = np.array(thr), np.array(left), np.array(right)
        node = np.zeros(len(X), int)
        while True:
            inner = col[node] >= 0
            if not inner.any():
                break
            r = np.flatnonzero(inner)
            n = node[r]
            go_left = X[r, col[n]] <= thr_a[n]
            node[r] = np.where(go_left, left_a[n], right_a[n])
        out = out + np.array(value)[node]
    return out


def source_weights(group: np.ndarray) -> np.ndarray:
    """Token weights giving every source the same total weight (mean 1)."""
    names, inv, counts = np.unique(group, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv]
    return w * len(w) / w.sum()


def train_gate(seqs: Sequence[ScoredSeq], token_text: Callable[[int], str],
               rounds: int = ROUNDS, l2: float = L2, balance: bool = True, model: str = MODEL,
               trees: dict | None = None, meta: dict | None = None,
               progress: bool = False) -> LearnedGate:
    """A gate trained on ``seqs`` (rollout rounds, a fit, the threshold on the same data).
    ``model``: "linear" (ridge) or "trees" (:func:`fit_trees`, options in ``trees``);
    ``balance``: each source weighs the same (else every token does)."""
    if model not in ("linear", "trees"):
        raise ValueError(f"model must be linear or trees, got {model!r}")
    if not seqs:
        raise ValueError("no training sequences")
    parts: list[GateData] = []
    gate: LearnedGate | None = None
    for r in range(rounds):
        data = collect(seqs, token_text, gate=gate)
        parts.append(data)
        allx = GateData.concat(parts)
        w = source_weights(allx.group) if balance else None
        if model == "linear":
            fitted = LearnedGate(fit_weights(allx.X, allx.d, l2, weight=w))
        else:
            fitted = LearnedGate({}, trees=fit_trees(allx.X, allx.d, w, **(TREES if trees is None else trees)))
        thr = best_threshold(predict_matrix(fitted, data.X),
                             data.d * (source_weights(data.group) if balance else 1.0))
        gate = LearnedGate(fitted.weights, thr, trees=fitted.trees)
        if progress:
            log.info("round %d: %d tokens, threshold %.3f", r, len(data.d), thr)
    assert gate is not None
    info = {"model": model, "rounds": rounds, "clip": CLIP, "balance": balance,
            **({"l2": l2} if model == "linear" else {"trees": TREES if trees is None else trees}),
            "tokens": int(len(parts[-1].d)), "requests": len(seqs),
            "sources": sorted({s.source for s in seqs}), **(meta or {})}
    return LearnedGate(gate.weights, gate.threshold, info, trees=gate.trees)


def loso_gates(seqs: Sequence[ScoredSeq], token_text: Callable[[int], str],
               sources: Sequence[str] | None = None, progress: bool = False,
               **kw) -> dict[str, LearnedGate]:
    """{source: gate trained on every other source} for each of ``sources`` (default: all
    sources in ``seqs``)."""
    from tqdm.auto import tqdm

    names = sorted(sources if sources is not None else {s.source for s in seqs})
    out = {}
    for src in tqdm(names, desc="loso", disable=not progress, leave=False):
        train = [s for s in seqs if s.source != src]
        out[src] = train_gate(train, token_text, meta={"held_out": src}, **kw)
    return out
