"""``archroute bench NAME``: speed benchmarks that print their figures (never timed tests)."""

from __future__ import annotations

import argparse
import importlib

# name -> ("module:function", help). function(args) -> int; each module also defines
# ``add_arguments(parser)`` for its own options.
BENCHES: dict[str, tuple[str, str]] = {
    "router": ("evals.bench.router_overhead", "router overhead vs calling the upstream directly "
               "(--peer litellm: LiteLLM's proxy side by side)"),
    "classifier": ("evals.bench.classifier_latency", "decision latency by prompt length"),
    "route": ("evals.bench.route_latency", "POST /v1/route latency by prompt length"),
    "backends": ("evals.bench.backends", "tokens/s and memory of the reference pair"),
    "span": ("evals.bench.span", "span decoding tokens/s per gate vs each model alone"),
    "span-remote": ("evals.bench.span_remote",
                    "span decoding over two engine processes vs each engine alone"),
    "ray": ("evals.bench.ray_serve", "serve --ray vs one process: start-up, added latency, "
                                     "throughput with 1 and 2 model replicas"),
    "handoff": ("evals.bench.handoff", "what a conversation's switch of backend costs (prefill "
                "vs decode) and the conversation.handoff_cost default it gives"),
    "chat": ("evals.bench.chat", "what a person sees in chat: repeat, bug-fix and EOS rates "
                                 "of the pair on held-out corpus documents"),
}


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmarks that print their figures")
    bsub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, (module, help_text) in BENCHES.items():
        bp = bsub.add_parser(name, help=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(bp)
        bp.set_defaults(func=mod.run)
