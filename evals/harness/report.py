"""Render an :class:`EvalResult` to Markdown, HTML and PNG plots (a separate step from the
run, so a saved ``results.json`` can be re-rendered)."""

from __future__ import annotations

import html
from pathlib import Path

from evals.harness.results import METRICS, EvalResult

TABLE_METRICS = ("quality", "cost", "share_transformer", "gap_recovered", "accuracy", "auc",
                 "apgr", "aiq_norm", "cost_to_50_rel", "cost_to_80_rel")
_UNITS = {"flops": "FLOPs", "memory_bytes": "bytes", "wall_ms": "ms", "usd": "$"}


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.{digits}f}"


def _ci(m: list | None) -> str:
    if not m:
        return "n/a"
    v, lo, hi = (m + [None, None])[:3]
    if lo is None or hi is None:
        return _fmt(v)
    return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"


def threshold_note(result: EvalResult) -> str:
    """How the operating thresholds were set: one ``--threshold`` for every policy, or each
    policy's own default (read from the run's resolved config)."""
    thr = result.provenance.config.get("threshold")
    if thr is not None:
        return f"threshold {thr:.2f} for every policy"
    return "each policy at its own default threshold"


def tables(result: EvalResult) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as (header, rows) of strings, keyed by title."""
    out = {}
    s = result.singles
    axes = [a for a in _UNITS if a in s["transformer"]]
    extra = [k for k in s["transformer"] if k not in axes and k not in ("quality", "share_transformer")]
    head = ["backend", "quality (-nats/token)", "share to transformer",
            *[f"{a} ({_UNITS[a]})" + (" *" if a == result.cost_axis else "") for a in axes], *extra]
    out["Single backends and the oracle (* the cost axis; means per request)"] = (head, [
        [k, _fmt(v["quality"], 4), _fmt(v["share_transformer"], 2),
         *[_fmt(v.get(a)) for a in axes], *[_fmt(v.get(e)) for e in extra]]
        for k, v in s.items()])
    rows = []
    for p in sorted(result.policies, key=lambda p: -(p.metrics["gap_recovered"][0] or -1e9)):
        name = p.name + (f" ({p.note})" if p.note and p.name != "oracle" else "")
        rows.append([name, _fmt(p.threshold)] + [_ci(p.metrics.get(k)) for k in TABLE_METRICS])
    out[f"Policies ({threshold_note(result)}; 95% bootstrap intervals)"] = (
        ["policy", "threshold", *TABLE_METRICS], rows)
    doms = sorted(result.by_domain)
    out["Share routed to the transformer, by domain"] = (
        ["policy", *doms],
        [["oracle (measured)"] + [_fmt(result.by_domain[d]["oracle_share_transformer"], 2) for d in doms]]
        + [[p.name] + [_fmt(p.by_domain.get(d), 2) for d in doms] for p in result.policies
           if p.name != "oracle"])
    kinds = sorted(result.by_kind)
    out["Share routed to the transformer, by kind"] = (
        ["policy", *kinds],
        [["oracle (measured)"] + [_fmt(result.by_kind[k]["oracle_share_transformer"], 2) for k in kinds]]
        + [[p.name] + [_fmt(p.by_kind.get(k), 2) for k in kinds] for p in result.policies
           if p.name != "oracle"])
    for title, groups in (("Gap by domain", result.by_domain), ("Gap by kind", result.by_kind)):
        out[title + " (loss_transformer - loss_hybrid, nats/token; > 0: hybrid better)"] = (
            ["group", "n", "quality T", "quality H", "gap", "oracle share T"],
            [[g, str(v["n"]), _fmt(v["quality_transformer"]), _fmt(v["quality_hybrid"]),
              _fmt(v["gap"], 4), _fmt(v["oracle_share_transformer"], 2)] for g, v in groups.items()])
    return out


def render_markdown(result: EvalResult, plots: list[str] | None = None) -> str:
    pv = result.provenance
    lines = ["# ArchRoute eval report", "",
             f"- created {pv.created_at}, git {pv.git_commit[:10]}{' (dirty)' if pv.git_dirty else ''}, "
             f"{pv.duration_s:.0f} s",
             f"- cost axis: {result.cost_axis}; suites: "
             + ", ".join(f"{s.name} ({s.n_scored}/{s.n}, {s.content_hash})" for s in result.suites),
             "- backends: " + ", ".join(f"{b.role} = {b.name} ({b.parameters} params; "
                                        f"{b.cached} cached, {b.computed} computed)"
                                        for b in result.backends)]
    s = result.singles
    best = max(("transformer", "hybrid"), key=lambda k: s[k]["quality"])
    lines.append(f"- best single backend: {best}; oracle headroom over it "
                 f"{s['oracle']['quality'] - s[best]['quality']:+.4f} (quality units), the oracle "
                 f"sends {s['oracle']['share_transformer']:.1%} of requests to the transformer")
    for suite, files in pv.data.items():
        lines.append(f"- data of {suite}: " + ", ".join(
            f"{f['file']} ({f['license']}, sha256 {f['sha256'][:12]})" for f in files))
    if result.skipped:
        lines.append("- skipped policies: " + "; ".join(f"{k}: {v}" for k, v in result.skipped.items()))
    lines.append("")
    for title, (head, rows) in tables(result).items():
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    lines += ["## Metrics", ""] + [f"- `{k}` ({'higher' if hib else 'lower'} is better): {d}"
                                   for k, (hib, d) in METRICS.items()] + [""]
    for p in plots or []:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(lines)


def render_html(result: EvalResult, plots: list[str] | None = None) -> str:
    e = html.escape
    pv = result.provenance
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>ArchRoute eval</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 6px;font-size:13px}th{background:#eee}</style></head><body>",
             "<h1>ArchRoute eval report</h1>",
             f"<p>created {e(pv.created_at)}, git {e(pv.git_commit[:10])}, {pv.duration_s:.0f} s; "
             f"cost axis {e(result.cost_axis)}</p>"]
    for title, (head, rows) in tables(result).items():
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    for p in plots or []:
        parts.append(f"<h2>{e(Path(p).stem)}</h2><img src='{e(Path(p).name)}' style='max-width:100%'>")
    parts.append("<h2>Provenance</h2><pre>" + e(str(pv.config)) + "\n" + e(str(pv.versions)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def plot(result: EvalResult, out_dir: str | Path) -> list[str]:
    """quality_vs_cost.png (every policy's sweep, its Pareto points, the singles and the
    oracle) and domain_decisions.png (share routed to the transformer per domain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for p in result.policies:
        c, q = np.array(p.curve["cost"]), np.array(p.curve["quality"])
        line, = ax.plot(c, q, "-", lw=1.2, alpha=0.8, label=p.name)
        if p.pareto:
            ax.plot(c[p.pareto], q[p.pareto], ".", color=line.get_color(), ms=4)
        qv, cv = p.metrics["quality"][0], p.metrics["cost"][0]
        if qv is not None and cv is not None:
            ax.plot([cv], [qv], "o", color=line.get_color(), ms=6, mec="k")
    for name, mk in (("transformer", "s"), ("hybrid", "^"), ("oracle", "*")):
        s = result.singles[name]
        ax.plot([s[result.cost_axis]], [s["quality"]], mk, color="k", ms=10, label=name)
    ax.set_xlabel(f"mean cost per request ({_UNITS.get(result.cost_axis, result.cost_axis)})")
    ax.set_ylabel("quality (minus reference loss, nats/token)")
    ax.set_title(f"Quality vs cost: threshold sweeps (circles: {threshold_note(result)})",
                 fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(str(out_dir / "quality_vs_cost.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    names = ["oracle"] + [p.name for p in result.policies if p.name != "oracle"]
    panels = [("domain", result.by_domain, {p.name: p.by_domain for p in result.policies}),
              ("kind", result.by_kind, {p.name: p.by_kind for p in result.policies})]
    n_groups = sum(len(g) for _, g, _ in panels)
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 0.9 * n_groups + 3), 4.5), sharey=True,
                             gridspec_kw={"width_ratios": [max(1, len(g)) for _, g, _ in panels]})
    w = 0.8 / max(1, len(names))
    for ax, (label, groups, by_policy) in zip(axes, panels, strict=True):
        keys = sorted(groups)
        x = np.arange(len(keys))
        for i, n in enumerate(names):
            vals = ([groups[k]["oracle_share_transformer"] for k in keys] if n == "oracle"
                    else [by_policy[n].get(k, 0.0) for k in keys])
            ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=n)
        ax.set_xticks(x, keys, rotation=30)
        ax.set_title(f"by {label}")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share routed to the transformer")
    axes[-1].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.suptitle(f"Decisions, {threshold_note(result)} (oracle: where the transformer is better)")
    fig.tight_layout()
    paths.append(str(out_dir / "domain_decisions.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(result: EvalResult, out_dir: str | Path, with_plots: bool = True) -> dict[str, str]:
    """report.md, report.html and the PNGs in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(result, out_dir) if with_plots else []
    md, ht = out_dir / "report.md", out_dir / "report.html"
    md.write_text(render_markdown(result, plots), encoding="utf-8")
    ht.write_text(render_html(result, plots), encoding="utf-8")
    return {"markdown": str(md), "html": str(ht), **{Path(p).stem: p for p in plots}}
