"""``archroute generate | score | info``: use one backend from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from models.registry import REFERENCE_SPECS

DEFAULT_SPEC = REFERENCE_SPECS["hybrid"]
SPEC_HELP = ("backend: reference:transformer | reference:hybrid | a local model directory | "
             "http://host:port/v1#model (OpenAI-compatible upstream)")


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with one backend")
    p.add_argument("prompt", help="prompt text ('-' reads standard input)")
    p.add_argument("--backend", default=DEFAULT_SPEC, help=SPEC_HELP)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message")
    p.set_defaults(func=run_generate)


def run_generate(a: argparse.Namespace) -> int:
    from models.base import ChatMessage, GenerationParams
    from models.registry import from_spec

    text = sys.stdin.read() if a.prompt == "-" else a.prompt
    backend = from_spec(a.backend)
    params = GenerationParams(max_tokens=a.max_tokens, temperature=a.temperature,
                              top_p=a.top_p, seed=a.seed, stop=a.stop)
    prompt = [ChatMessage("user", text)] if a.chat else text
    for chunk in backend.stream(prompt, params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.finish_reason:
            sys.stdout.write("\n")
            print(f"[{backend.name}: {chunk.completion_tokens} tokens, finish={chunk.finish_reason}]",
                  file=sys.stderr)
    return 0


def add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="per-token log-probabilities of a continuation")
    p.add_argument("prompt")
    p.add_argument("continuation")
    p.add_argument("--backend", action="append", help=SPEC_HELP + " (repeatable; default: both reference models)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_score)


def run_score(a: argparse.Namespace) -> int:
    from models.base import ScoreResult
    from models.registry import from_spec

    specs = a.backend or list(REFERENCE_SPECS.values())
    results: dict[str, ScoreResult] = {}
    for spec in specs:
        b = from_spec(spec)
        results[b.name] = b.score(a.prompt, a.continuation)
    if a.json:
        print(json.dumps({name: {"tokens": r.tokens, "logprobs": r.logprobs, "loss": r.loss}
                          for name, r in results.items()}, indent=2))
        return 0
    for name, r in results.items():
        print(f"{name}: mean loss {r.loss:.4f} nats over {len(r.tokens)} tokens")
    if len(results) == 2:
        (n1, r1), (n2, r2) = results.items()
        print(f"gap ({n1} - {n2}): {r1.loss - r2.loss:+.4f} nats (positive = {n2} better)")
    return 0


def add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe backends and their cost models")
    p.add_argument("--backend", action="append", help=SPEC_HELP + " (default: the reference pair)")
    p.add_argument("--context", type=int, nargs="*", default=[1024, 8192, 32768, 65536],
                   help="context lengths (tokens) for the cost table")
    p.add_argument("--real-pair", action="store_true",
                   help="also show the analytic costs of Olmo 3 7B and Olmo Hybrid 7B")
    p.set_defaults(func=run_info)


def run_info(a: argparse.Namespace) -> int:
    from models.cost import CostModel
    from models.registry import from_spec

    specs = a.backend or list(REFERENCE_SPECS.values())
    models: list[tuple[str, CostModel | None]] = []
    for spec in specs:
        b = from_spec(spec)
        info = b.info()
        print(f"{info.name}: {info.architecture}, {info.parameters or 0:,} parameters, "
              f"context {info.context_length}, layers {list(info.layer_types)}")
        models.append((info.name, b.cost_model()))
    if a.real_pair:
        models += [("olmo3-7b (bf16)", CostModel.olmo3_7b()),
                   ("olmo-hybrid-7b (bf16)", CostModel.olmo_hybrid_7b())]
    print(f"\n{'model':28s} {'context':>8s} {'prefill GFLOP':>14s} {'decode GFLOP/tok':>17s} "
          f"{'KV MiB':>10s} {'state MiB':>10s}")
    for name, cm in models:
        if cm is None:
            continue
        for ctx in a.context:
            s = cm.summary(ctx)
            print(f"{name:28s} {ctx:8d} {s['prefill_gflops']:14.3f} {s['decode_gflops_per_token']:17.5f} "
                  f"{s['kv_cache_mib']:10.2f} {s['state_mib']:10.2f}")
    return 0
