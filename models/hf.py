"""In-process Hugging Face backend: any local transformers causal-LM directory.

Olmo3ForCausalLM, OlmoHybridForCausalLM, Llama-style models and others load the same way,
offline (``local_files_only``). CPU by default in float32 (CPUs without bf16 instructions
run bf16 matmuls hundreds of times slower); on CUDA the checkpoint's dtype (bf16) is used.

Prompts: a chat conversation goes through the tokenizer's chat template when it has one;
otherwise through the documented plain fallback (:func:`plain_chat_prompt`)::

    System: ...

    User: ...

    Assistant:
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from models.base import (
    Backend,
    BackendError,
    BackendInfo,
    FinishReason,
    GenerationParams,
    GenerationResult,
    Prompt,
    PromptScore,
    RequestError,
    ScoreResult,
    StreamChunk,
    TokenIds,
    plain_chat_prompt,
)
from models.cost import LINEAR, CostModel

log = logging.getLogger(__name__)

HYBRID_MODEL_TYPES = {"olmo_hybrid", "qwen3_next", "jamba", "zamba", "zamba2", "falcon_h1",
                      "bamba", "granitemoehybrid", "nemotron_h", "mamba", "mamba2", "rwkv"}


def detect_architecture(config: Any) -> str:
    """'hybrid' when the config has recurrent/linear layers, 'transformer' otherwise."""
    types = getattr(config, "layer_types", None) or []
    if config.model_type in HYBRID_MODEL_TYPES or LINEAR in types or "mamba" in types:
        return "hybrid"
    return "transformer"


class CacheSession(Protocol):
    """One generation's prefix reuse (:class:`models.prefix_cache.PrefixSession`, which
    imports this module: Protocols here keep the import one way): ``cache`` (None: fresh)
    already holds the first ``start`` prompt ids; ``read`` after each forward, ``close``
    when the generation ended without an error (at its end, or its consumer closed it)."""

    cache: Any
    start: int

    def read(self, tokens: Sequence[int], cache: Any) -> None: ...

    def close(self) -> None: ...


class PrefixStore(Protocol):
    """Where :meth:`HFBackend.stream` resumes from (:class:`models.prefix_cache.PrefixCache`)."""

    def open(self, ids: Sequence[int]) -> CacheSession: ...


class HFBackend(Backend):
    """A local transformers model served in-process. Thread-safe: forward passes are
    serialised by a lock (``max_concurrency`` bounds waiting callers in the router).
    ``prefix_cache`` (None: off; ``archroute serve-model`` sets one) lets a generation
    resume from an earlier one's cache when its prompt starts with what that one read."""

    accepts_token_ids = True
    can_score_prompt = True
    prefix_cache: PrefixStore | None = None

    def __init__(self, name: str, path: str | Path, architecture: str | None = None,
                 device: str | None = None, max_concurrency: int = 1,
                 torch_threads: int | None = None) -> None:
        super().__init__(name, max_concurrency)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"{self.path}: not a model directory (no config.json)")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if self.device == "cpu" else "auto"
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        # transformers types PreTrainedModel.to as @wraps(nn.Module.to): the unbound signature
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, local_files_only=True, dtype=dtype).to(self.device).eval()  # type: ignore[arg-type]
        self.config = self.model.config
        self.architecture = architecture or detect_architecture(self.config)
        self.forward_lock = threading.Lock()  # held by every forward pass (the span decoder holds both models')
        eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        if gen_eos is not None:
            self.eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        bos = self.tokenizer.bos_token_id
        self.prefix_id: int = bos if bos is not None else next(iter(self.eos_ids), 0)
        self.context_length: int = int(getattr(self.config, "max_position_embeddings", 2048))
        # transformers >= 5.x renamed ``past_key_values`` to ``cache``; accept both
        import inspect

        self.cache_kw = ("cache" if "cache" in inspect.signature(self.model.forward).parameters
                          else "past_key_values")

    # ---- facts -----------------------------------------------------------------------
    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.name, architecture=self.architecture,  # type: ignore[arg-type]
            parameters=sum(p.numel() for p in self.model.parameters()),
            layer_types=tuple(getattr(self.config, "layer_types", None) or ()),
            context_length=self.context_length, location=str(self.path),
        )

    def cost_model(self) -> CostModel | None:
        try:
            return CostModel.from_config(self.config, dtype_bytes=4 if self.device == "cpu" else 2)
        except (AttributeError, ValueError) as exc:
            log.warning("%s: no cost model (%s)", self.name, exc)
            return None

    # ---- prompts ---------------------------------------------------------------------
    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The ids the model reads before the answer: ``[start token, *tokens of the rendered
        prompt]``, or a :class:`TokenIds` prompt exactly as given (checked against the
        vocabulary)."""
        if not isinstance(prompt, TokenIds):
            return [self.prefix_id, *self.encode(self.render(prompt))]
        vocab = int(self.model.get_input_embeddings().num_embeddings)
        bad = [i for i in prompt.ids if not 0 <= i < vocab]
        if not prompt.ids or bad:
            raise RequestError("prompt: token ids must be a non-empty list of ids in "
                               f"[0, {vocab})" + (f"; got {bad[0]}" if bad else ""))
        return list(prompt.ids)

    # ---- generation ------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        text, n_out = "", 0
        reason: FinishReason = "length"
        n_prompt = 0
        for chunk in self.stream(prompt, params):
            text += chunk.text
            if chunk.finish_reason is not None:
                reason = chunk.finish_reason
                n_prompt = chunk.prompt_tokens or 0
                n_out = chunk.completion_tokens or 0
        return GenerationResult(text, n_prompt, n_out, reason)

    def stream(self, prompt: Prompt, params: GenerationParams) -> Iterator[StreamChunk]:
        """Token-by-token decoding with the model's cache; text is emitted as soon as it
        decodes to whole characters, and held back while it could begin a stop sequence."""
        import torch

        ids = self.prompt_ids(prompt)
        room = self.context_length - len(ids)
        if room < 1:  # only a prompt that alone fills the context is the client's error
            raise RequestError(
                f"the prompt is {len(ids)} tokens (with the start token); the context length of {self.name} is "
                f"{self.context_length} tokens, which leaves no room to generate")
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(params.seed if params.seed is not None else int(torch.seed() % 2**63))
        out_ids: list[int] = []
        out = StreamText(self.tokenizer, params.stop)
        reason: FinishReason = "length"
        with self.forward_lock, torch.no_grad():
            reuse = self.prefix_cache.open(ids) if self.prefix_cache is not None else None
            try:
                start = reuse.start if reuse is not None else 0
                input_ids = torch.tensor([ids[start:]], device=self.device)
                past = reuse.cache if reuse is not None else None
                for _ in range(max_new):
                    res = self.model(input_ids=input_ids, use_cache=True, **{self.cache_kw: past})
                    past = getattr(res, "cache", None) or res.past_key_values
                    if reuse is not None:
                        reuse.read(input_ids[0].tolist(), past)
                    logits = res.logits[0, -1].float().cpu()
                    nxt = sample_next(logits, params.temperature, params.top_p, gen)
                    if nxt in self.eos_ids and not params.ignore_eos:
                        reason = "stop"
                        break
                    out_ids.append(nxt)
                    piece = out.push(nxt)
                    if piece is None:  # a stop sequence completed
                        reason = "stop"
                        break
                    # one chunk per decode step (empty while text is held back), so a
                    # consumer that stops reading stops the decoding within one step
                    lp = top = None
                    if params.logprobs:
                        logp = logits - torch.logsumexp(logits, 0)
                        lp = (float(logp[nxt]),)
                        if params.top_logprobs:  # the k most likely and the chosen one
                            v, i = torch.topk(logp, min(params.top_logprobs, len(logp)))
                            top = (dict(zip(i.tolist(), v.tolist(), strict=True))
                                   | {nxt: lp[0]},)
                    try:
                        yield StreamChunk(piece, token_ids=(nxt,), token_logprobs=lp,
                                          top_logprobs=top)
                    except GeneratorExit:  # the consumer left: the cache is whole, keep it
                        if reuse is not None:
                            reuse.close()
                        raise
                    input_ids = torch.tensor([[nxt]], device=self.device)
                if reuse is not None:
                    reuse.close()
            except RequestError:
                raise
            except Exception as exc:  # noqa: BLE001 - surfaced as a backend failure
                raise BackendError(f"{self.name}: generation failed: {exc}") from exc
        rest = out.finish()
        if rest:
            yield StreamChunk(rest)
        yield StreamChunk("", reason, len(ids) - 1, len(out_ids))

    # ---- scoring ---------------------------------------------------------------------
    def score(self, prompt: str, continuation: str) -> ScoreResult:
        return self.score_batch([(prompt, continuation)])[0]

    def score_prompt(self, prompt: Prompt) -> PromptScore:
        """One forward over the ids :meth:`stream` would read (``[start token, *prompt]``,
        the last ``context_length`` of them), under the forward lock: each prompt token's
        log-probability given the ones before it, as ``archroute label`` records them
        (:attr:`ScoreResult.prompt_logprobs`)."""
        ids = self.prompt_ids(prompt)[-self.context_length:]
        if len(ids) < 2:
            return PromptScore([], [], [])
        lp = self.score_ids([ids], batch_size=1)[0]
        rest = ids[1:]
        return PromptScore([self.tokenizer.decode([i]) for i in rest], [float(x) for x in lp],
                           rest)

    def score_batch(self, pairs: Sequence[tuple[str, str]], batch_size: int = 8) -> list[ScoreResult]:
        """Teacher-forced log-probabilities of each continuation given its prompt.

        Prompt and continuation are tokenized separately and joined (so the continuation's
        tokens do not depend on the prompt's last characters), after one start token. When
        the whole exceeds the context, the prompt is cut from the left.
        """
        seqs: list[list[int]] = []
        starts: list[int] = []
        for prompt, cont in pairs:
            p, c = self.encode(prompt), self.encode(cont)
            if not c:
                raise RequestError("continuation is empty")
            room = self.context_length - 1 - len(c)
            if room < 0:
                raise RequestError(
                    f"continuation ({len(c)} tokens) exceeds the context ({self.context_length})")
            p = p[-room:] if room else []
            seqs.append([self.prefix_id, *p, *c])
            starts.append(1 + len(p))
        logps = self.score_ids(seqs, batch_size=batch_size)
        results = []
        for seq, start, lp in zip(seqs, starts, logps, strict=True):
            cont_ids = seq[start:]
            results.append(ScoreResult(
                tokens=self.tokenizer.convert_ids_to_tokens(cont_ids),
                logprobs=[float(x) for x in lp[start - 1:]],
                token_ids=cont_ids,
                prompt_ids=seq[1:start],
                prompt_logprobs=[float(x) for x in lp[:start - 1]],
            ))
        return results

    def forward_batches(self, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> Iterator[Any]:
        """Teacher-forced forward passes: yields ``(indices, ids, logits)`` per batch, the
        sequences sorted by length and right-padded (causal models: padding on the right
        never changes earlier positions); ``ids`` and float32 ``logits`` are tensors of shape
        (batch, width) and (batch, width, vocab), row r being ``seqs[indices[r]]``. Holds the
        forward lock while it runs."""
        import torch

        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_id
        with self.forward_lock, torch.no_grad():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, :len(seqs[i])] = torch.tensor(list(seqs[i]))
                    mask[r, :len(seqs[i])] = 1
                try:
                    logits = self.model(input_ids=ids.to(self.device),
                                        attention_mask=mask.to(self.device)).logits.float()
                except Exception as exc:  # noqa: BLE001
                    raise BackendError(f"{self.name}: scoring failed: {exc}") from exc
                yield idx, ids.to(self.device), logits

    def score_ids(self, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> list[np.ndarray]:
        """log p(seq[i] | seq[:i]) for i = 1..n-1 of each sequence (nats), float32 arrays."""
        import torch

        out: list[np.ndarray | None] = [None] * len(seqs)
        for idx, ids, logits in self.forward_batches(seqs, batch_size):
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tok_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu().numpy()
            for r, i in enumerate(idx):
                out[i] = tok_lp[r, :len(seqs[i]) - 1].astype(np.float32)
        return [x for x in out if x is not None]


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text a model with ``tokenizer`` is given for ``prompt``: a string as is, a
    conversation through the tokenizer's chat template (:func:`plain_chat_prompt` without
    one). A :class:`TokenIds` prompt is read as ids (``prompt_ids``), never rendered."""
    if isinstance(prompt, TokenIds):
        raise RequestError("prompt: token ids are read as they are, not rendered as text")
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.plain()} for m in prompt],
            tokenize=False, add_generation_prompt=True)
    return plain_chat_prompt(prompt)


