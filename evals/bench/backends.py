"""``archroute bench backends``: measured speed of each backend beside its cost model.

Prints, per backend: scoring throughput (teacher-forced tokens/s at a given window),
greedy decode throughput (tokens/s) and time to first token at several prompt lengths, and
the cost model's FLOPs and serving memory at the same lengths. Bounded: a few repetitions
of each measurement, nothing timed in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

from models.registry import REFERENCE_SPECS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", action="append",
                   help="backend spec (repeatable; default: the reference pair)")
    p.add_argument("--prompt-tokens", type=int, nargs="*", default=[64, 256, 768])
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(a: argparse.Namespace) -> int:
    import torch

    from models.base import GenerationParams
    from models.registry import from_spec

    if a.threads:
        torch.set_num_threads(a.threads)
    specs = a.backend or list(REFERENCE_SPECS.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'backend':24s} {'prompt':>6s} {'score tok/s':>12s} {'TTFT ms':>9s} {'decode tok/s':>13s} "
          f"{'GFLOP/req':>10s} {'mem MiB':>8s}")
    for spec in specs:
        b = from_spec(spec)
        cm = b.cost_model()
        vocab = getattr(b.tokenizer, "vocab_size", 1000)
        for n in a.prompt_tokens:
            ids = [[(7 * i + 3) % (vocab - 2) + 2 for i in range(n)]]
            b.score_ids(ids) if hasattr(b, "score_ids") else None  # warm-up
            s_times, ttft, dec = [], [], []
            for _ in range(a.repeats):
                if hasattr(b, "score_ids"):
                    t0 = time.perf_counter()
                    b.score_ids(ids * 4)
                    s_times.append(4 * n / (time.perf_counter() - t0))
                prompt = b.tokenizer.decode(ids[0]) if hasattr(b, "tokenizer") else "x " * n
                t0 = time.perf_counter()
                first = None
                count = 0
                params = GenerationParams(max_tokens=a.output_tokens, temperature=0.0)
                for chunk in b.stream(prompt, params):
                    if first is None and chunk.text:
                        first = time.perf_counter() - t0
                    if chunk.finish_reason:
                        count = chunk.completion_tokens or 0
                total = time.perf_counter() - t0
                if first is not None:
                    ttft.append(first * 1000)
                    if count > 1:
                        dec.append((count - 1) / max(1e-9, total - first))
            flops = cm.request_flops(n, a.output_tokens) / 1e9 if cm else float("nan")
            mem = cm.memory_bytes(n + a.output_tokens) / 2**20 if cm else float("nan")
            med = statistics.median
            print(f"{b.name:24s} {n:6d} {med(s_times) if s_times else float('nan'):12.0f} "
                  f"{med(ttft) if ttft else float('nan'):9.1f} {med(dec) if dec else float('nan'):13.1f} "
                  f"{flops:10.3f} {mem:8.3f}")
    return 0
