"""Render a summary (see :mod:`evals.analysis.summary`) as Markdown tables and PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PLOTS = ("gap_by_domain", "gap_by_class", "gap_vs_repeat", "brackets", "regression")


def _f(x: float) -> str:
    return f"{x:+.3f}"


def _ci(r: dict) -> str:
    return f"{_f(r['mean'])} [{_f(r['lo'])}, {_f(r['hi'])}]"


def _grid(summary: dict, key: str, groups: list[str]) -> list[str]:
    """A groups x (pooled, domains...) table of mean gap [CI] (n)."""
    cols = ["pooled", *summary["domains"]]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for g in groups:
        cells = []
        for c in cols:
            part = summary["pooled"] if c == "pooled" else summary["by_domain"][c]
            row = next((r for r in part[key] if r["group"] == g), None)
            cells.append(f"{_ci(row)} ({row['n']})" if row else "–")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict, meta: dict, img_prefix: str = "") -> str:
    """The report as Markdown. ``img_prefix`` is prepended to the PNG file names."""
    p = summary["pooled"]
    out = [
        "# Token-level gap report", "",
        f"Transformer: `{meta.get('transformer')}`; hybrid: `{meta.get('hybrid')}`; corpus "
        f"`{meta.get('corpus')}` ({summary['n_tokens']:,} tokens in {summary['n_windows']:,} "
        f"windows of {meta.get('window')} tokens).", "",
        "Gap d = loss_transformer - loss_hybrid (nats/token); positive = the hybrid predicts "
        f"better. 95% CIs: cluster bootstrap over windows ({summary['n_boot']} replicates).", "",
        "## Overall and by domain", "",
        "| domain | tokens | loss_t | loss_h | gap [95% CI] | windows favouring hybrid |",
        "|---|---|---|---|---|---|",
    ]
    for name, part in [("pooled", p), *summary["by_domain"].items()]:
        o = part["overall"]
        out.append(f"| {name} | {o['n']:,} | {o['loss_t']:.3f} | {o['loss_h']:.3f} | {_ci(o)} "
                   f"| {o['windows_favouring_hybrid']:.0%} |")
    out += ["", f"![gap by domain]({img_prefix}gap_by_domain.png)", "",
            "## Within-pair contrasts (difference of mean gaps, 95% CI)", "",
            "| | " + " | ".join(["pooled", *summary["domains"]]) + " |",
            "|---" * (len(summary["domains"]) + 2) + "|"]
    for c in ("content-function", "close-open", "repeat16+-repeat0"):
        cells = []
        for part in [p, *summary["by_domain"].values()]:
            r = part["contrasts"].get(c)
            cells.append(f"{_f(r['diff'])} [{_f(r['lo'])}, {_f(r['hi'])}]" if r else "–")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    classes = [r["group"] for r in p["word_class"]]
    out += ["", "## Gap by word class: mean [95% CI] (tokens)", "",
            *_grid(summary, "word_class", classes), "",
            f"![gap by class]({img_prefix}gap_by_class.png)", "",
            "## Gap by repeated n-gram length (longest n the token completes in its window)", "",
            *_grid(summary, "repeat_bins", [r["group"] for r in p["repeat_bins"]]), "",
            "Overlapping groups, as the replication reports them:", "",
            *_grid(summary, "repeat_thresholds", [r["group"] for r in p["repeat_thresholds"]]), "",
            f"![gap vs repeat]({img_prefix}gap_vs_repeat.png)", "",
            "## Brackets: opening vs closing", "",
            *_grid(summary, "brackets", ["open", "close", "none"]), "",
            "By kind (pooled over domains): "
            + "; ".join(f"{r['group']} {_ci(r)} ({r['n']})" for r in p["brackets_by_kind"]), "",
            f"![brackets]({img_prefix}brackets.png)", "",
            "## Regression of the gap on categories with controls", "",
            "OLS, cluster-robust (by window) 95% CIs. Reference levels: function word, not a "
            "repeat (n = 0), no bracket, first domain. Controls (centred): log unigram "
            "frequency, log(1+position), word start, log(1+local reuse in 128 tokens), "
            "log(1+distance to previous occurrence).", ""]
    reg = summary["regression"]["pooled"]
    out += [f"Pooled: {reg['n']:,} tokens, {reg['clusters']:,} windows, R² = {reg['r2']:.4f}.", "",
            "| term | coef | 95% CI |", "|---|---|---|"]
    out += [f"| {t['term']} | {_f(t['coef'])} | [{_f(t['lo'])}, {_f(t['hi'])}] |"
            for t in reg["terms"]]
    key_terms = ["class=content", "bracket=open", "bracket=close", "repeat=16-31", "repeat=32+"]
    out += ["", "Key coefficients per domain (same model without domain terms):", "",
            "| domain | " + " | ".join(key_terms) + " |", "|---" * (len(key_terms) + 1) + "|"]
    for d, r in summary["regression"]["by_domain"].items():
        terms = {t["term"]: t for t in r["terms"]}
        cells = [f"{_f(terms[k]['coef'])} [{_f(terms[k]['lo'])}, {_f(terms[k]['hi'])}]"
                 if k in terms else "–" for k in key_terms]
        out.append(f"| {d} | " + " | ".join(cells) + " |")
    out += ["", f"![regression]({img_prefix}regression.png)", ""]
    return "\n".join(out)


def _bars(ax, labels, rows, offset=0.0, width=0.8, label=None) -> None:
    x = np.arange(len(labels)) + offset
    m = np.asarray([r["mean"] if r else np.nan for r in rows])
    lo = np.asarray([r["mean"] - r["lo"] if r else 0 for r in rows])
    hi = np.asarray([r["hi"] - r["mean"] if r else 0 for r in rows])
    ax.bar(x, m, width, yerr=[lo, hi], capsize=2, label=label)


def plots(summary: dict, out_dir: Path) -> list[Path]:
    """Write the PNG plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {"pooled": summary["pooled"], **summary["by_domain"]}
    paths = []

    def find(rows, g):
        return next((r for r in rows if r["group"] == g), None)

    def save(fig, name):
        path = out_dir / f"{name}.png"
        fig.axes[0].axhline(0, color="k", lw=0.6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(parts)
    _bars(ax, names, [p["overall"] for p in parts.values()])
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("gap (nats), + = hybrid better")
    ax.set_title("Mean gap by domain (95% CI)")
    save(fig, "gap_by_domain")

    classes = [r["group"] for r in summary["pooled"]["word_class"] if r["group"] != "special"]
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.8 / len(parts)
    for i, (name, p) in enumerate(parts.items()):
        _bars(ax, classes, [find(p["word_class"], c) for c in classes], i * w - 0.4 + w / 2, w,
              name)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_ylabel("gap (nats)")
    ax.set_title("Gap by word class and domain (95% CI)")
    ax.legend(fontsize=7, ncol=4)
    save(fig, "gap_by_class")

    bins = [r["group"] for r in summary["pooled"]["repeat_bins"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, p in parts.items():
        rows = [find(p["repeat_bins"], b) for b in bins]
        m = [r["mean"] if r and r["n"] >= 30 else np.nan for r in rows]
        kw = {"lw": 2.5, "color": "k"} if name == "pooled" else {"lw": 1}
        ax.plot(range(len(bins)), m, marker="o", label=name, **kw)
    pr = [find(summary["pooled"]["repeat_bins"], b) for b in bins]
    ax.fill_between(range(len(bins)), [r["lo"] for r in pr], [r["hi"] for r in pr], color="k",
                    alpha=0.15)
    ax.set_xticks(range(len(bins)), bins)
    ax.set_xlabel("longest repeated n-gram completed (n)")
    ax.set_ylabel("gap (nats)")
    ax.set_title("Gap vs repeated n-gram length (bins with >= 30 tokens)")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "gap_vs_repeat")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, role in enumerate(("open", "close")):
        _bars(ax, names, [find(p["brackets"], role) for p in parts.values()], i * 0.4 - 0.2, 0.4,
              role)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("gap (nats)")
    ax.set_title("Opening vs closing brackets by domain (95% CI)")
    ax.legend()
    save(fig, "brackets")

    terms = [t for t in summary["regression"]["pooled"]["terms"] if t["term"] != "intercept"]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(terms) + 1))
    y = np.arange(len(terms))[::-1]
    ax.errorbar([t["coef"] for t in terms], y,
                xerr=[[t["coef"] - t["lo"] for t in terms], [t["hi"] - t["coef"] for t in terms]],
                fmt="o", capsize=2)
    ax.set_yticks(y, [t["term"] for t in terms], fontsize=8)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("coefficient on gap (nats)")
    ax.set_title("OLS with controls, pooled (cluster-robust 95% CI)")
    fig.tight_layout()
    fig.savefig(out_dir / "regression.png", dpi=110)
    plt.close(fig)
    paths.append(out_dir / "regression.png")
    return paths
