"""Statistics of the analysis: bootstrap CIs cover a known mean; OLS recovers planted
effects, with cluster-robust errors."""

from __future__ import annotations

import numpy as np
import pandas as pd

from evals.analysis.stats import boot_means, cluster_weights, ols
from evals.analysis.summary import design, repeat_bin, summarize


def clustered_sample(rng, n_clusters=40, per=30, mean=0.2, sd_cluster=0.3, sd=1.0):
    clusters = np.repeat(np.arange(n_clusters), per)
    values = mean + rng.normal(0, sd_cluster, n_clusters)[clusters] + rng.normal(0, sd, len(clusters))
    return values, clusters


def test_bootstrap_ci_covers_known_mean():
    rng = np.random.default_rng(0)
    covered = 0
    sims = 200
    w = cluster_weights(40, n_boot=300, seed=1)
    for _ in range(sims):
        v, c = clustered_sample(rng)
        bm = boot_means(v, c, np.zeros(len(v), np.int64), w, ["all"])
        lo, hi = bm.ci()
        covered += lo[0] <= 0.2 <= hi[0]
    assert 0.88 <= covered / sims <= 0.99


def test_bootstrap_groups_and_diff():
    rng = np.random.default_rng(1)
    v, c = clustered_sample(rng, n_clusters=100, per=20, sd_cluster=0.05, sd=0.2)
    g = rng.integers(0, 2, len(v))
    v = v + 0.5 * g  # group 1 is 0.5 higher
    bm = boot_means(v, c, g, cluster_weights(100, 400, 0), ["a", "b"])
    assert bm.n.sum() == len(v)
    d, lo, hi = bm.diff("b", "a")
    assert lo < 0.5 < hi and abs(d - 0.5) < 0.05
    assert bm.rows()[0]["group"] == "a"


def test_ols_recovers_planted_effect_with_cluster_errors():
    rng = np.random.default_rng(2)
    n_cl, per = 200, 50
    cl = np.repeat(np.arange(n_cl), per)
    x1 = rng.integers(0, 2, len(cl)).astype(float)
    x2 = rng.normal(size=len(cl))
    y = 0.1 + 0.3 * x1 - 0.2 * x2 + rng.normal(0, 0.5, n_cl)[cl] + rng.normal(0, 1, len(cl))
    X = np.stack([np.ones_like(x1), x1, x2], axis=1)
    res = ols(X, y, ["c", "x1", "x2"], clusters=cl)
    assert res.lo[1] < 0.3 < res.hi[1] and res.lo[2] < -0.2 < res.hi[2]
    assert abs(res.coef[1] - 0.3) < 0.06
    naive = ols(X, y, ["c", "x1", "x2"])
    assert res.se[0] > 2 * naive.se[0]  # intercept: cluster noise is shared within clusters


def synthetic_table(rng, n_windows=150, per=60):
    """Planted: content words +0.05 over function words, closing brackets -0.1, repeats
    of 16+ tokens -0.2; frequency confounds class (content rarer) and has its own effect."""
    n = n_windows * per
    wc = rng.choice(["content", "function", "punct"], n, p=[0.4, 0.4, 0.2])
    br = np.where(wc == "punct", rng.choice(["open", "close", ""], n), "")
    rep = rng.choice([0, 1, 3, 20], n, p=[0.5, 0.2, 0.2, 0.1])
    log_freq = np.where(wc == "content", -9.0, -5.0) + rng.normal(0, 1, n)
    gap = (0.02 + 0.05 * (wc == "content") - 0.1 * (br == "close") - 0.2 * (rep >= 16)
           + 0.03 * (log_freq + 7) + rng.normal(0, 0.3, n_windows)[np.arange(n) // per]
           + rng.normal(0, 0.5, n))
    return pd.DataFrame({
        "window": np.arange(n) // per, "domain": np.where(np.arange(n) // per % 2, "a", "b"),
        "pos": np.arange(n) % per, "gap": gap, "loss_t": 3 + gap, "loss_h": 3.0,
        "word_class": wc, "word_start": True, "repeat_n": rep,
        "prev_dist": np.where(rep > 0, rng.integers(1, 200, n), -1),
        "local_reuse": np.where(rep > 0, rng.integers(1, 5, n), 0),
        "bracket": br, "bracket_kind": np.where(br != "", "()", ""), "log_freq": log_freq,
    })


def test_regression_recovers_planted_category_effects():
    df = synthetic_table(np.random.default_rng(3))
    X, names = design(df)
    res = ols(X, df["gap"].to_numpy(), names, clusters=df["window"].to_numpy())
    terms = dict(zip(names, zip(res.coef, res.lo, res.hi, strict=True), strict=True))
    for term, truth in (("class=content", 0.05), ("bracket=close", -0.1), ("repeat=16-31", -0.2),
                        ("log_freq", 0.03)):
        c, lo, hi = terms[term]
        assert lo < truth < hi, (term, c, lo, hi)
    # the raw class means are confounded by frequency (content is rarer): -0.07 vs +0.05
    raw = (df.loc[df.word_class == "content", "gap"].mean()
           - df.loc[df.word_class == "function", "gap"].mean())
    assert raw < 0


def test_summarize_structure():
    df = synthetic_table(np.random.default_rng(4), n_windows=40, per=40)
    s = summarize(df, n_boot=100)
    assert s["domains"] == ["a", "b"] and set(s["by_domain"]) == {"a", "b"}
    assert {r["group"] for r in s["pooled"]["word_class"]} == {"content", "function", "punct"}
    assert "close-open" in s["pooled"]["contrasts"]
    assert s["regression"]["pooled"]["clusters"] == 40
    assert repeat_bin(np.array([0, 1, 2, 3, 4, 16, 40])).tolist() == [0, 1, 2, 2, 3, 5, 6]
