"""From the per-token table to the numbers of the report (a JSON-ready dict).

All means are of the gap d = loss_t - loss_h (nats; positive = hybrid better) unless a
key says otherwise; CIs are 95% cluster-bootstrap intervals over windows; every table is
given pooled and per domain (pooled numbers hid a reversal in the pilot).
"""

from __future__ import annotations

import numpy as np

from evals.analysis.stats import BootMeans, boot_means, cluster_weights, ols

REPEAT_BINS: list[tuple[int, int, str]] = [
    (0, 0, "0"), (1, 1, "1"), (2, 3, "2-3"), (4, 7, "4-7"), (8, 15, "8-15"), (16, 31, "16-31"),
    (32, 1 << 30, "32+"),
]
# overlapping groups for comparison with the replication (n >= 1 ... n >= 16)
REPEAT_THRESHOLDS = (1, 2, 4, 8, 16, 32)
CLASS_ORDER = ["content", "function", "identifier", "keyword", "markup", "number", "punct",
               "whitespace", "special"]


def repeat_bin(n: np.ndarray) -> np.ndarray:
    """Index into REPEAT_BINS for each repeated n-gram length."""
    edges = np.asarray([lo for lo, _, _ in REPEAT_BINS[1:]])
    return np.searchsorted(edges, n, side="right")


def _codes(values, labels: list[str]) -> np.ndarray:
    lookup = {v: i for i, v in enumerate(labels)}
    return np.asarray([lookup.get(v, -1) for v in values], dtype=np.int64)


def design(df, domains: bool = True) -> tuple[np.ndarray, list[str]]:
    """Regression design: intercept, category indicators (reference: function word, not
    repeated, no bracket, first domain) and centred controls."""
    cols: list[np.ndarray] = [np.ones(len(df))]
    names = ["intercept"]
    wc = df["word_class"].astype(str).to_numpy()
    for c in CLASS_ORDER:
        if c != "function" and (wc == c).any():
            cols.append((wc == c).astype(float))
            names.append(f"class={c}")
    rb = repeat_bin(df["repeat_n"].to_numpy())
    for i, (_, _, lab) in enumerate(REPEAT_BINS[1:], start=1):
        if (rb == i).any():
            cols.append((rb == i).astype(float))
            names.append(f"repeat={lab}")
    br = df["bracket"].astype(str).to_numpy()
    for role in ("open", "close"):
        if (br == role).any():
            cols.append((br == role).astype(float))
            names.append(f"bracket={role}")
    if domains:
        for d in sorted(df["domain"].astype(str).unique())[1:]:
            cols.append((df["domain"].astype(str).to_numpy() == d).astype(float))
            names.append(f"domain={d}")
    prev = df["prev_dist"].to_numpy()
    controls = {
        "log_freq": df["log_freq"].to_numpy(),
        "log1p_pos": np.log1p(df["pos"].to_numpy()),
        "word_start": df["word_start"].to_numpy().astype(float),
        "log1p_local_reuse": np.log1p(df["local_reuse"].to_numpy()),
        "log1p_prev_dist": np.log1p(np.where(prev >= 0, prev, 0)),
    }
    for k, v in controls.items():
        v = np.asarray(v, np.float64)
        if v.std() > 0:
            cols.append(v - v.mean())
            names.append(k)
    return np.stack(cols, axis=1), names


def _table(bm: BootMeans) -> list[dict]:
    return [r for r in bm.rows() if r["n"] > 0]


def _contrasts(bm_cls: BootMeans, bm_br: BootMeans, bm_rep: BootMeans) -> dict:
    out = {}
    for name, bm, a, b in (("content-function", bm_cls, "content", "function"),
                           ("close-open", bm_br, "close", "open"),
                           ("repeat16+-repeat0", bm_rep, "16+", "0")):
        if a in bm.labels and b in bm.labels and bm.n[bm.labels.index(a)] and \
                bm.n[bm.labels.index(b)]:
            d, lo, hi = bm.diff(a, b)
            out[name] = {"diff": d, "lo": lo, "hi": hi}
    return out


