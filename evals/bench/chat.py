"""``archroute bench chat`` (or ``python -m evals.bench.chat``): what a person sees when
chatting with the pair, measured on the corpus's HELD-OUT documents (issue #22).

Greedy, both models, each prompt a one-turn chat rendered by the model's own chat
template (the router's path: ``HFBackend.generate``), at most 4x the reference's tokens:

- **repeat**: "Repeat exactly: PASSAGE" (20-60-token passages); exact = the answer, stripped,
  equals the passage;
- **fix_bug**: "Fix the bug in this function and return the whole corrected function:" with a
  planted bug (models.training.sft_data.plant_bug), one case per eligible held-out function;
  fixed = the answer is the original function, every other line unchanged (trailing spaces
  and surrounding blank lines ignored); ``kept bug`` = it returned the buggy function as is;
- **continue / define / summarise**: fresh writing, for the end-of-sequence share and length;
- for every task: the share of answers that end with end-of-sequence before 4x the
  reference's length, and the answer's length over the reference's (tokens).

95% CIs: Wilson intervals (scipy.stats.binomtest). Then the copy probe's second-copy gap at
64 tokens (models.training.probe, paired bootstrap) on the same pair.

    python -m evals.bench.chat --models runs/sft          # the tuned pair, staged
    python -m evals.bench.chat --models models/reference  # the shipped pair
    python -m evals.bench.chat --models models/reference --span learned
        # also the span decoder with the shipped gate, drafting 8: what `archroute` answers
    python -m evals.bench.chat --models models/reference --span learned,learned+copy-2 --span-only
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from models.training import sft_data

BENCH_SEED = 22_022  # not the tuning seed: other passages even where documents overlap
WRITE_TASKS = ("continue", "define", "summarise")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, default=Path("runs/sft"),
                   help="folder with transformer/ and hybrid/ (default runs/sft; the shipped "
                        "pair: models/reference)")
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"),
                   help="the reference corpus (python -m models.training.corpus); val split used")
    p.add_argument("--n", type=int, default=120, help="repeat cases and max fix_bug cases")
    p.add_argument("--n-write", type=int, default=40, help="cases per writing task")
    p.add_argument("--no-probe", action="store_true", help="skip the copy probe")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", type=Path, help="also write every case and figure here")
    p.add_argument("--span", metavar="GATE[,GATE...]",
                   help="also the span decoder over the pair with each of these gates (e.g. "
                        "learned), drafting --draft-k tokens")
    p.add_argument("--span-only", action="store_true",
                   help="with --span: skip each model alone (and the copy probe)")
    p.add_argument("--draft-k", type=int, default=8, help="drafted copy tokens for --span")


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n."""
    from scipy.stats import binomtest

    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def norm_code(text: str) -> str:
    """Code compared line by line: trailing spaces and surrounding blank lines ignored."""
    return "\n".join(x.rstrip() for x in text.strip("\n").splitlines()).strip("\n")


def build_cases(corpus: Path, count_tokens, n: int, n_write: int) -> list[sft_data.Example]:
    """Benchmark cases from the corpus's held-out split only."""
    docs = sft_data.load_corpus(corpus, "val")
    train_ids = {d["id"] for d in sft_data.load_corpus(corpus, "train")}
    b = sft_data.SyntheticBuilder(docs, count_tokens, seed=BENCH_SEED)
    cases: list[sft_data.Example] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if sum(c.task == "repeat" for c in cases) >= n:
            break
        ex = b.repeat(20, 60, canonical=True)
        if ex and ex.answer not in seen:
            seen.add(ex.answer)
            cases.append(ex)
    fns = b.functions[:]
    random.Random(BENCH_SEED).shuffle(fns)
    k = 0
    for doc, src, _ in fns:
        got = sft_data.plant_bug(src, random.Random(f"{BENCH_SEED}:{doc}:{src[:80]}"))
        if got is None or src in seen:
            continue
        seen.add(src)
        sep = "\n" if k % 2 == 0 else " "  # as a person types it: on the next line or the same
        prompt = f"Fix the bug in this function and return the whole corrected function:{sep}{got[0]}"
        cases.append(sft_data.Example(f"bench-fix-{k:04d}", "fix_bug",
                                      [{"role": "user", "content": prompt}], src, doc,
                                      {"bug": got[1], "buggy": got[0]}))
        k += 1
        if k >= n:
            break
    for task in WRITE_TASKS:
        got_n = 0
        for _ in range(50 * n_write):
            if got_n >= n_write:
                break
            ex = b.make(task)
            if ex and ex.answer not in seen:
                seen.add(ex.answer)
                cases.append(ex)
                got_n += 1
    leaked = {c.doc for c in cases} & train_ids
    if leaked:
        raise RuntimeError(f"benchmark cases from training documents: {sorted(leaked)[:3]}")
    return cases


