r"""Train the embedded reference pair: a tiny Olmo 3 (transformer) and a tiny Olmo Hybrid
(Gated DeltaNet + attention, 3:1), same tokenizer, data, order and recipe.

Reproduce the shipped pair (about 1 h 45 min of 2 CPU cores, both run side by side; the
model card, models/reference/README.md, has the whole pipeline)::

    python -m models.training.corpus --out data/corpus
    python -m models.training.train_reference tokenizer --corpus data/corpus --out runs/ref \
        --reuse models/reference/transformer/tokenizer.json
    for a in transformer hybrid; do
      python -m models.training.train_reference train --run runs/ref --arch $a --threads 1 \
          --steps 1100 --eval-every 50 --phases models/reference/phases.json &
    done; wait
    python -m models.training.train_reference export --run runs/ref --out models/reference

Training checkpoints every ``--ckpt-every`` steps and resumes from the last checkpoint
when rerun with the same arguments, so a stopped session loses minutes, not the run.
Every ``--eval-every`` steps it logs held-out loss per domain and the copy probe.

The copy signal (PILOT.md: without it neither tiny model learns to copy; with these two
alone, 580 steps, neither did either: the curriculum's short copy batches, over a small
alphabet first, are what broke the induction plateau):
- ``--copy-share`` of training windows carry a verbatim re-insertion of an earlier span of
  the same window (16-256 tokens, 0-512 tokens later), as quoting/editing does in real text;
- ``--synth-share`` of windows carry a span of random tokens that recurs verbatim later,
  a pure induction signal.
Both are applied to the data stream itself, so both models see identical windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np

log = logging.getLogger("archroute.train")

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class TrainConfig:
    """Every default of the recipe in one place (identical for both architectures)."""

    seq_len: int = 1024
    batch_size: int = 8
    steps: int = 1200
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    seed: int = 1234
    copy_share: float = 0.5  # windows with a natural-text span re-inserted verbatim later
    synth_share: float = 0.15  # windows with a random-token span that recurs verbatim
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 344
    vocab: int = 4096
    eval_every: int = 100
    ckpt_every: int = 50
    eval_windows: int = 12  # per domain
    # Optional curriculum (a JSON list, ``--phases FILE``): each phase applies from its
    # ``start`` step, to both models alike, and may set copy_share, synth_share,
    # synth_repeats [lo, hi] (copies of each random span), synth_max_len, and its learning
    # rate: {"kind": "cosine_total", "total": N} (the default cosine as if the run had N
    # steps) or {"kind": "interp", "from": a, "to": b, "until": step, "warmup": k} (cosine
    # from a to b); and one-time interventions at its first step: "qk_gain" (scale the
    # attention q/k norm gains) and "reset_optimizer" (fresh AdamW state). A phase may
    # also set "batch_size" (natural windows per step; 0 = none) and "copy_batch" (see
    # WindowSampler.copy_batch), whose optional "alphabet" draws the random spans from a
    # fixed subset of that many token ids: the copy circuit forms far sooner over a small
    # alphabet, and later phases widen it to the whole vocabulary; "natural" makes its rows
    # training text in which a passage recurs (copying real tokens at real distances).
    phases: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError("hidden must be divisible by heads")
        if self.layers % 4:
            raise ValueError("layers must be a multiple of 4 (hybrid is [GDN, GDN, GDN, attn] x k)")
        if not 0 <= self.copy_share + self.synth_share <= 1:
            raise ValueError("copy_share + synth_share must be in [0, 1]")


# ---------------------------------------------------------------------------------------
# tokenizer and data
# ---------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def train_tokenizer(corpus: Path, out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS, PAD], show_progress=True,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    docs = read_jsonl(corpus / "train.jsonl")
    tok.train_from_iterator((d["text"] for d in docs), trainer=trainer, length=len(docs))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    log.info("tokenizer: %d tokens -> %s", tok.get_vocab_size(), out / "tokenizer.json")


def load_hf_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token=EOS, bos_token=EOS, pad_token=PAD,
        unk_token=None, clean_up_tokenization_spaces=False,
    )


def tokenize_split(run: Path, corpus: Path, split: str) -> dict[str, np.ndarray]:
    """Token ids per domain for one split, documents joined by EOS (cached as .npy)."""
    cache = run / f"tokens_{split}.npz"
    if cache.exists():
        return dict(np.load(cache))
    tok = load_hf_tokenizer(run / "tokenizer.json")
    eos = tok.convert_tokens_to_ids(EOS)
    docs = read_jsonl(corpus / f"{split}.jsonl")
    by_domain: dict[str, list[int]] = {}
    for d in docs:
        ids = tok(d["text"], add_special_tokens=False)["input_ids"]
        by_domain.setdefault(d["domain"], []).extend([*ids, eos])
    arrays = {k: np.asarray(v, dtype=np.int32) for k, v in by_domain.items()}
    np.savez(cache, **arrays)  # type: ignore[arg-type]  # numpy's stub: **kwds could fill allow_pickle
    return arrays


class WindowSampler:
    """Deterministic training windows: step -> (batch, seq_len) int64 token ids.

    Window b of step s depends only on (seed, s, b), so both models see identical data in
    identical order, and a resumed run continues exactly where it stopped.
    """

    def __init__(self, tokens: dict[str, np.ndarray], cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.stream = np.concatenate([tokens[k] for k in sorted(tokens)])
        self.n = len(self.stream)
        if self.n <= cfg.seq_len + 1:
            raise ValueError(f"corpus too small: {self.n} tokens for windows of {cfg.seq_len}")

    def window(self, step: int, b: int) -> np.ndarray:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step, b])
        start = int(rng.integers(0, self.n - cfg.seq_len - 1))
        w = self.stream[start:start + cfg.seq_len + 1].astype(np.int64).copy()
        u = rng.random()
        ph = phase_at(step, cfg)
        copy = ph.get("copy_share", cfg.copy_share)
        synth = ph.get("synth_share", cfg.synth_share)
        if u < copy:
            insert_repeat(w, rng, synthetic=False, vocab=cfg.vocab)
        elif u < copy + synth:
            lo, hi = ph.get("synth_repeats", [1, 1])
            insert_repeat(w, rng, synthetic=True, vocab=cfg.vocab,
                          repeats=int(rng.integers(lo, hi + 1)),
                          max_len=ph.get("synth_max_len", 256))
        return w

    def batch(self, step: int) -> np.ndarray | None:
        rows = phase_at(step, self.cfg).get("batch_size", self.cfg.batch_size)
        if rows == 0:
            return None
        return np.stack([self.window(step, b) for b in range(rows)])

    def copy_batch(self, step: int) -> np.ndarray | None:
        """The phase's short synthetic copy batch, if it has one: ``size`` sequences of
        ``len`` tokens, each a random span (``span`` = [lo, hi] tokens) repeated to the end.
        Short sequences keep attention undiluted, so exact copying is learned fast. With
        ``alphabet`` = k the span tokens come from one fixed set of k ids (seeded). With
        ``natural`` the rows are training text instead, a passage of it recurring every
        0-``gap`` tokens (:meth:`_natural_copy_batch`)."""
        spec = phase_at(step, self.cfg).get("copy_batch")
        if not spec:
            return None
        if spec.get("natural"):
            return self._natural_copy_batch(step, spec)
        symbols = np.arange(2, self.cfg.vocab)  # 0/1 are EOS/PAD
        if spec.get("alphabet"):
            symbols = np.sort(np.random.default_rng([self.cfg.seed, 20_000]).choice(
                symbols, size=min(spec["alphabet"], len(symbols)), replace=False))
        rng = np.random.default_rng([self.cfg.seed, step, 10_000])
        rows = []
        for _ in range(spec["size"]):
            length = int(rng.integers(spec["span"][0], spec["span"][1] + 1))
            span = symbols[rng.integers(0, len(symbols), size=length)]
            rows.append(np.resize(span, spec["len"]))
        return np.stack(rows).astype(np.int64)

    def _natural_copy_batch(self, step: int, spec: dict) -> np.ndarray:
        """``natural`` copy batch: training-text windows of ``len`` tokens in which a passage
        of the window (``span`` = [lo, hi] tokens, log-uniform) recurs verbatim, again and
        again, each copy 0-``gap`` tokens of the window's own text after the previous one:
        quoting at many distances, in real tokens rather than random symbols."""
        rng = np.random.default_rng([self.cfg.seed, step, 30_000])
        n, gap_max = spec["len"], spec.get("gap", 256)
        rows = []
        for _ in range(spec["size"]):
            start = int(rng.integers(0, self.n - n - 1))
            w = self.stream[start:start + n].astype(np.int64).copy()
            length = int(np.exp(rng.uniform(np.log(spec["span"][0]), np.log(spec["span"][1]))))
            length = min(length, n // 2)
            pos = int(rng.integers(0, 32))
            passage = w[pos:pos + length].copy()
            pos += length + int(rng.integers(0, gap_max + 1))
            while pos < n:
                end = min(n, pos + length)
                w[pos:end] = passage[:end - pos]
                pos = end + int(rng.integers(0, gap_max + 1))
            rows.append(w)
        return np.stack(rows)


def phase_at(step: int, cfg: TrainConfig) -> dict:
    """The curriculum phase in force at ``step`` ({} without a curriculum)."""
    current: dict = {}
    for ph in cfg.phases:
        if ph["start"] <= step:
            current = ph
    return current


def insert_repeat(w: np.ndarray, rng: np.random.Generator, synthetic: bool, vocab: int,
                  repeats: int = 1, max_len: int = 256) -> None:
    """Copy a span of ``w`` (or a random-token span) to later positions, in place.

    With ``repeats`` > 1 (synthetic spans only) the span recurs that many more times, each
    copy 0-128 tokens after the previous one, as far as the window allows.
    """
    n = len(w)
    if repeats > 1:
        length = int(np.exp(rng.uniform(np.log(16), np.log(max_len))))
        length = min(length, n // (repeats + 1))
        pos = int(rng.integers(0, 64))
        span = rng.integers(2, vocab, size=length)
        for _ in range(repeats + 1):
            if pos + length > n:
                break
            w[pos:pos + length] = span
            pos += length + int(rng.integers(0, 129))
        return
    length = int(np.exp(rng.uniform(np.log(16), np.log(max_len))))
    gap = int(rng.integers(0, 513))
    if 2 * length + gap > n:
        gap = max(0, n - 2 * length)
        length = min(length, n // 2)
    src = int(rng.integers(0, n - 2 * length - gap + 1))
    if synthetic:
        w[src:src + length] = rng.integers(2, vocab, size=length)  # 0/1 are EOS/PAD
    dst = src + length + gap
    w[dst:dst + length] = w[src:src + length]


def copy_probe(val: dict[str, np.ndarray], seq_len: int, seed: int = 7,
               per_cell: int = 16) -> list[dict]:
    """Held-out copy probe: filler, passage P, filler of ``distance`` tokens, P again.

    Loss is read on both occurrences of P; a model that copies drives the second one
    toward zero. Returns items with ids and the spans of both occurrences.
    """
    rng = np.random.default_rng(seed)
    items = []
    groups = {"code": ["code"], "prose": ["rest", "dict", "markdown"]}
    for group, domains in groups.items():
        parts = [val[d] for d in domains if d in val]
        if not parts:
            continue
        pool = np.concatenate(parts)
        for length in (16, 64, 256):
            for distance in (64, 256):
                for _ in range(per_cell):
                    lead = int(rng.integers(16, 64))
                    need = lead + 2 * length + distance
                    if need > seq_len or need >= len(pool) - 1:
                        continue
                    a = int(rng.integers(0, len(pool) - need - 1))
                    ids = pool[a:a + need].astype(np.int64).copy()
                    p0 = lead
                    p1 = lead + length + distance
                    ids[p1:p1 + length] = ids[p0:p0 + length]
                    items.append({"group": group, "length": length, "distance": distance,
                                  "ids": ids, "first": (p0, p0 + length),
                                  "second": (p1, p1 + length)})
    return items


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
class _CommonConfig(TypedDict):
    """The config arguments both architectures share."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    eos_token_id: int
    bos_token_id: int
    pad_token_id: int
    tie_word_embeddings: bool
    rope_parameters: dict[str, str | float]