def _group_tables(df, weights: np.ndarray) -> dict:
    """Every category table for one slice of the table (pooled or one domain)."""
    gap = df["gap"].to_numpy()
    cl = df["window_code"].to_numpy()
    bm_all = boot_means(gap, cl, np.zeros(len(df), np.int64), weights, ["all"])
    wc = df["word_class"].astype(str).to_numpy()
    classes = [c for c in CLASS_ORDER if (wc == c).any()]
    bm_cls = boot_means(gap, cl, _codes(wc, classes), weights, classes)
    rb = repeat_bin(df["repeat_n"].to_numpy())
    bm_bins = boot_means(gap, cl, rb, weights, [lab for _, _, lab in REPEAT_BINS])
    rn = df["repeat_n"].to_numpy()
    thr = {}
    for t in (0, *REPEAT_THRESHOLDS):
        grp = (rn == 0) if t == 0 else (rn >= t)
        if grp.any():
            thr["0" if t == 0 else f"{t}+"] = boot_means(gap, cl, np.where(grp, 0, -1), weights,
                                                         ["x"])
    labels = list(thr)
    bm_thr = BootMeans(labels, np.asarray([thr[k].mean[0] for k in labels]),
                       np.asarray([thr[k].n[0] for k in labels]),
                       np.stack([thr[k].boot[:, 0] for k in labels], axis=1))
    br = df["bracket"].astype(str).replace({"": "none"}).to_numpy()
    bm_br = boot_means(gap, cl, _codes(br, ["open", "close", "none"]), weights,
                       ["open", "close", "none"])
    kind = df["bracket_kind"].astype(str).to_numpy()
    kinds = sorted(k for k in set(kind) if k)
    role_kind = np.asarray([f"{r} {k}" for r, k in zip(br, kind, strict=True)])
    rk_labels = [f"{r} {k}" for k in kinds for r in ("open", "close")]
    bm_rk = boot_means(gap, cl, _codes(role_kind, rk_labels), weights, rk_labels)
    lt = boot_means(df["loss_t"].to_numpy(), cl, np.zeros(len(df), np.int64), weights, ["t"])
    lh = boot_means(df["loss_h"].to_numpy(), cl, np.zeros(len(df), np.int64), weights, ["h"])
    return {
        "overall": {**_table(bm_all)[0], "loss_t": float(lt.mean[0]),
                    "loss_h": float(lh.mean[0]),
                    "windows_favouring_hybrid": float(
                        (df.groupby("window_code", observed=True)["gap"].mean() > 0).mean())},
        "word_class": _table(bm_cls),
        "repeat_bins": _table(bm_bins),
        "repeat_thresholds": _table(bm_thr),
        "brackets": _table(bm_br),
        "brackets_by_kind": _table(bm_rk),
        "contrasts": _contrasts(bm_cls, bm_br, bm_thr),
    }


def _regression(df, domains: bool) -> dict:
    X, names = design(df, domains=domains)
    res = ols(X, df["gap"].to_numpy(), names, clusters=df["window_code"].to_numpy())
    return {"n": res.n, "clusters": res.n_clusters, "r2": res.r2, "terms": res.rows()}


def summarize(df, n_boot: int = 1000, seed: int = 0) -> dict:
    """All tables, pooled and per domain, plus the regressions."""
    df = df.copy()
    df["window_code"] = df["window"].astype("category").cat.codes.astype(np.int64)
    weights = cluster_weights(int(df["window_code"].max()) + 1, n_boot, seed)
    domains = sorted(df["domain"].astype(str).unique())
    out: dict = {
        "n_tokens": int(len(df)), "n_windows": int(df["window"].nunique()),
        "n_boot": n_boot, "seed": seed, "domains": domains,
        "pooled": _group_tables(df, weights),
        "by_domain": {},
        "regression": {"pooled": _regression(df, domains=True), "by_domain": {}},
    }
    dom = df["domain"].astype(str).to_numpy()
    for d in domains:
        sub = df[dom == d].copy()
        # windows are nested in domains: the same weights matrix, restricted, is still a
        # valid cluster bootstrap (clusters outside the domain contribute nothing)
        out["by_domain"][d] = _group_tables(sub, weights)
        if len(sub) > 50:
            out["regression"]["by_domain"][d] = _regression(sub, domains=False)
    return out
