r"""Instruction-tune the reference pair with one recipe (issue #22).

Both models start from the same checkpoints (``--init``; by default the shipped pair,
models/reference/{transformer,hybrid}, itself already tuned: its phases and request ids are
inherited by the export) and see the same examples in the same order, with the same steps,
hyper-parameters and seed: only the architecture differs. Examples are chat-formatted with the pair's chat template
(models.training.sft_data.CHAT_TEMPLATE, rendered by models.hf.render_prompt), the loss is
on the answer tokens only, and every answer ends with end-of-sequence. The data
(models/training/sft_data.py): a fixed hash-based part of the shared real requests and
synthetic copy / writing instructions cut from the corpus TRAIN split.

The shipped recipe has two phases, each for both models (models/reference/SFT.md)::

    S="python -m models.training.sft"
    $S data --run runs/sft/run --steps 600        # 9,600 examples; 450 steps read 7,200
    for a in transformer hybrid; do $S train --run runs/sft/run --arch $a --steps 450 --threads 1; done
    $S data --run runs/sft/run2 --steps 500 --seed 2222 --real-share 0 \
        --shares repeat=0.45,fix_bug=0.45,rename=0.04,reindent=0.03,extract_lines=0.03 \
        --replay runs/sft/run --replay-n 2000
    for a in transformer hybrid; do $S train --run runs/sft/run2 --arch $a --steps 400 \
        --seed 2222 --warmup 20 --threads 1 --init runs/sft/run/$a/final; done
    $S export --run runs/sft/run2 --out runs/sft
    $S plot --run runs/sft/run --run runs/sft/run2 --out models/reference/sft_loss_curves.png

``train`` checkpoints every ``--ckpt-every`` steps and resumes from the last checkpoint when
rerun with the same arguments; it logs the loss (all, and per task group) to
``RUN/ARCH/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.training import sft_data

log = logging.getLogger("archroute.sft")

REFERENCE = Path(__file__).resolve().parents[1] / "reference"
ARCHS = ("transformer", "hybrid")


@dataclass
class SFTConfig:
    """Every default of the recipe (identical for both architectures)."""

    steps: int = 600
    batch_size: int = 16  # examples per step
    max_len: int = 512  # tokens per example (start token, prompt, answer, end-of-sequence)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 30
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    seed: int = 1234
    real_share: float = sft_data.REAL_SHARE  # of each trainable request file (by id hash)
    ckpt_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_len < 16:
            raise ValueError("steps and batch_size must be >= 1 and max_len >= 16")


def load_tokenizer(path: Path = REFERENCE / "transformer"):
    """The pair's tokenizer with the chat template set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.chat_template = sft_data.CHAT_TEMPLATE
    return tok


