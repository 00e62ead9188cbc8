"""Analytic cost model: FLOPs and memory of a request as a function of its lengths.

Counts, per layer type, what one token costs in a forward pass (2 FLOPs per
multiply-accumulate) and what a sequence keeps in memory while it is served:

- full attention: projections + attention over the whole context; KV cache grows with
  context (2 x kv_heads x head_dim per token per layer);
- sliding-window attention: the same, but attention and the KV cache are capped at the
  window (an engine that evicts beyond the window; ``evict_sliding=False`` models one that
  does not);
- Gated DeltaNet (linear attention): projections, a short causal convolution, and a
  recurrent state update per head (dk x dv matrix: decay, read, delta write, query read,
  about 4 multiply-adds per entry); memory is a constant state per layer, whatever the
  context.

Embedding lookups, norms, rotary and softmax are ignored (small next to the matmuls).
All counts are per sequence; memory in bytes at ``dtype_bytes`` per value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"


@dataclass(frozen=True)
class CostModel:
    """Per-sequence FLOPs and memory for a decoder-only model described by its config."""

    hidden: int
    intermediate: int
    vocab: int
    layer_types: tuple[str, ...]
    heads: int
    kv_heads: int
    head_dim: int
    sliding_window: int | None = None
    gdn_key_heads: int = 0
    gdn_value_heads: int = 0
    gdn_key_dim: int = 0
    gdn_value_dim: int = 0
    gdn_conv: int = 4
    dtype_bytes: int = 2
    evict_sliding: bool = True
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.layer_types) - {FULL, SLIDING, LINEAR}
        if unknown:
            raise ValueError(f"unknown layer types {sorted(unknown)}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need sliding_window")
        if LINEAR in self.layer_types and not (self.gdn_key_dim and self.gdn_value_dim):
            raise ValueError("linear_attention layers need GDN key/value dims")

    # ---- construction ------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, dtype_bytes: int = 2) -> CostModel:
        """From a transformers config (Olmo3, OlmoHybrid, Llama-style...)."""
        n = config.num_hidden_layers
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        types = tuple(getattr(config, "layer_types", None) or [FULL] * n)
        window = getattr(config, "sliding_window", None)
        return cls(
            hidden=config.hidden_size, intermediate=config.intermediate_size,
            vocab=config.vocab_size, layer_types=types, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            sliding_window=window if SLIDING in types else None,
            gdn_key_heads=getattr(config, "linear_num_key_heads", 0) or 0,
            gdn_value_heads=getattr(config, "linear_num_value_heads", 0) or 0,
            gdn_key_dim=getattr(config, "linear_key_head_dim", 0) or 0,
            gdn_value_dim=getattr(config, "linear_value_head_dim", 0) or 0,
            gdn_conv=getattr(config, "linear_conv_kernel_dim", 4) or 4,
            dtype_bytes=dtype_bytes, name=getattr(config, "model_type", ""),
        )

    @classmethod
    def olmo3_7b(cls) -> CostModel:
        """Olmo 3 7B: 32 layers, d=4096, 32 heads, 3:1 sliding-window (4096) : full."""
        return cls(hidden=4096, intermediate=11008, vocab=100352,
                   layer_types=(SLIDING, SLIDING, SLIDING, FULL) * 8, heads=32, kv_heads=32,
                   head_dim=128, sliding_window=4096, name="olmo3-7b")

    @classmethod
    def olmo_hybrid_7b(cls) -> CostModel:
        """Olmo Hybrid 7B: [GDN, GDN, GDN, attention] x 8, d=3840, 30 heads, dk 96, dv 192."""
        return cls(hidden=3840, intermediate=11008, vocab=100352,
                   layer_types=(LINEAR, LINEAR, LINEAR, FULL) * 8, heads=30, kv_heads=30,
                   head_dim=128, gdn_key_heads=30, gdn_value_heads=30, gdn_key_dim=96,
                   gdn_value_dim=192, gdn_conv=4, name="olmo-hybrid-7b")

    # ---- parameters ----------------------------------------------------------------
    def _attn_params(self) -> int:
        d, hd = self.hidden, self.head_dim
        return d * self.heads * hd * 2 + d * self.kv_heads * hd * 2  # q, o, k, v

    def _gdn_params(self) -> int:
        d = self.hidden
        qk = self.gdn_key_heads * self.gdn_key_dim
        v = self.gdn_value_heads * self.gdn_value_dim
        # q, k, v, output gate, out proj, a/b gates (per value head)
        return d * (2 * qk + v) + d * v + v * d + 2 * d * self.gdn_value_heads

    def _conv_channels(self) -> int:
        return 2 * self.gdn_key_heads * self.gdn_key_dim + self.gdn_value_heads * self.gdn_value_dim

    def matmul_params(self) -> int:
        """Parameters that take part in per-token matmuls (excludes the input embedding)."""
        mlp = 3 * self.hidden * self.intermediate
        total = self.hidden * self.vocab  # LM head
        for t in self.layer_types:
            total += mlp + (self._gdn_params() if t == LINEAR else self._attn_params())
        return total

    # ---- FLOPs ---------------------------------------------------------------------
    def token_flops(self, context: int) -> float:
        """FLOPs to process one token that attends over ``context`` tokens (itself included)."""
        flops = 2.0 * self.matmul_params()
        for t in self.layer_types:
            if t == FULL:
                flops += 4.0 * self.heads * self.head_dim * context
            elif t == SLIDING:
                assert self.sliding_window is not None
                flops += 4.0 * self.heads * self.head_dim * min(context, self.sliding_window)
            else:
                flops += 2.0 * self.gdn_conv * self._conv_channels()
                flops += 8.0 * self.gdn_value_heads * self.gdn_key_dim * self.gdn_value_dim
        return flops

    def prefill_flops(self, prompt_tokens: int) -> float:
        """FLOPs of the prompt's forward pass: sum of token_flops(t) for t = 1..n."""
        n = prompt_tokens
        if n <= 0:
            return 0.0
        base = self.token_flops(0) * n
        attn = 0.0
        for t in self.layer_types:
            if t == LINEAR:
                continue
            w = self.sliding_window if t == SLIDING else None
            attn += 4.0 * self.heads * self.head_dim * _sum_min(n, w)
        return base + attn

    def decode_flops(self, prompt_tokens: int, output_tokens: int) -> float:
        """FLOPs of generating ``output_tokens`` after the prompt (contexts n+1..n+m)."""
        n, m = prompt_tokens, output_tokens
        return self.prefill_flops(n + m) - self.prefill_flops(n)

    def request_flops(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.prefill_flops(prompt_tokens) + self.decode_flops(prompt_tokens, output_tokens)

    # ---- memory --------------------------------------------------------------------
    def kv_cache_bytes(self, context: int) -> int:
        """KV cache of the attention layers for a sequence of ``context`` tokens."""
        per_token = 2 * self.kv_heads * self.head_dim * self.dtype_bytes
        total = 0
        for t in self.layer_types:
            if t == FULL:
                total += per_token * context
            elif t == SLIDING:
                assert self.sliding_window is not None
                keep = min(context, self.sliding_window) if self.evict_sliding else context
                total += per_token * keep
        return total

    def recurrent_state_bytes(self) -> int:
        """Gated DeltaNet matrix state (heads x dk x dv per layer), independent of context."""
        n = sum(t == LINEAR for t in self.layer_types)
        return n * self.gdn_value_heads * self.gdn_key_dim * self.gdn_value_dim * self.dtype_bytes

    def conv_state_bytes(self) -> int:
        """Short-convolution state ((kernel - 1) x channels per GDN layer)."""
        n = sum(t == LINEAR for t in self.layer_types)
        return n * (self.gdn_conv - 1) * self._conv_channels() * self.dtype_bytes

    def memory_bytes(self, context: int) -> int:
        """Per-sequence serving memory (KV cache + recurrent + conv state), weights excluded."""
        return self.kv_cache_bytes(context) + self.recurrent_state_bytes() + self.conv_state_bytes()

    def summary(self, context: int) -> dict[str, float]:
        return {
            "prefill_gflops": self.prefill_flops(context) / 1e9,
            "decode_gflops_per_token": self.token_flops(context) / 1e9,
            "kv_cache_mib": self.kv_cache_bytes(context) / 2**20,
            "state_mib": (self.recurrent_state_bytes() + self.conv_state_bytes()) / 2**20,
            "memory_mib": self.memory_bytes(context) / 2**20,
        }


def _sum_min(n: int, w: int | None) -> float:
    """sum_{t=1..n} min(t, w) (w None = no cap)."""
    if w is None or n <= w:
        return n * (n + 1) / 2
    return w * (w + 1) / 2 + (n - w) * w
