"""``archroute bench span``: the span decoder's speed against each model alone, with and
without drafted copy spans, in-process and through the router.

Greedy decoding of the same prompts to the same length (the end-of-sequence token is
ignored, as vLLM's ``ignore_eos`` does, so every run decodes exactly ``--tokens`` tokens).
Two groups of chat prompts: **copy-heavy** (a code fix, a refactor, a quote-heavy answer,
the earlier version's list to copy: prompts whose answers should repeat much of the prompt)
and **general** (a story, an explanation, a list: fresh text). Per group: each model alone (``HFBackend``, never drafted: the baseline), then the
span decoder per gate (default ``copy-2``, ``learned`` when a trained gate loads,
``always-transformer``), each without drafting and with each ``--draft-k``. Per
configuration: tokens/s over the group's prompts (prompt prefill included: span decoding
defers the second model's prefill into the answer, so excluding "time to the first token"
would flatter it), the ratio to the transformer alone, drafted and accepted tokens per 100
answer tokens, switches and catch-up tokens per 100, and where the span decoder's time goes:
the first prefill, decode steps (one token), verify forwards (a transformer forward that
checks a draft), catch-up forwards (the other model's tokens, and a model's deferred prompt
prefill at its first take-over) and the rest (sampling, entropy, gate, detokenization).
Configurations are interleaved run by run so that load that comes and goes falls on all of
them alike; median of ``--repeats`` runs per prompt. Every drafted answer is checked token
for token against the same gate undrafted (a mismatch is printed and the exit status is 1).

``--router``: the same prompts through a real router (uvicorn on a loopback socket, the
embedded pair in-process, ``/v1/completions`` over HTTP with the chat prompt rendered as the
router renders a chat request, ``temperature: 0``, ``ignore_eos``, ``--router-tokens``
tokens): ``archroute`` (what the default resolves to),
the same span profile with ``draft_k: 0``, and each backend by name (the transformer alone,
the hybrid alone); the answers of ``archroute`` and its undrafted twin must be equal.
Figures, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

CODE_FIX = (
    "Fix the bug in this function. Reply with the whole corrected function.\n\n"
    "def count_words(path):\n"
    "    counts = {}\n"
    "    with open(path) as f:\n"
    "        for line in f:\n"
    "            for word in line.split():\n"
    "                word = word.lower().strip('.,;:!?')\n"
    "                counts[word] = counts.get(word, 0) + 1\n"
    "    return sorted(counts.items(), key=lambda kv: kv[1])[:10]\n\n"
    "It should return the ten most frequent words, most frequent first.")
REFACTOR = (
    "Rename the variable `tmp` to `total` everywhere in this code and return the code.\n\n"
    "def mean(values):\n"
    "    tmp = 0\n"
    "    for v in values:\n"
    "        tmp = tmp + v\n"
    "    return tmp / len(values)\n\n"
    "def variance(values):\n"
    "    m = mean(values)\n"
    "    tmp = 0\n"
    "    for v in values:\n"
    "        tmp = tmp + (v - m) ** 2\n"
    "    return tmp / len(values)\n")
QUOTES = (
    "Quote the two sentences of this passage that mention the harbour, word for word.\n\n"
    "The town woke slowly. Fishing boats left the harbour before dawn, their lamps still "
    "lit. In the square the baker opened his shutters and the smell of bread drifted down "
    "the street. By noon the harbour was quiet again, and the gulls sat on the empty "
    "moorings waiting for the boats to return. Children ran past the church on their way "
    "to school.")
GENERAL = {
    "story": "Write a short story about an old lighthouse keeper and a storm.",
    "explain": "Explain why the sky is blue, in a few plain sentences for a child.",
    "list": "Give me some ideas for a rainy weekend at home with friends.",
}
# the raw (unrendered) prompts of the earlier version, which `archroute bench span-remote`
# still measures
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
GROUPS: dict[str, dict[str, str]] = {
    "copy-heavy": {"code-fix": CODE_FIX, "refactor": REFACTOR, "quotes": QUOTES,
                   "copy-list": PROMPTS["copy"]},
    "general": GENERAL,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64, help="answer tokens per run (in-process)")
    p.add_argument("--repeats", type=int, default=3, help="runs per prompt (median)")
    p.add_argument("--gates", default=None,
                   help="comma-separated gates (default: copy-2, learned if it loads, "
                        "always-transformer); through the router, each as a span profile "
                        "beside archroute")
    p.add_argument("--draft-k", default="8",
                   help="comma-separated draft lengths to measure beside no drafting "
                        "(default 8, the router's default)")
    p.add_argument("--draft-min-match", type=int, default=None,
                   help="induction match a draft needs (default: the router's, 2)")
    p.add_argument("--router", action="store_true",
                   help="also measure through a real router (HTTP on loopback)")
    p.add_argument("--router-only", action="store_true", help="only the router measurement")
    p.add_argument("--router-tokens", type=int, default=128,
                   help="answer tokens per request through the router")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _gates(names: str | None) -> list:
    from models.span.gates import get_gate

    wanted = (["copy-2", "learned", "always-transformer"] if names is None
              else [n.strip() for n in names.split(",") if n.strip()])
    out = []
    for n in wanted:
        try:
            out.append(get_gate(n))
        except Exception as exc:  # noqa: BLE001 - a learned gate that is not trained here
            if names is not None:
                raise
            print(f"(gate {n} skipped: {type(exc).__name__}: {exc})")
    return out


def _messages(text: str) -> list:
    from models.base import ChatMessage

    return [ChatMessage("user", text)]


def _shares(traces: list) -> dict[str, float]:
    """Seconds per kind of forward over ``traces`` (and the rest: sampling, gate, text)."""
    out = {"prefill": 0.0, "decode": 0.0, "verify": 0.0, "catchup": 0.0}
    for tr in traces:
        out["prefill"] += tr.forwards[0].seconds
        for f in tr.forwards[1:]:
            kind = ("catchup" if f.catchup or f.prefill else "verify" if f.drafted
                    else "decode")
            out[kind] += f.seconds
    out["other"] = sum(tr.seconds for tr in traces) - sum(out.values())
    return out


def run_in_process(a: argparse.Namespace, t: Any, h: Any) -> int:
    from models.base import GenerationParams
    from models.span.decoder import DEFAULT_DRAFT_MIN_MATCH, SpanBackend, SpanTrace

    ks = [int(k) for k in str(a.draft_k).split(",") if k.strip() and int(k) > 0]
    mm = a.draft_min_match or DEFAULT_DRAFT_MIN_MATCH
    params = GenerationParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    configs: dict[str, Any] = {"transformer alone": t, "hybrid alone": h}
    for gate in _gates(a.gates):
        for k in [0, *ks]:
            configs[f"{gate.name}" + (f" +draft {k}" if k else "")] = SpanBackend(
                t, h, gate, draft_k=k, draft_min_match=mm)
    for b in configs.values():  # warm-up
        b.generate(_messages("Hello"), GenerationParams(max_tokens=4, temperature=0.0))
    bad = 0
    print(f"\nIn-process: {a.tokens} answer tokens per prompt, greedy, eos ignored, median of "
          f"{a.repeats} runs, configurations interleaved; draft_min_match {mm}")
    for group, prompts in GROUPS.items():
        runs: dict[str, dict[str, list]] = {c: {p: [] for p in prompts} for c in configs}
        for _ in range(a.repeats):
            for pname, text in prompts.items():
                for cname, b in configs.items():
                    tr = SpanTrace() if isinstance(b, SpanBackend) else None
                    t0 = time.perf_counter()
                    b.generate(_messages(text), params, **({"trace": tr} if tr else {}))
                    runs[cname][pname].append((time.perf_counter() - t0, tr))
        median = {c: [sorted(rs, key=lambda r: r[0])[len(rs) // 2] for rs in by_p.values()]
                  for c, by_p in runs.items()}
        n = len(prompts) * a.tokens
        tps = {c: n / sum(sec for sec, _ in med) for c, med in median.items()}
        base = tps["transformer alone"]
        print(f"\n[{group}: {', '.join(prompts)}]")
        print(f"{'configuration':28s} {'tok/s':>7s} {'x T':>5s} {'x H':>5s} {'T share':>7s} "
              f"{'drafted':>7s} {'accepted':>8s} {'switch':>6s} {'catchup':>7s}   "
              f"time: prefill decode verify catchup other")
        for cname in configs:
            v = tps[cname]
            line = f"{cname:28s} {v:7.1f} {v / base:5.2f} {v / tps['hybrid alone']:5.2f}"
            if cname.endswith(" alone"):
                print(line)
                continue
            traces = [tr for _, tr in median[cname]]
            n_t = sum(r == "transformer" for tr in traces for r in tr.roles)
            sh = _shares(traces)
            spent = sum(sh.values())
            print(line + f" {100 * n_t / n:6.0f}% {100 * sum(tr.drafted for tr in traces) / n:7.1f}"
                  f" {100 * sum(tr.accepted for tr in traces) / n:8.1f}"
                  f" {100 * sum(tr.switches for tr in traces) / n:6.1f}"
                  f" {100 * sum(tr.catchup for tr in traces) / n:7.1f}   " + " ".join(
                      f"{100 * sh[k] / spent:{w}.0f}%" for k, w in
                      (("prefill", 6), ("decode", 5), ("verify", 5), ("catchup", 6),
                       ("other", 4))))
        # drafting must not change a greedy answer: every drafted run against its gate's
        for cname, by_p in runs.items():
            if "+draft" not in cname:
                continue
            plain = runs[cname.split(" +draft")[0]]
            for pname, rs in by_p.items():
                want = plain[pname][0][1].token_ids
                for _, tr in rs:
                    if tr.token_ids != want:
                        bad += 1
                        print(f"MISMATCH: {cname} on {pname}: the answer differs from "
                              "the undrafted gate's")
    print("\nx T / x H: tokens/s over the transformer / the hybrid alone. T share: answer "
          "tokens the transformer produced. drafted, accepted, switch, catchup: per 100 "
          "answer tokens (accepted: drafted tokens that became answer tokens in their verify "
          "forward). time: shares of the span decoder's time (catchup includes a model's "
          "deferred prompt prefill at its first take-over; verify: transformer forwards that "
          "checked a draft, its pending tokens included).")
    print("greedy answers with drafting identical to without: "
          + ("yes, every run" if not bad else f"NO, {bad} runs differ"))
    return 1 if bad else 0


def run_router(a: argparse.Namespace, t: Any, h: Any) -> int:
    """Through a real router on a loopback socket: archroute (the resolved default), its
    span profile undrafted, and each backend alone, interleaved."""
    import logging
    import threading

    import httpx
    import uvicorn

    from router.app import create_app
    from router.settings import load_settings

    defaults = load_settings(environ={})
    span_args = dict(defaults.profiles["archroute-span"].policy_args)
    profiles = {name: p.model_dump(mode="json", exclude_defaults=True)
                for name, p in defaults.profiles.items()}
    profiles["span-undrafted"] = {"policy": "span", "policy_args": {**span_args, "draft_k": 0}}
    # --gates: each gate as its own span profile (the default's draft settings), beside it
    extra_gates = [] if a.gates is None else [g.strip() for g in a.gates.split(",") if g.strip()]
    for g in extra_gates:
        profiles[f"span:{g}"] = {"policy": "span", "policy_args": {**span_args, "gate": g}}
    settings = load_settings(overrides={"profiles": profiles, "decision_log": "",
                                        "max_tokens_cap": max(2048, a.router_tokens)},
                             environ={})
    logging.getLogger("router").setLevel(logging.WARNING)
    app = create_app(settings, backends={"transformer": t, "hybrid": h})
    from evals.bench.router_overhead import _port

    port = _port()  # a free loopback port
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(600):
                try:
                    if c.get("/v1/models").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            card = c.get("/v1/models/archroute").json()
            print(f"\nThrough the router ({url}): model archroute = {card['alias_of']} "
                  f"({card.get('routing')}; gate {card.get('gate')}, draft_k "
                  f"{card.get('draft_k')}); {a.router_tokens} tokens per answer, greedy, "
                  f"ignore_eos, median of {a.repeats}, interleaved")
            models = ["archroute", "span-undrafted", *[f"span:{g}" for g in extra_gates],
                      t.name, h.name]
            bad = 0
            for group, prompts in GROUPS.items():
                secs: dict[str, dict[str, list[float]]] = {m: {p: [] for p in prompts}
                                                           for m in models}
                texts: dict[str, dict[str, str]] = {m: {} for m in models}
                spans: dict[str, dict[str, dict]] = {m: {} for m in models}
                for m in models:  # warm-up
                    c.post("/v1/completions", json={"model": m, "prompt": "Hi",
                                                    "max_tokens": 2})
                for _ in range(a.repeats):
                    for pname, text in prompts.items():
                        for m in models:
                            t0 = time.perf_counter()
                            r = c.post("/v1/completions", json={
                                "model": m, "prompt": t.render(_messages(text)),
                                "max_tokens": a.router_tokens, "temperature": 0,
                                "ignore_eos": True})
                            secs[m][pname].append(time.perf_counter() - t0)
                            r.raise_for_status()
                            body = r.json()
                            assert body["usage"]["completion_tokens"] == a.router_tokens, body
                            texts[m][pname] = body["choices"][0]["text"]
                            spans[m][pname] = body.get("archroute", {}).get("span") or {}
                n = len(prompts) * a.router_tokens
                tps = {m: n / sum(statistics.median(v) for v in by_p.values())
                       for m, by_p in secs.items()}
                base = tps[t.name]
                print(f"[{group}]")
                for m in models:
                    sp = [s for s in spans[m].values() if s]
                    extra = ""
                    if sp:
                        tot = {k: sum(int(s.get(k, 0)) for s in sp) for k in
                               ("transformer", "switches", "catchup", "drafted", "accepted")}
                        extra = (f"  T share {100 * tot['transformer'] / n:3.0f}%, drafted "
                                 f"{100 * tot['drafted'] / n:5.1f}, accepted "
                                 f"{100 * tot['accepted'] / n:5.1f}, switches "
                                 f"{100 * tot['switches'] / n:4.1f}, catch-up "
                                 f"{100 * tot['catchup'] / n:5.1f} /100")
                    print(f"  {m:24s} {tps[m]:7.1f} tok/s  x T {tps[m] / base:5.2f}{extra}")
                for m in ("archroute", "span-undrafted", *[f"span:{g}" for g in extra_gates],
                          h.name):
                    print(f"  {m} x T per prompt: " + ", ".join(
                        f"{p} {statistics.median(secs[t.name][p]) / statistics.median(secs[m][p]):.2f}"
                        for p in prompts))
                same = texts["archroute"] == texts["span-undrafted"]
                bad += not same
                print(f"  archroute's answers equal span-undrafted's: {'yes' if same else 'NO'}")
            return 1 if bad else 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run(a: argparse.Namespace) -> int:
    import torch

    from models.reference_pair import load_reference

    torch.set_num_threads(a.threads)
    t = load_reference("transformer", device=a.device)
    h = load_reference("hybrid", device=a.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {t.device}; "
          f"prompt tokens: " + ", ".join(
              f"{p} {len(t.prompt_ids(_messages(x)))}" for g in GROUPS.values()
              for p, x in g.items()))
    rc = 0
    if not a.router_only:
        rc |= run_in_process(a, t, h)
    if a.router or a.router_only:
        rc |= run_router(a, t, h)
    return rc
