"""Render a span-eval results dict to report.md and PNG plots (a separate step from the run,
so a saved results.json can be re-rendered)."""

from __future__ import annotations

import json
from pathlib import Path

from evals.span.evaluate import BASELINES

NOT_GATE_ROWS = (*BASELINES, "always-hybrid")  # rows that are no gate (#23's bars table)

_COLUMNS = ("loss (pooled) [95% CI]", "loss (request mean) [95% CI]",
            "gain vs request oracle [95% CI]", "share T", "switches /100", "catch-up /100",
            "mixed /100", "FLOPs vs T (pair)", "FLOPs vs T (7B)", "gate µs/token")


def _f(v, digits: int = 3, sign: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _ci(m, sign: bool = False) -> str:
    if not m or m[0] is None:
        return "n/a"
    if m[1] is None:
        return _f(m[0], sign=sign)
    return f"{_f(m[0], sign=sign)} [{_f(m[1], sign=sign)}, {_f(m[2], sign=sign)}]"


def _order(policies: dict) -> list[str]:
    base = [b for b in BASELINES if b in policies]
    gates = sorted((k for k in policies if k not in BASELINES), key=lambda k: policies[k]["loss"][0])
    return base + gates


def policy_table(policies: dict, us: dict | None = None) -> list[str]:
    lines = ["| policy | " + " | ".join(_COLUMNS) + " |", "|---" * (len(_COLUMNS) + 1) + "|"]
    for k in _order(policies):
        p = policies[k]
        lines.append(f"| {k} | {_ci(p['loss'])} | {_ci(p['loss_req'])} | {_ci(p.get('gain'), True)} | "
                     f"{_f(p['share_t'], 2)} | {_f(p['switches_per_100'], 1)} | "
                     f"{_f(p['catchup_per_100'], 1)} | {_f(p.get('mixed_per_100', 0.0), 1)} | "
                     f"{_f(p.get('flops_rel'), 2)} | "
                     f"{_f(p.get('flops_7b_rel'), 2)} | {_f((us or {}).get(k), 1)} |")
    return lines


def bar_line(b: dict) -> str:
    if not b:
        return "n/a"
    s = (f"best causal gate {b['best_gate']}: gain over the request oracle "
         f"{_ci(b['best_gain'], True)} -> {'**met**' if b['best_beats_oracle'] else '**not met**'}")
    if "learned" in b:
        verdict = ("**met** (CI above 0)" if b["learned_beats_copy_ci"] else
                   "point estimate better, CI includes 0" if b["learned_beats_copy"] else "**not met**")
        s += (f"; {b['learned']} vs best copy-k ({b['best_copy']}): "
              f"{_ci(b['learned_vs_copy'], True)} -> {verdict}")
        if b.get("learned_vs_copy_loso"):
            s += f" (vs copy-loso: {_ci(b['learned_vs_copy_loso'], True)})"
    return s


def source_table(res: dict) -> list[str]:
    """Per source: tokens, the baselines' pooled losses, the best copy-k and the learned
    gate's gain over the request oracle, and the bar."""
    head = ["source", "requests", "tokens", "T", "H", "request oracle", "mixture", "token oracle",
            "best gate (gain vs req. oracle)", "learned vs best copy-k", "learned vs copy-loso"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for src, pol in res["by_source"].items():
        b = res["bar_by_source"].get(src, {})
        row = [src, str(pol["always-transformer"]["requests"]), str(pol["always-transformer"]["tokens"]),
               *(_f(pol[k]["loss"][0]) for k in ("always-transformer", "always-hybrid",
                                                 "request-oracle", "mixture-50/50", "token-oracle")),
               f"{b.get('best_gate', 'n/a')} {_ci(b.get('best_gain'), True)}",
               (f"{b['learned']} vs {b['best_copy']}: {_ci(b['learned_vs_copy'], True)}"
                if "learned" in b else "n/a"), _ci(b.get("learned_vs_copy_loso"), True)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def mixture_bars(results: dict) -> list[str]:
    """Issue #23's bars as a table: each gate's gain over always-transformer and over the
    50/50 mixture, per suite, with paired CIs."""
    lines = ["## Issue #23's bars: each gate against always-transformer and the 50/50 mixture",
             "", "Nats/token, > 0 = the gate is better, paired 95% CI (the same resampled "
             "requests).", "", "| suite | gate | over always-transformer | over the mixture |",
             "|---|---|---|---|"]
    for name, res in results["suites"].items():
        for gate, row in res["policies"].items():
            if gate in NOT_GATE_ROWS or "gain_mixture" not in row:
                continue
            lines.append(f"| {name} | {gate} | {_ci(row.get('gain_t'), True)} | "
                         f"{_ci(row['gain_mixture'], True)} |")
    return lines


def render_markdown(results: dict, plots: list[str] | None = None) -> str:
    pv = results["provenance"]
    cfg = pv["config"]
    lines = ["# ArchRoute span-eval report (teacher-forced)", "",
             f"- created {pv['created_at']}, git {pv['git_commit'][:10]}"
             f"{' (dirty)' if pv['git_dirty'] else ''}, {pv['duration_s']:.0f} s",
             f"- pair: transformer {results['pair'][0]}, hybrid {results['pair'][1]}",
             f"- command: `{' '.join(['archroute', *pv['argv'][1:]])}`",
             f"- bootstrap: {cfg['bootstrap']} resamples of requests, seed {cfg['seed']}",
             "- loss: nats per answer token. *Pooled* (the headline, as in issue #14) = total "
             "nats / total tokens; *request mean* = mean over requests of each one's mean.",
             "- gain vs request oracle: pooled loss of the request-level oracle minus the "
             "policy's (> 0: better than the best per-request choice), paired CI.",
             "- catch-up /100: tokens a model must process on taking over (the other model's "
             "tokens since it last ran), per 100 answer tokens. FLOPs: both models' forward "
             "passes (prompt, answer, catch-up) relative to always-transformer, with the pair's "
             "cost models and with the 7B pair's (same token counts). The mixture runs both "
             "models on every token; the per-token oracle is counted as if its roles were known.",
             "- timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()),
             ""]
    if results.get("training_files"):
        lines.append("- learned-loso trained on: " + ", ".join(
            f"{f['file']} ({f['license']}, sha256 {f['sha256'][:12]})" for f in results["training_files"]))
        lines.append("")
    lines += ["## The issue-#14 bar", ""]
    for name, res in results["suites"].items():
        lines.append(f"- **{name}**: {bar_line(res['bar'])}")
    lines.append("")
    lines += mixture_bars(results) + [""]
    for name, res in results["suites"].items():
        lines += [f"## {name}: {res['requests']} requests, {res['tokens']} answer tokens "
                  f"(references cut to fit: {res['ref_cut']}; prompts cut: {res['prompt_cut']})", ""]
        lines += policy_table(res["policies"], res.get("gate_us_per_token")) + [""]
        if res.get("in_sample"):
            lines += [f"In-sample here (trained on these sources; left out of the bar): "
                      f"{', '.join(res['in_sample'])}.", ""]
        if len(res["by_source"]) > 1:
            lines += [f"### {name} by source (pooled loss; gains with 95% CI)", ""]
            lines += source_table(res) + [""]
    for p in plots or []:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return "\n".join(lines)


def plot(results: dict, out_dir: str | Path) -> list[str]:
    """loss_by_policy.png (pooled loss with CIs per suite), share_switches.png (share to the
    transformer vs switches) and gain_by_source.png (gain over the request oracle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    suites = results["suites"]
    paths = []
    fig, axes = plt.subplots(1, len(suites), figsize=(5.5 * len(suites), 0.28 * max(
        len(r["policies"]) for r in suites.values()) + 1.5), squeeze=False)
    for ax, (name, res) in zip(axes[0], suites.items(), strict=True):
        keys = _order(res["policies"])[::-1]
        v = np.array([res["policies"][k]["loss"] for k in keys], dtype=float)
        y = np.arange(len(keys))
        err = None if np.isnan(v[:, 1]).all() else np.abs(v[:, 1:] - v[:, :1]).T
        colors = ["grey" if k in BASELINES else "C0" for k in keys]
        ax.errorbar(v[:, 0], y, xerr=err, fmt="none", ecolor="k", lw=0.8)
        ax.scatter(v[:, 0], y, c=colors, zorder=3, s=14)
        ax.axvline(res["policies"]["request-oracle"]["loss"][0], color="C3", lw=0.8, ls="--")
        ax.set_yticks(y, keys, fontsize=7)
        ax.set_xlabel("loss, nats per answer token (pooled)")
        ax.set_title(f"{name} ({res['requests']} requests)", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Teacher-forced loss by policy (95% CI; dashed: request-level oracle)", fontsize=10)
    fig.tight_layout()
    paths.append(str(out_dir / "loss_by_policy.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(suites), figsize=(5 * len(suites), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], suites.items(), strict=True):
        labels: dict[tuple[float, float], list[str]] = {}  # one label per point (ties joined)
        for k, p in res["policies"].items():
            if p["share_t"] is None:
                continue
            gain = (p.get("gain") or [0])[0] or 0.0
            xy = (p["share_t"], p["switches_per_100"])
            ax.scatter(*xy, c=[gain], cmap="RdYlGn", vmin=-0.2, vmax=0.2, s=25, edgecolors="k",
                       linewidths=0.3)
            if k not in BASELINES[:2] and "+" not in k:
                labels.setdefault((round(xy[0], 4), round(xy[1], 3)), []).append(k)
        for xy, names in labels.items():
            ax.annotate(" = ".join(names), xy, fontsize=6)
        ax.set_xlabel("share of tokens to the transformer")
        ax.set_ylabel("switches per 100 tokens")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Share and switching (colour: gain over the request oracle, nats/token)", fontsize=10)
    fig.tight_layout()
    paths.append(str(out_dir / "share_switches.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    multi = {n: r for n, r in suites.items() if len(r["by_source"]) > 1}
    if multi:
        fig, axes = plt.subplots(1, len(multi), figsize=(6.5 * len(multi), 4.5), squeeze=False)
        for ax, (name, res) in zip(axes[0], multi.items(), strict=True):
            srcs = list(res["by_source"])
            keys = [k for k in ("mixture-50/50", "copy-1", "copy-2", "copy-3", "learned",
                                "learned-loso") if k in res["policies"]]
            m = np.array([[res["by_source"][s][k]["gain"][0] for k in keys] for s in srcs])
            im = ax.imshow(m, cmap="RdYlGn", vmin=-0.3, vmax=0.3, aspect="auto")
            ax.set_xticks(range(len(keys)), keys, rotation=30, fontsize=7)
            ax.set_yticks(range(len(srcs)), srcs, fontsize=7)
            for i in range(len(srcs)):
                for j in range(len(keys)):
                    ax.text(j, i, f"{m[i, j]:+.2f}", ha="center", va="center", fontsize=6)
            ax.set_title(f"{name}: gain over the request oracle", fontsize=10)
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        paths.append(str(out_dir / "gain_by_source.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_report(results: dict, out_dir: str | Path, with_plots: bool = True) -> dict[str, str]:
    """results.json, report.md and the PNGs in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "results.json"
    js.write_text(json.dumps(results, indent=1, default=float) + "\n")
    plots = plot(results, out_dir) if with_plots else []
    md = out_dir / "report.md"
    md.write_text(render_markdown(results, plots), encoding="utf-8")
    return {"results": str(js), "markdown": str(md), **{Path(p).stem: p for p in plots}}