def encode_example(tok, ex: sft_data.Example) -> tuple[list[int], int]:
    """(ids, answer start): ``[start token, *prompt, *answer, end-of-sequence]`` with the
    prompt rendered as the router renders it (models.hf.render_prompt) and the answer
    tokenized on its own after one space (``Assistant: answer``)."""
    from models.base import ChatMessage
    from models.hf import render_prompt

    msgs = [ChatMessage(m["role"], m["content"]) for m in ex.messages]  # type: ignore[arg-type]
    prompt = [tok.bos_token_id, *tok(render_prompt(tok, msgs), add_special_tokens=False)["input_ids"]]
    answer = [*tok(" " + ex.answer, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    return prompt + answer, len(prompt)


def vocabulary_pieces(tok) -> list[str]:
    """Every ordinary token of the vocabulary, decoded (special tokens and the byte pieces
    that are no whole character on their own left out)."""
    special = set(tok.all_special_ids)
    pieces = (tok.decode([i]) for i in range(len(tok)) if i not in special)
    return [p for p in pieces if p and "\ufffd" not in p]


def task_group(task: str) -> str:
    """'copy', 'write' or 'real': the groups the loss is logged by."""
    if task.startswith("real:"):
        return "real"
    return "copy" if task in sft_data.COPY_TASKS else "write"


def build_data(run: Path, cfg: SFTConfig, corpus: Path, requests_dir: Path,
               shares: dict[str, float] | None = None, replay: Path | None = None,
               replay_n: int = 0) -> dict:
    """Write ``RUN/examples.jsonl`` (the encoded examples in training order) and
    ``RUN/sft_data.json`` (what was used: request ids and file hashes, synthetic counts).

    ``shares`` overrides the synthetic task mix (sft_data.TASK_SHARES); ``replay`` mixes in
    ``replay_n`` examples of an earlier run's examples.jsonl (a second phase keeps what the
    first taught; their request ids are the earlier run's, recorded again here)."""
    tok = load_tokenizer()

    def fits(ex: sft_data.Example) -> bool:
        return len(encode_example(tok, ex)[0]) <= cfg.max_len

    real, record = sft_data.load_real_requests(requests_dir, cfg.real_share, fits)
    old: list[dict] = []
    if replay is not None:
        old = random.Random(cfg.seed).sample(read_examples(replay), replay_n)
        record = json.loads((replay / "sft_data.json").read_text())["requests"]
    docs = sft_data.load_corpus(corpus, "train")
    builder = sft_data.SyntheticBuilder(docs, lambda s: len(tok(s, add_special_tokens=False)["input_ids"]),
                                        seed=cfg.seed, pieces=vocabulary_pieces(tok))
    n_syn = max(0, cfg.steps * cfg.batch_size - len(real) - len(old))
    synthetic = [ex for ex in builder.build(sft_data.task_counts(n_syn, shares or sft_data.TASK_SHARES))
                 if fits(ex)]
    rows = old + [{"id": ex.id, "task": ex.task, "doc": ex.doc,
                   **dict(zip(("ids", "answer_start"), encode_example(tok, ex), strict=True))}
                  for ex in real + synthetic]
    random.Random(cfg.seed).shuffle(rows)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "examples.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["task"]] = counts.get(row["task"], 0) + 1
    manifest = json.loads((corpus / "manifest.json").read_text())
    record = {
        "issue": 22, "seed": cfg.seed, "max_len": cfg.max_len,
        "requests": record,
        "synthetic": {"corpus_split": "train", "corpus_val_share": manifest.get("val_share"),
                      "corpus_docs_used": len({ex.doc for ex in synthetic}),
                      "counts": {k: v for k, v in sorted(counts.items()) if not k.startswith("real:")}},
        "real_counts": {k: v for k, v in sorted(counts.items()) if k.startswith("real:")},
        "examples": len(rows),
        "replay": {"from": str(replay), "n": len(old)} if replay is not None else None,
    }
    (run / "sft_data.json").write_text(json.dumps(record, indent=1))
    (run / "corpus_path.txt").write_text(str(corpus.resolve()))
    log.info("data: %d examples (%d real, %d synthetic, %d replayed) -> %s", len(rows), len(real),
             len(synthetic), len(old), run / "examples.jsonl")
    return record


def read_examples(run: Path) -> list[dict]:
    with open(run / "examples.jsonl") as fh:
        return [json.loads(line) for line in fh]


def batch_order(examples: list[dict], cfg: SFTConfig) -> list[list[int]]:
    """Example indices per step: examples in their (shuffled) order, cycled if the run
    outlasts them, sorted by length inside groups of 16 batches (less padding), the
    batches of each group in a seeded order. A pure function of (examples, cfg)."""
    need = cfg.steps * cfg.batch_size
    idx = [i % len(examples) for i in range(need)]
    rng = random.Random(cfg.seed)
    group = cfg.batch_size * 16
    out: list[list[int]] = []
    for g in range(0, need, group):
        chunk = sorted(idx[g:g + group], key=lambda i: len(examples[i]["ids"]))
        batches = [chunk[b:b + cfg.batch_size] for b in range(0, len(chunk), cfg.batch_size)]
        rng.shuffle(batches)
        out.extend(batches)
    return out[:cfg.steps]


def collate(examples: list[dict], rows: list[int], pad_id: int):
    """(input ids, labels) tensors, right-padded; labels are -100 outside the answers."""
    import torch

    width = max(len(examples[i]["ids"]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, i in enumerate(rows):
        seq, start = examples[i]["ids"], examples[i]["answer_start"]
        ids[r, :len(seq)] = torch.tensor(seq)
        labels[r, start:len(seq)] = torch.tensor(seq[start:])
    return ids, labels


def lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(run: Path, arch: str, cfg: SFTConfig, init: Path | None = None, threads: int = 2,
          progress: bool = True) -> Path:
    """Tune one architecture; returns the directory of its final model. Resumes from
    ``RUN/ARCH/ckpt.pt`` when present."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    examples = read_examples(run)
    order = batch_order(examples, cfg)
    out = run / arch
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "ckpt.pt"
    model = AutoModelForCausalLM.from_pretrained(init or REFERENCE / arch, local_files_only=True,
                                                 dtype=torch.float32)
    pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log.info("%s: resumed at step %d", arch, step)
    (out / "sft_config.json").write_text(json.dumps({**asdict(cfg), "arch": arch,
                                                     "init": str(init or REFERENCE / arch)}, indent=2))
    model.train()
    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=step, desc=f"sft {arch}", disable=not progress,
               mininterval=5.0)
    t0, tokens = time.time(), 0
    while step < cfg.steps:
        rows = order[step]
        ids, labels = collate(examples, rows, pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        logits = model(input_ids=ids).logits[:, :-1]
        tgt = labels[:, 1:]
        tok_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                   ignore_index=-100, reduction="none").view(tgt.shape)
        mask = tgt != -100
        loss = tok_loss.sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        step += 1
        tokens += int(ids.numel())
        groups: dict[str, list[float]] = {}
        per_row = (tok_loss.detach() * mask).sum(1) / mask.sum(1).clamp(min=1)
        for r, i in enumerate(rows):
            groups.setdefault(task_group(examples[i]["task"]), []).append(float(per_row[r]))
        rec = {"step": step, "loss": float(loss.detach()), "lr": lr_at(step - 1, cfg),
               "grad_norm": float(gnorm), "width": int(ids.shape[1]),
               "tok_per_s": tokens / (time.time() - t0),
               **{f"loss_{k}": float(np.mean(v)) for k, v in groups.items()}}
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", refresh=False)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, ckpt)
            log.info("%s step %d/%d loss %.3f (%.0f tok/s incl. padding)", arch, step, cfg.steps,
                     rec["loss"], rec["tok_per_s"])
    bar.close()
    final = out / "final"
    model.save_pretrained(final, safe_serialization=True)
    log.info("%s: done, %d steps -> %s", arch, step, final)
    return final


def export(run: Path, out: Path) -> None:
    """``OUT/transformer`` and ``OUT/hybrid``: safetensors, the tokenizer with the chat
    template, the raw-text pair's generation config; plus the loss logs and the data record."""
    import shutil

    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = load_tokenizer()
    for arch in ARCHS:
        model = AutoModelForCausalLM.from_pretrained(run / arch / "final", local_files_only=True)
        model.generation_config = GenerationConfig.from_pretrained(REFERENCE / arch)
        dest = out / arch
        model.save_pretrained(dest, safe_serialization=True)
        tok.save_pretrained(dest)
        shutil.copy(run / arch / "metrics.jsonl", out / f"sft_metrics_{arch}.jsonl")
        shutil.copy(run / arch / "sft_config.json", out / "sft_config.json")
    record = json.dumps(with_lineage(data_record(run), run), indent=1)
    (out / "sft_data.json").write_text(record)
    for arch in ARCHS:  # each model names the requests it was tuned on (tuned_request_ids)
        (out / arch / "sft_data.json").write_text(record)
    log.info("exported to %s", out)


def lineage(run: Path) -> list[Path]:
    """The runs whose weights ``run`` started from (``init`` in each run's transformer
    config, ``RUN/ARCH/final``), oldest first, ``run`` last."""
    chain = [run]
    while True:
        conf = json.loads((chain[-1] / "transformer" / "sft_config.json").read_text())
        init = conf.get("init")
        if not init or Path(init).name != "final":  # from a base model (the raw-text pair)
            return chain[::-1]
        parent = Path(init).parent.parent
        if parent in chain or not (parent / "sft_data.json").is_file():
            raise ValueError(f"{chain[-1]} starts from {init}, whose run has no sft_data.json: "
                             "the requests it was tuned on cannot be listed")
        chain.append(parent)


def with_lineage(record: dict, run: Path) -> dict:
    """``record`` with every earlier phase's request ids added to ``ids`` (the exclusion
    list: a model tuned in phases was tuned on the union) and ``phases`` listing the runs.
    A first run that starts from an exported tuned model (a directory with the
    ``sft_data.json`` that ``export`` writes, e.g. the shipped pair) inherits that model's
    phases and ids."""
    phases: list[dict] = []
    chain = lineage(run)
    base = json.loads((chain[0] / "transformer" / "sft_config.json").read_text()).get("init")
    exported = Path(base) / "sft_data.json" if base else None
    if exported is not None and exported.is_file():  # a tuned model `export` wrote: its phases
        old_record = json.loads(exported.read_text())
        mine = {str(r) for r in chain}  # re-exported after the swap: its own phases once
        phases.extend(ph for ph in old_record.get("phases", []) if ph["run"] not in mine)
        _add_ids(record, old_record["requests"]["files"])
    for earlier in chain:
        old = json.loads((earlier / "sft_data.json").read_text())["requests"]["files"]
        conf = json.loads((earlier / "transformer" / "sft_config.json").read_text())
        phases.append({"run": str(earlier), "steps": conf["steps"], "seed": conf["seed"],
                       "lr": conf["lr"], "request_ids": sum(len(v["ids"]) for v in old.values())})
        _add_ids(record, old)
    record["phases"] = phases
    return record


def _add_ids(record: dict, files: dict) -> None:
    """Add ``files``' request ids (an earlier phase's, per request file) to ``record``'s."""
    for name, info in files.items():
        mine = record["requests"]["files"].setdefault(name, {k: v for k, v in info.items()
                                                             if k != "ids"} | {"ids": []})
        mine["ids"] = sorted(set(mine["ids"]) | set(info["ids"]))


def data_record(run: Path) -> dict:
    """``RUN/sft_data.json`` plus what the steps run actually read: per request file the
    ids seen (a run shorter than its data reads a prefix), per task the examples seen.
    Every id built into the data stays listed under ``ids`` (the exclusion list)."""
    record = json.loads((run / "sft_data.json").read_text())
    conf = json.loads((run / "transformer" / "sft_config.json").read_text())
    cfg = SFTConfig(**{k: v for k, v in conf.items() if k in SFTConfig.__dataclass_fields__})
    examples = read_examples(run)
    seen = {i for rows in batch_order(examples, cfg) for i in rows}
    seen_ids = {examples[i]["id"] for i in seen}
    for info in record["requests"]["files"].values():
        info["seen_in_training"] = sum(i in seen_ids for i in info["ids"])
    tasks: dict[str, int] = {}
    for i in seen:
        tasks[examples[i]["task"]] = tasks.get(examples[i]["task"], 0) + 1
    record["seen_in_training"] = {"steps": cfg.steps, "batch_size": cfg.batch_size,
                                  "examples": len(seen), "by_task": dict(sorted(tasks.items()))}
    return record


def plot(runs: list[Path], out: Path, window: int = 20) -> None:
    """Training loss per task group (moving average of ``window`` steps), both models;
    several runs (phases, each from the previous one's weights) are drawn one after another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    offset = 0
    for n, run in enumerate(runs):
        last = 0
        for arch, color in zip(ARCHS, ("C0", "C1"), strict=True):
            path = run / arch / "metrics.jsonl"
            if not path.exists():
                continue
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            last = max(last, rows[-1]["step"])
            for ax, key in zip(axes, ("loss_copy", "loss_write", "loss_real"), strict=True):
                pts = [(r["step"] + offset, r[key]) for r in rows if key in r]
                if not pts:
                    continue
                s, v = np.asarray(pts).T
                k = min(window, len(v))
                ax.plot(s[k - 1:], np.convolve(v, np.ones(k) / k, "valid"), color=color,
                        label=arch if n == 0 else None)
                ax.set_title(key.replace("loss_", "") + " examples")
        offset += last
        if n < len(runs) - 1:
            for ax in axes:
                ax.axvline(offset, color="grey", lw=0.8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("answer loss (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="build the examples (both models use the same file)")
    t = sub.add_parser("train", help="tune one architecture (resumes from its checkpoint)")
    for sp in (d, t):
        sp.add_argument("--run", type=Path, default=Path("runs/sft/run"))
        for f in ("steps", "batch_size", "max_len", "warmup", "seed", "ckpt_every"):
            sp.add_argument("--" + f.replace("_", "-"), dest=f, type=int)
        for f in ("lr", "min_lr", "weight_decay", "real_share"):
            sp.add_argument("--" + f.replace("_", "-"), dest=f, type=float)
    d.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    d.add_argument("--requests", type=Path, default=sft_data.REQUESTS_DIR)
    d.add_argument("--record", type=Path, help="also copy sft_data.json here")
    d.add_argument("--shares", help="synthetic task mix, e.g. repeat=0.5,fix_bug=0.5 "
                                    "(default: sft_data.TASK_SHARES)")
    d.add_argument("--replay", type=Path, help="an earlier run whose examples are mixed in")
    d.add_argument("--replay-n", type=int, default=0, help="how many of them")
    t.add_argument("--arch", choices=ARCHS, required=True)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--init", type=Path, help="start weights (default models/reference/ARCH)")
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("export", help="save both tuned models (safetensors + chat template)")
    e.add_argument("--run", type=Path, default=Path("runs/sft/run"))
    e.add_argument("--out", type=Path, default=Path("runs/sft"))
    pl = sub.add_parser("plot", help="loss curves of both models")
    pl.add_argument("--run", type=Path, action="append",
                    help="run folder; repeat for phases in order (default runs/sft/run)")
    pl.add_argument("--out", type=Path, default=Path("models/reference/sft_loss_curves.png"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.cmd in ("data", "train"):
        overrides = {k: v for k, v in vars(a).items()
                     if k in SFTConfig.__dataclass_fields__ and v is not None}
        cfg = SFTConfig(**overrides)
        if a.cmd == "data":
            shares = ({k: float(v) for k, v in (x.split("=") for x in a.shares.split(","))}
                      if a.shares else None)
            record = build_data(a.run, cfg, a.corpus, a.requests, shares, a.replay, a.replay_n)
            if a.record:
                a.record.write_text(json.dumps(record, indent=1))
        else:
            if not (a.run / "examples.jsonl").exists():
                raise SystemExit(f"{a.run}/examples.jsonl missing: run `python -m "
                                 "models.training.sft data` first")
            train(a.run, a.arch, cfg, a.init, a.threads, progress=not a.no_progress)
    elif a.cmd == "export":
        export(a.run, a.out)
    else:
        plot(a.run or [Path("runs/sft/run")], a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
