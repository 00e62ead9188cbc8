"""Figures and tables for the reference pair's model card, from the training logs.

    python -m models.training.card --dir models/reference

Reads ``metrics_{transformer,hybrid}.jsonl`` (copied there by ``train_reference export``)
and writes ``loss_curves.png``, ``copy_probe.png`` and ``card_tables.md``; with
``--labels FILE`` (an ``archroute label`` output) also ``request_gaps.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARCHS = ("transformer", "hybrid")
COLORS = {"transformer": "tab:blue", "hybrid": "tab:orange"}


def load(path: Path) -> tuple[list[dict], list[dict]]:
    """(train-loss rows, eval rows) of one metrics log; later rows win on repeated steps."""
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        (evals if "val" in r else train)[r["step"]] = r
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def plot(d: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {a: load(d / f"metrics_{a}.jsonl") for a in ARCHS}
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for a, (tr, ev) in logs.items():
        # the logged loss is natural windows + copy batch; plot the parts apart
        ax[0].plot([r["step"] for r in tr], [r["train_loss"] - r.get("copy_loss", 0.0) for r in tr],
                   color=COLORS[a], alpha=0.8, label=f"{a}: natural windows")
        cp = [r for r in tr if "copy_loss" in r]
        ax[0].plot([r["step"] for r in cp], [r["copy_loss"] for r in cp], ":", color=COLORS[a],
                   alpha=0.8, label=f"{a}: copy batch")
        ax[1].plot([r["step"] for r in ev], [r["val_mean"] for r in ev], "o-", color=COLORS[a], label=a)
    ax[0].set(title="training loss (nats/token)", xlabel="step", ylim=(0, 9))
    ax[1].set(title="held-out loss, mean over domains", xlabel="step")
    starts = [ph["start"] for ph in _recipe(d).phases if ph["start"] > 0]  # phase lines
    for x in ax:
        for st in starts:
            x.axvline(st, color="grey", lw=0.6, alpha=0.5)
        x.legend(fontsize=7)
        x.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(d / "loss_curves.png", dpi=110)
    plt.close(fig)

    keys = sorted({k for _, ev in logs.values() for r in ev for k in r["probe"]})
    groups = sorted({k.rsplit("/", 1)[0] for k in keys},
                    key=lambda g: (g.split("/")[0], int(g.split("/L")[1])))  # e.g. code/L64
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for i, g in enumerate(groups):
        x = axes.flat[i]
        for a, (_, ev) in logs.items():
            for dist, style in (("D64", "-"), ("D256", "--")):
                k = f"{g}/{dist}"
                x.plot([r["step"] for r in ev], [r["probe"][k]["second"] for r in ev], style,
                       color=COLORS[a], label=f"{a} 2nd copy, gap {dist[1:]}")
            x.plot([r["step"] for r in ev], [r["probe"][f"{g}/D64"]["first"] for r in ev], ":",
                   color=COLORS[a], alpha=0.6, label=f"{a} 1st occurrence")
        for st in starts:
            x.axvline(st, color="grey", lw=0.6, alpha=0.5)
        x.set(title=g.replace("/L", ": passage of ") + " tokens", xlabel="step", ylabel="loss (nats)")
        x.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Copy probe: loss on the second occurrence of a held-out passage "
                 "(grey lines: curriculum phase starts)")
    fig.tight_layout()
    fig.savefig(d / "copy_probe.png", dpi=110)
    plt.close(fig)


def _recipe(d: Path):
    """The exported training recipe (``train_config.json``) as a TrainConfig."""
    from models.training.train_reference import TrainConfig

    return TrainConfig(**json.loads((d / "train_config.json").read_text()))


def tables(d: Path) -> str:
    logs = {a: load(d / f"metrics_{a}.jsonl") for a in ARCHS}
    last = {a: logs[a][1][-1] for a in ARCHS}
    step = last["transformer"]["step"]
    from models.training.train_reference import tokens_seen

    seen = tokens_seen(step, _recipe(d))
    lines = [f"Final evaluation at step {step} ({seen['total']:,} training tokens per model: "
             f"{seen['natural']:,} in natural windows, {seen['copy']:,} in short copy "
             "sequences).", "",
             "| domain | transformer | hybrid | gap (T - H) |", "|---|---:|---:|---:|"]
    for dom in sorted(last["transformer"]["val"]):
        t, h = last["transformer"]["val"][dom], last["hybrid"]["val"][dom]
        lines.append(f"| {dom} | {t:.3f} | {h:.3f} | {t - h:+.3f} |")
    t, h = last["transformer"]["val_mean"], last["hybrid"]["val_mean"]
    lines.append(f"| **mean** | **{t:.3f}** | **{h:.3f}** | **{t - h:+.3f}** |")
    lines += ["", "| probe cell | T first | T second | H first | H second | second-copy gap (T - H) |",
              "|---|---:|---:|---:|---:|---:|"]
    for k in sorted(last["transformer"]["probe"]):
        pt, ph = last["transformer"]["probe"][k], last["hybrid"]["probe"][k]
        lines.append(f"| {k} | {pt['first']:.3f} | {pt['second']:.3f} | {ph['first']:.3f} | "
                     f"{ph['second']:.3f} | {pt['second'] - ph['second']:+.3f} |")
    tps = {a: logs[a][0][-1].get("tok_per_s", float("nan")) for a in ARCHS}
    lines += ["", f"Training throughput (1 thread each, run side by side): transformer "
              f"{tps['transformer']:,.0f} tok/s, hybrid {tps['hybrid']:,.0f} tok/s."]
    return "\n".join(lines) + "\n"


def plot_request_gaps(labels: Path, out: Path, margin: float = 0.05) -> None:
    """Histogram of per-request gaps (``archroute label`` output), copy requests (quote,
    extract) apart from the rest, with the tie margin shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [json.loads(line) for line in labels.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{labels}: no labelled requests")
    gap = np.asarray([r["gap"] for r in rows])
    copy = np.asarray([r["kind"] in ("quote", "extract") for r in rows])
    bins = np.linspace(np.percentile(gap, 0.5), np.percentile(gap, 99.5), 60)
    fig, ax = plt.subplots(figsize=(8, 4))
    # matplotlib's stub types bins as a Sequence[float]; it takes any array-like
    ax.hist(gap[~copy], bins=bins, alpha=0.7, label=f"continue / complete / close / summarize / explain ({(~copy).sum():,})")  # type: ignore[arg-type]
    ax.hist(gap[copy], bins=bins, alpha=0.7, label=f"quote / extract ({copy.sum():,})")  # type: ignore[arg-type]
    ax.axvspan(-margin, margin, color="grey", alpha=0.25, label=f"tie (±{margin})")
    t_win, h_win = (gap < -margin).mean(), (gap > margin).mean()
    ax.set(xlabel="gap = loss_T - loss_H over the answer (nats/token); < 0: the transformer is better",
           ylabel="requests",
           title=f"Request mix: transformer better on {t_win:.1%}, hybrid on {h_win:.1%}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("models/reference"))
    p.add_argument("--labels", type=Path, help="also plot request_gaps.png from this "
                   "`archroute label` file (e.g. data/labels/reference.jsonl)")
    a = p.parse_args(argv)
    if a.labels:
        plot_request_gaps(a.labels, a.dir / "request_gaps.png")
    plot(a.dir)
    (a.dir / "card_tables.md").write_text(tables(a.dir))
    print((a.dir / "card_tables.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
