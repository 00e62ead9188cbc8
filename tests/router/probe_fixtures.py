"""A small probe artifact for the fake pair (issue #24 item 4): label rows whose probe is
measured on the fake backends (:func:`models.fake.fake_prompt_logprobs`: the fake
transformer reads repeated tokens better) and whose gap follows it, fitted by the real
``archroute train --probe`` path (:func:`classifiers.training.train_router.fit_quick`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.fake import FakeBackend
from router.probing import probe_of

WORDS = ("river", "stone", "lamp", "cloud", "paper", "garden", "window", "music", "silver",
         "forest", "engine", "bridge", "candle", "harbor", "letter", "orange", "planet")


def fake_prompt(rng: np.random.Generator, repeats: int) -> str:
    """Fresh words, or one phrase said ``repeats`` times (the transformer's kind of prompt)."""
    phrase = " ".join(rng.choice(WORDS, 6, replace=False))
    if repeats:
        return "Say it again: " + " ".join([phrase] * repeats)
    return "Tell me about " + " ".join(rng.choice(WORDS, 12, replace=False))


def fake_probe_rows(n: int = 80, seed: int = 0) -> list[dict]:
    """``n`` label rows in two sources; the gap is the probe's prompt-loss gap plus 0.1
    nats/token (the hybrid wins where both read the prompt alike), with a little noise."""
    rng = np.random.default_rng(seed)
    t, h = FakeBackend("t", "transformer"), FakeBackend("h", "hybrid")
    rows = []
    for i in range(n):
        text = fake_prompt(rng, repeats=int(rng.integers(2, 5)) if i % 2 else 0)
        probe = probe_of(t.score_prompt(text), h.score_prompt(text))
        gap = probe["probe_gap"] + 0.1 + float(rng.normal(0, 0.02))
        rows.append({"id": f"fake-{i}", "group": ("alpha", "beta")[i % 4 // 2],
                     "kind": "chat", "messages": [{"role": "user", "content": text}],
                     "gap": gap, "loss_transformer": 1.0 + gap / 2,
                     "loss_hybrid": 1.0 - gap / 2, "key": f"fake-{i}",
                     "probe": {k: (None if v != v else v) for k, v in probe.items()}})
    return rows


def train_fake_probe_artifact(out: Path) -> Path:
    """Fit and save the probe artifact for the fake pair at ``out``."""
    from classifiers.training.train_router import fit_quick, routing_request

    rows = fake_probe_rows()
    fit_quick(rows, [routing_request(r) for r in rows], out, probe=True)
    return out
