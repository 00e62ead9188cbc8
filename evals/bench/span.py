"""``archroute bench span``: the span decoder's speed against each model alone.

Greedy decoding of the same prompts to the same length (the end-of-sequence token is
ignored, as vLLM's ``ignore_eos`` does, so every run decodes exactly ``--tokens`` tokens):
each model alone (``HFBackend``), then the span decoder per gate: ``copy-2``, ``learned``
when a trained gate loads, ``always-transformer`` (the decoder's own overhead: one model,
no switch) and ``alternate-1`` (a worst case: a switch at every token, so every step is a
catch-up forward). Per configuration: tokens/s over all prompts (prompt prefill included:
span decoding defers the second model's prefill into the answer, so excluding "time to the
first token" would flatter it), the ratio to the faster single model, switches and catch-up
tokens per 100 answer tokens, and where the span decoder's time goes: the first prefill,
decode steps (one token), catch-up forwards (the other model's tokens, and a model's
deferred prompt prefill at its first take-over) and the rest (sampling, entropy, gate,
detokenization). Figures, not a test: median of ``--repeats`` runs per prompt.
"""

from __future__ import annotations

import argparse
import time

PROMPTS = {
    "code": ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
             "fibonacci(n - 2)\n\n\ndef factorial(n):\n    if n < 2:\n        return 1\n    return "
             "n * factorial(n - 1)\n\n\nprint(fibonacci(10))\nprint(factorial(10))\n\n\ndef "),
    "prose": ("The old lighthouse keeper climbed the stairs every evening, counting the steps "
              "as his father had taught him. The sea below was grey and restless, and the "
              "gulls had gone quiet. He lit the lamp, wiped the glass, and sat down to write "
              "in the log, as he did every night:"),
    "copy": ("Copy the list exactly.\nList: apples, pears, plums, cherries, figs, dates, limes, "
             "lemons, grapes, melons\nCopy: apples, pears, plums, cherries, figs, dates, limes,"
             " lemons, grapes, melons\nList: red, green, blue, cyan, magenta, yellow, black, "
             "white\nCopy:"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64, help="answer tokens per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per prompt (median)")
    p.add_argument("--gates", default=None,
                   help="comma-separated gates (default: copy-2, learned if it loads, "
                        "always-transformer, alternate-1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _alternate_gate():
    """A gate that switches at every token (the catch-up worst case)."""
    from models.span.gates import Gate, GateState

    class Alternate(Gate):
        name = "alternate-1"

        def start(self, prompt_ids, token_text=None) -> GateState:
            class S(GateState):
                def choose(self):
                    return "transformer" if self.step % 2 == 0 else "hybrid"

            return S(prompt_ids, token_text)

    return Alternate()


def _gates(names: str | None) -> list:
    from models.span.gates import get_gate

    if names is None:
        wanted = ["copy-2", "learned", "always-transformer", "alternate-1"]
    else:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for n in wanted:
        if n == "alternate-1":
            out.append(_alternate_gate())
            continue
        try:
            out.append(get_gate(n))
        except Exception as exc:  # noqa: BLE001 - a learned gate that is not trained here
            if names is not None:
                raise
            print(f"(gate {n} skipped: {type(exc).__name__}: {exc})")
    return out


def run(a: argparse.Namespace) -> int:
    import torch

    from models.base import Backend, GenerationParams
    from models.reference_pair import load_reference
    from models.span.decoder import SpanBackend, SpanTrace

    torch.set_num_threads(a.threads)
    t = load_reference("transformer", device=a.device)
    h = load_reference("hybrid", device=a.device)
    # ignore_eos: every run decodes exactly --tokens tokens
    params = GenerationParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    n_prompt = {k: len(t.encode(p)) + 1 for k, p in PROMPTS.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {t.device}; "
          f"{len(PROMPTS)} prompts ({', '.join(f'{k} {n}' for k, n in n_prompt.items())} tokens), "
          f"{a.tokens} answer tokens each, greedy, eos ignored, median of {a.repeats} runs, "
          "configurations interleaved")
    configs: dict[str, Backend] = {f"{t.name} alone": t, f"{h.name} alone": h}
    for gate in _gates(a.gates):
        configs[f"span {gate.name}"] = SpanBackend(t, h, gate)
    for b in configs.values():  # warm-up
        b.generate(PROMPTS["prose"], GenerationParams(max_tokens=4, temperature=0.0))

    # runs[config][prompt]: (seconds, trace or None); round-robin so that load that comes
    # and goes on a shared machine falls on every configuration alike
    runs: dict[str, dict[str, list]] = {c: {p: [] for p in PROMPTS} for c in configs}
    for _ in range(a.repeats):
        for pname, prompt in PROMPTS.items():
            for cname, b in configs.items():
                tr = SpanTrace() if isinstance(b, SpanBackend) else None
                t0 = time.perf_counter()
                b.generate(prompt, params, **({"trace": tr} if tr is not None else {}))
                runs[cname][pname].append((time.perf_counter() - t0, tr))
    median = {c: [sorted(rs, key=lambda r: r[0])[len(rs) // 2] for rs in by_p.values()]
              for c, by_p in runs.items()}
    n = len(PROMPTS) * a.tokens
    tps = {c: n / sum(sec for sec, _ in med) for c, med in median.items()}
    single = {b.name: tps[f"{b.name} alone"] for b in (t, h)}
    best = max(single.values())

    print(f"\n{'configuration':28s} {'tok/s':>7s} {'x best':>7s} {'T share':>7s} {'x mix':>6s} "
          f"{'switch/100':>10s} {'catchup/100':>11s} {'prefill':>8s} {'decode':>7s} "
          f"{'catchup':>8s} {'other':>6s}")
    for name, v in single.items():
        print(f"{name + ' alone':28s} {v:7.1f} {v / best:7.2f}")
    per_forward: list[tuple[str, list]] = []
    for cname in configs:
        if not cname.startswith("span "):
            continue
        traces = [tr for _, tr in median[cname]]
        forwards = [f for tr in traces for f in tr.forwards[1:]]
        per_forward.append((cname, forwards))
        sw = sum(tr.switches for tr in traces)
        cu = sum(tr.catchup for tr in traces)
        n_t = sum(r == "transformer" for tr in traces for r in tr.roles)
        share = {"prefill": sum(tr.forwards[0].seconds for tr in traces),
                 "decode": sum(f.seconds for f in forwards if f.tokens == 1 and not f.catchup),
                 "catchup": sum(f.seconds for f in forwards if f.catchup or f.prefill)}
        share["other"] = sum(tr.seconds for tr in traces) - sum(share.values())
        # what the same tokens would take on each model alone, at its own speed
        mix = n / (n_t / single[t.name] + (n - n_t) / single[h.name])
        spent = sum(share.values())
        print(f"{cname:28s} {tps[cname]:7.1f} {tps[cname] / best:7.2f} {100 * n_t / n:6.0f}% "
              f"{tps[cname] / mix:6.2f} {100 * sw / n:10.1f} {100 * cu / n:11.1f} " + " ".join(
                  f"{100 * share[k] / spent:{w}.0f}%" for k, w in
                  (("prefill", 7), ("decode", 6), ("catchup", 7), ("other", 5))))
    print(f"\n{'ms per forward (tokens read)':28s} {'T decode':>9s} {'T catch-up':>14s} "
          f"{'H decode':>9s} {'H catch-up':>14s}")
    for name, fs in per_forward:
        cells = []
        for role in ("transformer", "hybrid"):
            dec = [f.seconds for f in fs if f.role == role and f.tokens == 1]
            cat = [f for f in fs if f.role == role and f.catchup and not f.prefill]
            cells.append(f"{1000 * sum(dec) / len(dec):9.2f}" if dec else f"{'-':>9s}")
            cells.append(f"{1000 * sum(f.seconds for f in cat) / len(cat):7.2f} "
                         f"({sum(f.tokens for f in cat) / len(cat):4.1f})" if cat else f"{'-':>14s}")
        print(f"{name:28s} " + " ".join(cells))
    print("\nx best: tokens/s over the faster model alone. T share: answer tokens the "
          "transformer produced. x mix: tokens/s over what those tokens cost on each model "
          "alone (1.00: switching costs nothing). switch/100, catchup/100: per 100 answer "
          "tokens. prefill/decode/catchup/other: shares of the span decoder's time (catchup "
          "includes a model's deferred prompt prefill at its first take-over). ms per forward: "
          "decode steps (1 token) and catch-up forwards (its own last token and the other "
          "model's since; deferred prefills left out), mean tokens read in brackets.")
    return 0