def answer_case(backend, ex, ref_tokens: int) -> dict:
    from models.base import ChatMessage, GenerationParams

    msgs = [ChatMessage(m["role"], m["content"]) for m in ex.messages]  # type: ignore[arg-type]
    limit = 4 * ref_tokens
    r = backend.generate(msgs, GenerationParams(max_tokens=limit, temperature=0.0))
    out = r.text.strip()
    row = {"eos": r.finish_reason == "stop", "tokens": r.completion_tokens,
           "ratio": r.completion_tokens / ref_tokens, "answer": r.text}
    if ex.task == "repeat":
        row["exact"] = out == ex.answer.strip()
    elif ex.task == "fix_bug":
        row["fixed"] = norm_code(out) == norm_code(ex.answer)
        row["kept_bug"] = norm_code(out) == norm_code(ex.meta["buggy"])
    return row


def _rate(rows: list[dict], key: str) -> tuple[int, int, float, tuple[float, float]]:
    k, n = sum(bool(r[key]) for r in rows), len(rows)
    return k, n, (k / n if n else float("nan")), wilson(k, n)


def _fmt(rate: tuple[int, int, float, tuple[float, float]]) -> str:
    k, n, p, (lo, hi) = rate
    return f"{100 * p:5.1f}% [{100 * lo:4.1f}, {100 * hi:5.1f}] ({k}/{n})"


def run(a: argparse.Namespace) -> int:
    import torch

    from models.hf import HFBackend

    torch.set_num_threads(a.threads)
    pair = {arch: HFBackend(f"{arch}", a.models / arch, architecture=arch)
            for arch in ("transformer", "hybrid")}
    tok = pair["transformer"].tokenizer
    systems: dict = {} if a.span and a.span_only else dict(pair)
    heads = {"transformer": "transformer", "hybrid": "hybrid"}
    for gate in a.span.split(",") if a.span else []:
        from models.span.decoder import SpanBackend

        key = "span" if "span" not in systems else f"span:{gate}"
        systems[key] = SpanBackend(pair["transformer"], pair["hybrid"], gate, draft_k=a.draft_k)
        heads[key] = f"span ({gate}, draft {a.draft_k})"

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    cases = build_cases(a.corpus, count, a.n, a.n_write)
    print(f"models: {a.models}; chat template: {bool(getattr(tok, 'chat_template', None))}; "
          f"{len(cases)} cases from {len({c.doc for c in cases})} held-out documents of {a.corpus}")
    results: dict = {"models": str(a.models), "cases": {}, "summary": {}}
    for arch, backend in systems.items():
        t0 = time.time()
        rows = []
        for ex in cases:
            row = answer_case(backend, ex, count(" " + ex.answer))
            rows.append({"id": ex.id, "task": ex.task, **row})
        results["cases"][arch] = rows
        by = {t: [r for r in rows if r["task"] == t] for t in ("repeat", "fix_bug", *WRITE_TASKS)}
        summ = {"repeat_exact": _rate(by["repeat"], "exact"),
                "fix_whole_function": _rate(by["fix_bug"], "fixed"),
                "fix_kept_bug": _rate(by["fix_bug"], "kept_bug"),
                "eos_all": _rate(rows, "eos"),
                **{f"eos_{t}": _rate(v, "eos") for t, v in by.items()},
                "length_ratio_median": {t: statistics.median(r["ratio"] for r in v)
                                        for t, v in by.items() if v},
                "seconds": time.time() - t0}
        results["summary"][arch] = summ
    names = list(systems)
    summ = results["summary"]
    print("\n## Chat benchmark (greedy, held-out corpus documents; 95% Wilson CIs)\n")
    print("| figure | " + " | ".join(heads[n] for n in names) + " |\n|---|"
          + "---:|" * len(names))
    labels = [("repeat_exact", "Repeat exactly (20-60 tokens): exact"),
              ("fix_whole_function", "planted bug: whole function fixed, rest unchanged"),
              ("fix_kept_bug", "planted bug: returned unchanged (bug kept)"),
              ("eos_all", "ends with EOS before 4x the reference (all tasks)")]
    labels += [(f"eos_{t}", f"  EOS before 4x: {t}") for t in ("repeat", "fix_bug", *WRITE_TASKS)]
    for key, label in labels:
        print(f"| {label} | " + " | ".join(_fmt(summ[n][key]) for n in names) + " |")
    for t in ("repeat", "fix_bug", *WRITE_TASKS):
        print(f"| answer / reference length, median: {t} | " + " | ".join(
            f"{summ[n]['length_ratio_median'].get(t, float('nan')):.2f}" for n in names) + " |")
    print("| seconds | " + " | ".join(f"{summ[n]['seconds']:.0f}" for n in names) + " |")
    if not (a.no_probe or a.span_only):
        results["probe"] = copy_probe(pair, a.corpus, a.models)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


def copy_probe(pair: dict, corpus: Path, models: Path) -> dict:
    """The copy probe (models.training.probe) on this pair; prints the 64-token cells."""
    import shutil
    import tempfile

    from models.training.probe import run_probe, to_markdown
    from models.training.train_reference import tokenize_split

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(models / "transformer" / "tokenizer.json", Path(tmp) / "tokenizer.json")
        val = tokenize_split(Path(tmp), corpus, "val")
    t, h = pair["transformer"], pair["hybrid"]
    res = run_probe(t, h, val, t.context_length)
    print("\n## Copy probe (second-copy gap T - H, nats/token; paired bootstrap 95% CI)\n")
    print(to_markdown({k: v for k, v in res.items() if "/L64/" in k}))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
