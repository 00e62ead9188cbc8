"""The training data stream of the reference pair: deterministic, and the copy signals are
what the curriculum (models/reference/phases.json) says they are."""

import json
from pathlib import Path

import numpy as np

from models.training.train_reference import TrainConfig, WindowSampler, phase_at

PHASES = Path(__file__).resolve().parents[2] / "models" / "reference" / "phases.json"


def _sampler(phases: list[dict], n_tokens: int = 50_000) -> WindowSampler:
    rng = np.random.default_rng(0)
    tokens = {"code": rng.integers(2, 4096, size=n_tokens).astype(np.int32)}
    return WindowSampler(tokens, TrainConfig(phases=phases, seq_len=256))


def _period_of(row: np.ndarray) -> int:
    """Smallest p with row[p:] == row[:-p] (the repeated span's length)."""
    for p in range(1, len(row)):
        if np.array_equal(row[p:], row[:-p]):
            return p
    return len(row)


def test_alphabet_copy_batch_repeats_a_span_over_a_small_alphabet():
    s = _sampler([{"start": 0, "copy_batch": {"size": 8, "len": 64, "span": [4, 12],
                                              "alphabet": 16}}])
    b = s.copy_batch(3)
    assert b.shape == (8, 64) and b.dtype == np.int64
    assert len(np.unique(b)) <= 16 and b.min() >= 2  # EOS/PAD never used as symbols
    for row in b:
        assert 4 <= _period_of(row) <= 12
    assert np.array_equal(b, s.copy_batch(3))  # a pure function of (seed, step)
    assert not np.array_equal(b, s.copy_batch(4))
    # the alphabet is one fixed set across steps
    assert len(np.unique(np.concatenate([s.copy_batch(k).ravel() for k in range(40)]))) <= 16


def test_natural_copy_batch_repeats_a_passage_of_real_text_at_bounded_gaps():
    lo, hi, gap = 16, 48, 32
    s = _sampler([{"start": 0, "copy_batch": {"size": 6, "len": 256, "span": [lo, hi],
                                              "gap": gap, "natural": True}}])
    b = s.copy_batch(7)
    assert b.shape == (6, 256)
    stream = s.stream
    for row in b:
        # the row's first tokens are a verbatim slice of the training stream
        starts = np.flatnonzero(stream[:-8] == row[0])
        assert any(np.array_equal(stream[i:i + 8], row[:8]) for i in starts)
        # some passage of length >= lo recurs at least twice, later copies <= gap apart
        found = False
        for p0 in range(32):
            for length in range(hi, lo - 1, -1):
                passage = row[p0:p0 + length]
                hits = [j for j in range(p0 + length, 256 - length + 1)
                        if np.array_equal(row[j:j + length], passage)]
                if hits:
                    assert hits[0] - (p0 + length) <= gap
                    found = True
                    break
            if found:
                break
        assert found, "no repeated passage in a natural copy row"
    assert np.array_equal(b, s.copy_batch(7))


def test_phase_batch_size_zero_means_copy_batch_only():
    s = _sampler([{"start": 0, "batch_size": 0, "copy_batch": {"size": 2, "len": 32,
                                                                "span": [4, 8]}}])
    assert s.batch(0) is None and s.copy_batch(0).shape == (2, 32)


def test_shipped_curriculum_is_well_formed():
    phases = json.loads(PHASES.read_text())
    starts = [p["start"] for p in phases]
    assert starts[0] == 0 and starts == sorted(set(starts))
    for ph in phases:
        assert phase_at(ph["start"], TrainConfig(phases=phases)) == ph
        assert 0 <= ph.get("copy_share", 0) + ph.get("synth_share", 0) <= 1
        cb = ph.get("copy_batch")
        if cb:
            assert cb["span"][0] <= cb["span"][1] <= cb["len"]
