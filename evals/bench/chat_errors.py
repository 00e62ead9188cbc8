"""``python -m evals.bench.chat_errors``: where a model's copy answers go wrong (issue #22).

Teacher-forced over the chat benchmark's held-out copy cases (``evals.bench.chat``'s
``repeat`` and ``fix_bug``, the same cases): the prompt as the router renders it, then the
reference answer and end-of-sequence; at every answer position the model's greedy choice is
compared with the reference token. Greedy decoding reproduces the reference token for token
(and then ends) exactly when every position's argmax is the reference token, so the first
wrong position is where a generated answer first leaves the reference.

For each task: how many answers have no wrong position (= exact under greedy decoding), and
for the others, at the first wrong position: the reference token's probability, the chosen
token's probability, and the reference token's count in a sample of the corpus's train split
(how rare it is to the model). The phase-6 pair's repeat failures met rare tokens
(SFT.md, *Phases 7 and 8*)::

    python -m evals.bench.chat_errors --models models/reference
    python -m evals.bench.chat_errors --models runs/s10/p8 --json runs/s10/errors.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

from evals.bench import chat
from models.training import sft_data

TASKS = ("repeat", "fix_bug")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, default=Path("models/reference"),
                   help="folder with transformer/ and hybrid/")
    p.add_argument("--arch", choices=("transformer", "hybrid"), default="transformer")
    p.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    p.add_argument("--n", type=int, default=120, help="repeat cases and max fix_bug cases")
    p.add_argument("--freq-docs", type=int, default=3000,
                   help="train documents (first 20,000 characters each) the counts come from")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--show", type=int, default=10, help="first wrong positions printed per task")
    p.add_argument("--json", type=Path, help="also write every case's row here")


def first_errors(model, tok, cases: list[sft_data.Example], counts: Counter) -> list[dict]:
    """One row per case: answer length, wrong positions, and the first one's details."""
    import torch

    from models.base import ChatMessage
    from models.hf import render_prompt

    rows = []
    for ex in cases:
        msgs = [ChatMessage(m["role"], m["content"]) for m in ex.messages]  # type: ignore[arg-type]
        prompt = [tok.bos_token_id, *tok(render_prompt(tok, msgs), add_special_tokens=False)["input_ids"]]
        answer = [*tok(" " + ex.answer.strip(), add_special_tokens=False)["input_ids"], tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        probs = torch.softmax(logits.float(), -1)
        choice = logits.argmax(-1).tolist()
        wrong = [i for i, (c, r) in enumerate(zip(choice, answer, strict=True)) if c != r]
        row: dict = {"id": ex.id, "task": ex.task, "tokens": len(answer), "wrong": len(wrong)}
        if wrong:
            i = wrong[0]
            ref, got = answer[i], choice[i]
            row.update(at=i, ref=tok.decode([ref]), got=tok.decode([got]),
                       p_ref=probs[i, ref].item(), p_got=probs[i, got].item(),
                       ref_count=counts[ref], got_count=counts[got],
                       before=tok.decode(answer[max(0, i - 6):i]))
        rows.append(row)
    return rows


def run(a: argparse.Namespace) -> int:
    import torch

    from models.hf import HFBackend

    torch.set_num_threads(a.threads)
    backend = HFBackend(a.arch, a.models / a.arch, architecture=a.arch)
    tok, model = backend.tokenizer, backend.model

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    cases = [c for c in chat.build_cases(a.corpus, count, a.n, 0) if c.task in TASKS]
    counts: Counter = Counter()
    for d in sft_data.load_corpus(a.corpus, "train")[:a.freq_docs]:
        counts.update(tok(d["text"][:20_000], add_special_tokens=False)["input_ids"])
    rows = first_errors(model, tok, cases, counts)
    print(f"{a.models / a.arch}: teacher-forced first wrong token on {len(rows)} held-out copy cases")
    print("\n| task | exact under greedy | first wrong: reference p, median | chosen p, median "
          "| reference token's train count, median |\n|---|---:|---:|---:|---:|")
    for task in TASKS:
        mine = [r for r in rows if r["task"] == task]
        bad = [r for r in mine if r["wrong"]]
        med = {k: f"{statistics.median(r[k] for r in bad):.3g}" if bad else "-"
               for k in ("p_ref", "p_got", "ref_count")}
        print(f"| {task} | {len(mine) - len(bad)}/{len(mine)} | {med['p_ref']} | {med['p_got']} "
              f"| {med['ref_count']} |")
    for task in TASKS if a.show > 0 else ():
        print(f"\n{task}: the first {a.show} first wrong tokens (before | reference -> chosen)")
        for r in [r for r in rows if r["task"] == task and r["wrong"]][:a.show]:
            print(f"  {r['before']!r} | {r['ref']!r} (p {r['p_ref']:.2f}, count {r['ref_count']}) "
                  f"-> {r['got']!r} (p {r['p_got']:.2f}, count {r['got_count']})")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