def sample_next(logits, temperature: float, top_p: float, gen) -> int:
    """Greedy when temperature == 0; else temperature + nucleus (top_p) sampling."""
    import torch

    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # a temperature that underflows: greedy
        return int(torch.argmax(logits))
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        keep[0] = True  # the nucleus holds at least the top token (a top_p that underflows)
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop sequence in ``text[start:]`` (None: none)."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class _IncrementalDetokenizer:
    """Decode a growing token list in O(1) tokens per step: only the tokens since the last
    complete character are decoded again (byte-level BPE can split a character across
    tokens; a partial one decodes to U+FFFD and is held back until it completes)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the tokens decoded for context
        self.read = 0  # tokens up to here have been returned as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; return the new whole characters it completes ('' if none yet)."""
        self.ids.append(token_id)
        done = self._decode(self.ids[self.prefix:self.read])
        full = self._decode(self.ids[self.prefix:])
        if len(full) > len(done) and not full.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full[len(done):]
        return ""

    def flush(self) -> str:
        """What is left undecoded at the end (may hold U+FFFD for an unfinished character)."""
        done = self._decode(self.ids[self.prefix:self.read])
        return self._decode(self.ids[self.prefix:])[len(done):]


class StreamText:
    """The text side of streamed decoding, shared by :class:`HFBackend` and the span decoder
    (:mod:`models.span.decoder`): incremental detokenization, stop sequences and holdback.

    ``push(token_id)`` after each generated token returns the text safe to send now ('' while
    it could still begin a stop sequence or ends in a partial character), or None when a stop
    sequence has completed (stop decoding). ``finish()`` returns what is left to send at the
    end, cut at the first stop sequence. ``text`` is the decoded generation so far (whole
    characters only) and ``emitted`` how many of its characters have been returned.
    """

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.detok = _IncrementalDetokenizer(tokenizer)
        self.stops = list(stops)
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0

    def push(self, token_id: int) -> str | None:
        piece = self.detok.push(token_id)
        self.text += piece
        # a stop sequence can only end in the new piece: search just the tail
        tail = max(0, len(self.text) - len(piece) - self.longest_stop)
        if _find_stop(self.text, self.stops, tail) is not None:
            return None
        safe = len(self.text) - _holdback(self.text, self.stops)
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def finish(self) -> str:
        final = self.text + self.detok.flush()
        cut = _find_stop(final, self.stops)
        if cut is not None:
            final = final[:cut]
        rest = final[self.emitted:] if len(final) > self.emitted else ""
        self.emitted = max(self.emitted, len(final))
        return rest


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could be the start of a stop sequence."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best


def build(cfg, role: str | None = None, torch_threads: int | None = None) -> HFBackend:
    """The registry's factory for kind ``hf`` (models/registry.py): ``path`` is a local model
    directory (``reference:transformer`` / ``reference:hybrid`` go to
    :func:`models.reference_pair.build`); ``role``, when given, is the architecture the
    operator states (else it is detected from the config)."""
    from models.registry import BackendSpecError

    if not cfg.path:
        raise BackendSpecError(f"{cfg.name}: kind hf needs a path")
    arch = role if role in ("transformer", "hybrid", "other") else None
    return HFBackend(cfg.name, cfg.path, architecture=arch, **hf_kwargs(cfg, torch_threads))


def hf_kwargs(cfg, torch_threads: int | None) -> dict:
    """HFBackend's keyword arguments from a backend config (the registry's)."""
    return {"device": cfg.device, "torch_threads": torch_threads,
            "max_concurrency": cfg.max_concurrency or 1}