def model_config(arch: str, cfg: TrainConfig, eos_id: int, pad_id: int):
    common = _CommonConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=cfg.seq_len * 4,
        eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=pad_id,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if arch == "transformer":
        from transformers import Olmo3Config

        # Olmo 3 7B interleaves 3 sliding-window (4096) layers with 1 full layer. Our
        # windows are 1024 tokens, inside a 4096 window, so every layer sees the whole
        # context, exactly as the real model's sliding layers do on requests <= 4096 tokens.
        return Olmo3Config(**common, sliding_window=4096,
                           layer_types=["full_attention"] * cfg.layers)
    if arch == "hybrid":
        from transformers import OlmoHybridConfig

        head = cfg.hidden // cfg.heads
        return OlmoHybridConfig(
            **common,
            layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (cfg.layers // 4),
            linear_num_key_heads=cfg.heads, linear_num_value_heads=cfg.heads,
            linear_key_head_dim=head, linear_value_head_dim=2 * head,  # real model: 96 / 192
            linear_conv_kernel_dim=4, linear_allow_neg_eigval=True,
        )
    raise ValueError(f"unknown arch {arch!r}: expected 'transformer' or 'hybrid'")


def tokens_seen(step: int, cfg: TrainConfig) -> dict[str, int]:
    """Training tokens (input positions) one model has seen after ``step`` steps, by kind:
    ``natural`` windows (with their inserted repeats) and short ``copy`` batches."""
    natural = copy = 0
    for s in range(step):
        ph = phase_at(s, cfg)
        natural += ph.get("batch_size", cfg.batch_size) * cfg.seq_len
        if ph.get("copy_batch"):
            copy += ph["copy_batch"]["size"] * ph["copy_batch"]["len"]
    return {"natural": natural, "copy": copy, "total": natural + copy}


def scale_qk_gains(model, gain: float) -> None:
    """Multiply every attention q/k RMSNorm gain by ``gain`` (raises the cap on attention
    logits, which QK-norm ties to sqrt(head_dim) x gain_q x gain_k)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
                p.mul_(gain)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr to min_lr over the run's steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    sched = phase_at(step, cfg).get("lr", {"kind": "cosine_total", "total": cfg.steps})
    if sched["kind"] == "interp":
        start = phase_at(step, cfg)["start"]
        if step - start < sched.get("warmup", 0):  # e.g. after an optimizer reset
            return sched["from"] * (step - start + 1) / sched["warmup"]
        t = (step - start) / max(1, sched["until"] - start)
        return sched["to"] + 0.5 * (sched["from"] - sched["to"]) * (1 + math.cos(math.pi * min(1.0, t)))
    total = sched["total"]
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def token_losses(model, ids) -> np.ndarray:
    """Per-token next-token loss (nats), shape (batch, seq_len - 1)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none")
    return loss.view(ids.shape[0], -1).numpy()


def evaluate(model, val: dict[str, np.ndarray], probe: list[dict], cfg: TrainConfig) -> dict:
    """Held-out loss per domain (fixed windows) and the copy probe (mean loss per cell)."""
    import torch

    model.eval()
    out: dict = {"val": {}, "probe": {}}
    for dom in sorted(val):
        arr = val[dom]
        if len(arr) <= cfg.seq_len + 1:
            continue
        starts = np.linspace(0, len(arr) - cfg.seq_len - 1, cfg.eval_windows).astype(int)
        ids = torch.from_numpy(np.stack([arr[s:s + cfg.seq_len] for s in starts]).astype(np.int64))
        losses = np.concatenate([token_losses(model, ids[i:i + 4]) for i in range(0, len(ids), 4)])
        out["val"][dom] = float(losses.mean())
    out["val_mean"] = float(np.mean(list(out["val"].values())))
    cells: dict[str, list[tuple[float, float]]] = {}
    for it in probe:
        ids = torch.from_numpy(it["ids"][None])
        tl = token_losses(model, ids)[0]  # tl[j] is the loss of token j+1
        a0, a1 = it["first"]
        b0, b1 = it["second"]
        # skip each occurrence's first token: it cannot be predicted from the repeat
        first = float(tl[a0:a1 - 1].mean())
        second = float(tl[b0:b1 - 1].mean())
        cells.setdefault(f"{it['group']}/L{it['length']}/D{it['distance']}", []).append((first, second))
    for key, vals in sorted(cells.items()):
        arr2 = np.asarray(vals)
        out["probe"][key] = {"first": float(arr2[:, 0].mean()), "second": float(arr2[:, 1].mean())}
    model.train()
    return out


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------
def cmd_tokenizer(a: argparse.Namespace) -> None:
    a.out.mkdir(parents=True, exist_ok=True)
    if a.reuse:
        # BPE training breaks ties between equal merge counts differently from run to run
        # (measured: 4,095 of 4,096 tokens shared), so an exact reproduction reuses the
        # shipped tokenizer instead of training a new one
        import shutil

        shutil.copy(a.reuse, a.out / "tokenizer.json")
        log.info("tokenizer: copied %s", a.reuse)
    else:
        train_tokenizer(a.corpus, a.out, a.vocab)
    (a.out / "corpus_path.txt").write_text(str(a.corpus.resolve()))


def cmd_train(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    run: Path = a.run
    corpus = Path((run / "corpus_path.txt").read_text().strip())
    overrides = {k: v for k, v in vars(a).items()
                 if k in TrainConfig.__dataclass_fields__ and v is not None and k != "phases"}
    if a.phases:
        overrides["phases"] = json.loads(Path(a.phases).read_text())
    cfg = TrainConfig(**overrides)
    tok = load_hf_tokenizer(run / "tokenizer.json")
    eos_id, pad_id = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(PAD)
    cfg.vocab = len(tok)
    train_tokens = tokenize_split(run, corpus, "train")
    val_tokens = tokenize_split(run, corpus, "val")
    sampler = WindowSampler(train_tokens, cfg)
    probe = copy_probe(val_tokens, cfg.seq_len)

    out = run / a.arch
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    torch.manual_seed(cfg.seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(model_config(a.arch, cfg, eos_id, pad_id))

    def new_optimizer():
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

    opt = new_optimizer()
    step = 0
    if a.init_from and not ckpt_path.exists():
        # Restart from a snapshot's weights with a fresh optimizer at step --start-step,
        # optionally scaling the attention q/k RMSNorm gains (see the model card).
        from safetensors.torch import load_file

        sd = load_file(str(Path(a.init_from) / "model.safetensors"))
        if "lm_head.weight" not in sd:
            raise ValueError("snapshot has no lm_head.weight")
        model.load_state_dict(sd, strict=False)
        if a.qk_gain != 1.0:
            scale_qk_gains(model, a.qk_gain)
        step = a.start_step
        log.info("%s: initialised from %s at step %d (q/k norm gain x%.3f, fresh optimizer)",
                 a.arch, a.init_from, step, a.qk_gain)
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log.info("%s: resumed at step %d", a.arch, step)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %d parameters, %d steps of %d x %d tokens", a.arch, n_params, cfg.steps,
             cfg.batch_size, cfg.seq_len)
    metrics = open(out / "metrics.jsonl", "a")
    model.train()
    t0, tokens_done = time.time(), 0
    while step < cfg.steps:
        if step % cfg.eval_every == 0 and not (out / f"eval_{step}.done").exists():
            ev = evaluate(model, val_tokens, probe, cfg)
            metrics.write(json.dumps({"step": step, "tokens": tokens_seen(step, cfg)["total"], **ev}) + "\n")
            metrics.flush()
            (out / f"eval_{step}.done").touch()
            log.info("%s step %d: val %.3f probe %s", a.arch, step, ev["val_mean"],
                     {k: round(v["second"], 2) for k, v in ev["probe"].items() if "L64" in k})
        ph = phase_at(step, cfg)
        if ph.get("start") == step and (ph.get("reset_optimizer") or ph.get("qk_gain")):
            # one-time interventions at a phase's first step (identical for both models)
            if ph.get("qk_gain"):
                scale_qk_gains(model, ph["qk_gain"])
            if ph.get("reset_optimizer"):
                opt = new_optimizer()
            log.info("%s step %d: phase start (qk_gain %s, reset_optimizer %s)", a.arch, step,
                     ph.get("qk_gain"), ph.get("reset_optimizer"))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        nat, cb = sampler.batch(step), sampler.copy_batch(step)
        if nat is None and cb is None:
            raise ValueError(f"step {step}: the phase has neither natural windows nor a copy batch")
        loss = torch.zeros(())
        copy_loss = None
        if nat is not None:
            batch = torch.from_numpy(nat)
            loss = loss + model(input_ids=batch, labels=batch).loss  # labels are shifted inside
            tokens_done += batch.shape[0] * (batch.shape[1] - 1)
        if cb is not None:
            cbt = torch.from_numpy(cb)
            copy_loss = model(input_ids=cbt, labels=cbt).loss
            loss = loss + copy_loss
            tokens_done += cbt.shape[0] * (cbt.shape[1] - 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        step += 1
        if step % 10 == 0:
            tps = tokens_done / (time.time() - t0)
            rec = {"step": step, "train_loss": loss.item(), "lr": lr_at(step - 1, cfg),
                   "grad_norm": float(gnorm), "tok_per_s": tps}
            if copy_loss is not None:
                rec["copy_loss"] = copy_loss.item()
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            log.info("%s step %d/%d loss %.3f copy %s %.0f tok/s", a.arch, step, cfg.steps, loss.item(),
                     "-" if copy_loss is None else f"{copy_loss.item():.3f}", tps)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
            os.replace(tmp, ckpt_path)
            if step % cfg.eval_every == 0:
                snap = out / f"step_{step}"
                model.save_pretrained(snap)
    if not (out / f"eval_{step}.done").exists():
        ev = evaluate(model, val_tokens, probe, cfg)
        metrics.write(json.dumps({"step": step, "tokens": tokens_seen(step, cfg)["total"], **ev}) + "\n")
        (out / f"eval_{step}.done").touch()
    model.save_pretrained(out / "final")
    log.info("%s: done, %d steps", a.arch, step)


def cmd_export(a: argparse.Namespace) -> None:
    """Copy tokenizer and final models to the shipped directory, plus training logs."""
    import shutil

    from transformers import AutoModelForCausalLM

    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    tok = load_hf_tokenizer(a.run / "tokenizer.json")
    for arch in ("transformer", "hybrid"):
        model = AutoModelForCausalLM.from_pretrained(a.run / arch / (a.snapshot or "final"))
        cfg = json.loads((a.run / arch / "train_config.json").read_text())
        model.config.max_position_embeddings = cfg["seq_len"]  # the trained context
        model.generation_config.pad_token_id = tok.pad_token_id
        dest = out / arch
        model.save_pretrained(dest, safe_serialization=True)
        tok.save_pretrained(dest)
        shutil.copy(a.run / arch / "metrics.jsonl", out / f"metrics_{arch}.jsonl")
        shutil.copy(a.run / arch / "train_config.json", out / "train_config.json")
    log.info("exported to %s", out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    t.add_argument("--corpus", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True, help="run directory")
    t.add_argument("--vocab", type=int, default=TrainConfig.vocab)
    t.add_argument("--reuse", type=Path, metavar="TOKENIZER_JSON",
                   help="copy this tokenizer.json (e.g. the shipped one) instead of training")
    t.set_defaults(func=cmd_tokenizer)
    tr = sub.add_parser("train", help="train one architecture (resumes from its checkpoint)")
    tr.add_argument("--run", type=Path, required=True)
    tr.add_argument("--arch", choices=["transformer", "hybrid"], required=True)
    tr.add_argument("--threads", type=int, default=2)
    for f in ("seq_len", "batch_size", "steps", "warmup", "eval_every", "ckpt_every", "eval_windows",
              "hidden", "layers", "heads", "intermediate", "seed"):
        tr.add_argument("--" + f.replace("_", "-"), dest=f, type=int)
    for f in ("lr", "min_lr", "copy_share", "synth_share"):
        tr.add_argument("--" + f.replace("_", "-"), dest=f, type=float)
    tr.add_argument("--phases", type=Path, help="curriculum JSON (see TrainConfig.phases)")
    tr.add_argument("--init-from", type=Path, help="start from this snapshot's weights (fresh optimizer)")
    tr.add_argument("--start-step", type=int, default=0, help="step number of --init-from")
    tr.add_argument("--qk-gain", type=float, default=1.0,
                    help="multiply attention q/k norm gains of --init-from by this")
    tr.set_defaults(func=cmd_train)
    e = sub.add_parser("export", help="write the shipped model directories")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--out", type=Path, default=Path("models/reference"))
    e.add_argument("--snapshot", help="e.g. step_600 (default: final)")
    e.set_defaults(func=cmd_export)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    a.func(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
