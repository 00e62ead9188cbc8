"""The analysis end to end on backends whose losses are known: sign convention, fast vs
generic path, cache, windows, corpus loading, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from classifiers.categories import FUNCTION_WORDS
from evals.analysis.cli import analyze
from evals.analysis.corpus import Document, load_corpus
from evals.analysis.scoring import (
    Window,
    _common_segments,
    cap_windows,
    score_pair,
    token_offsets,
)
from evals.analysis.table import build_table
from evals.analysis.testing import ControlledBackend, ControlledIdsBackend, WordTokenizer

PROSE = "The cat sat on the mat (and then) it ran away from the dog. " * 12
CODE = "def f(x):\n    return g(x[0], '(')  # )\n" * 15
DOCS = [Document("p", "prose", PROSE), Document("c", "code", CODE)]


def is_function(tok: str) -> bool:
    return tok.strip().lower() in FUNCTION_WORDS


def pair(fast: bool = True, shared: bool = True):
    """Transformer: 2.0 nats on every token; hybrid: 1.5 on function words, 1.2 otherwise."""
    cls = ControlledIdsBackend if fast else ControlledBackend
    tok = WordTokenizer()
    t = cls("t", lambda s, i: 2.0, "transformer", tokenizer=tok)
    h = cls("h", lambda s, i: 1.5 if is_function(s) else 1.2, "hybrid",
            tokenizer=tok if shared else WordTokenizer())
    return t, h


@pytest.mark.parametrize("fast", [True, False])
def test_gap_sign_convention(fast):
    t, h = pair(fast)
    scored = score_pair(DOCS, t, h, specs=("t", "h"), window=32, progress=False)
    df = build_table(DOCS, scored)
    assert np.allclose(df["loss_t"], 2.0)
    fw = df["word_class"].astype(str) == "function"
    assert fw.any() and (~fw).any()
    # gap = loss_t - loss_h: positive where the hybrid is better
    assert np.allclose(df.loc[fw, "gap"], 0.5)
    assert np.allclose(df.loc[df["word_class"].astype(str) == "content", "gap"], 0.8)


def test_fast_and_generic_paths_agree():
    dfs = []
    for fast in (True, False):
        t, h = pair(fast)
        dfs.append(build_table(DOCS, score_pair(DOCS, t, h, specs=("t", "h"), window=32,
                                                progress=False)))
    a, b = dfs
    assert len(a) == len(b)
    assert (a["token"] == b["token"]).all()
    assert np.allclose(a["gap"], b["gap"])
    assert (a["repeat_n"] == b["repeat_n"]).all()


def test_every_token_scored_once_in_windows():
    t, h = pair()
    scored = score_pair(DOCS, t, h, specs=("t", "h"), window=32, progress=False)
    for d, doc in enumerate(DOCS):
        spans = np.concatenate([w.offsets for w in scored if w.doc == d])
        assert "".join(doc.text[s:e] for s, e in spans) == doc.text
    assert all(len(w.ids) <= 31 for w in scored)


def test_cache_reuses_and_resumes(tmp_path):
    t, h = pair()
    kw = dict(specs=("t", "h"), window=32, batch_size=4, cache_root=tmp_path, progress=False)
    first = score_pair(DOCS, t, h, **kw)
    calls = t.ids_calls
    assert calls > 1
    again = score_pair(DOCS, t, h, **kw)
    assert t.ids_calls == calls  # nothing recomputed
    assert all(np.array_equal(a.lp_h, b.lp_h) for a, b in zip(first, again, strict=True))
    victim = next(tmp_path.glob("t-*/*/batch_00001.npz"))
    victim.unlink()  # an interrupted run: one batch missing
    score_pair(DOCS, t, h, **kw)
    assert t.ids_calls == calls + 1
    # other settings, other cache
    score_pair(DOCS, t, h, **{**kw, "window": 16})
    assert t.ids_calls > calls + 1


def test_cap_windows_keeps_every_domain():
    docs = [Document("a", "x", ""), Document("b", "y", "")]
    wins = [Window(0, np.zeros((10, 2), int), np.zeros(10, int)) for _ in range(20)] + \
        [Window(1, np.zeros((10, 2), int), np.zeros(10, int)) for _ in range(2)]
    kept = cap_windows(wins, docs, 60)
    assert sum(len(w.ids) for w in kept) == 60
    assert sum(w.doc == 1 for w in kept) == 2
    assert cap_windows(wins, docs, None) is wins


def test_generic_path_with_different_tokenizers_uses_common_segments():
    t, h = pair(fast=False, shared=False)

    class Chars(ControlledBackend):
        def score(self, prompt, continuation):
            r = super().score(prompt, continuation)
            # split every token into characters, spreading its log p evenly
            toks, lps = [], []
            for tok, lp in zip(r.tokens, r.logprobs, strict=True):
                toks += list(tok)
                lps += [lp / len(tok)] * len(tok)
            return type(r)(toks, lps)

    h2 = Chars("h", h.loss_fn, "hybrid")
    df = build_table(DOCS, score_pair(DOCS, t, h2, specs=("t", "h"), window=32, progress=False))
    fw = df["word_class"].astype(str) == "function"
    assert np.allclose(df.loc[fw, "gap"], 0.5)


def test_common_segments():
    off_a = np.array([[0, 2], [2, 4], [4, 5]])
    off_b = np.array([[0, 1], [1, 2], [2, 5]])
    off, a, b = _common_segments(off_a, np.array([-1.0, -2, -3]), off_b, np.array([-1.0, -1, -4]))
    assert off.tolist() == [[0, 2], [2, 5]]
    assert a.tolist() == [-1, -5] and b.tolist() == [-2, -4]


def test_token_offsets_byte_level():
    text = "hé llo\nx"
    # GPT-2 byte-level strings: "h", "Ã©" (é), "Ġllo", "Ċ", "x"
    toks = ["h", "Ã©", "Ġllo", "Ċ", "x"]
    assert token_offsets(text, toks).tolist() == [[0, 1], [1, 2], [2, 6], [6, 7], [7, 8]]
    assert token_offsets("ab", ["a", "b"]).tolist() == [[0, 1], [1, 2]]


def test_load_corpus_jsonl_and_directory(tmp_path):
    jl = tmp_path / "c" / "val.jsonl"
    jl.parent.mkdir()
    jl.write_text(json.dumps({"id": "1", "domain": "code", "text": "x = 1"}) + "\n")
    docs = load_corpus(tmp_path / "c", "val")
    assert docs == [Document("1", "code", "x = 1")]
    (tmp_path / "d" / "books").mkdir(parents=True)
    (tmp_path / "d" / "books" / "a.txt").write_text("Once upon a time.")
    (tmp_path / "d" / "b.py").write_text("print(1)\n")
    docs = sorted(load_corpus(tmp_path / "d"), key=lambda d: d.id)
    assert [(d.domain, d.id) for d in docs] == [("py", "b.py"), ("books", "books/a.txt")]


def test_analyze_writes_outputs(tmp_path):
    import pandas as pd

    t, h = pair()
    s = analyze(DOCS, t, h, tmp_path, specs=("t", "h"), window=32, n_boot=100, progress=False,
                cache=tmp_path / "cache")
    for name in ("tokens.parquet", "summary.json", "report.md", "gap_by_domain.png",
                 "gap_by_class.png", "gap_vs_repeat.png", "brackets.png", "regression.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    df = pd.read_parquet(tmp_path / "tokens.parquet")
    assert {"gap", "word_class", "repeat_n", "bracket", "log_freq"} <= set(df.columns)
    c = s["pooled"]["contrasts"]["content-function"]
    assert c["diff"] == pytest.approx(0.3)
    assert json.loads((tmp_path / "summary.json").read_text())["n_tokens"] == len(df)
    assert "content-function" in (tmp_path / "report.md").read_text()


def test_cli_parser_has_analyze(monkeypatch):
    from router import cli

    monkeypatch.setattr("sys.argv", ["archroute", "analyze", "--window", "64"])
    args = cli.build_parser().parse_args()
    assert args.window == 64 and args.transformer == "reference:transformer"
    assert args.func.__module__ == "evals.analysis.cli"


@pytest.mark.slow
def test_reference_pair_smoke(tmp_path, reference_pair):
    """The real pair on a few hundred tokens: finite losses, sensible magnitudes."""
    t, h = reference_pair
    docs = [Document("p", "code", "def add(a, b):\n    return a + b\n" * 20)]
    s = analyze(docs, t, h, tmp_path, specs=("reference:transformer", "reference:hybrid"),
                window=128, n_boot=50, progress=False)
    o = s["pooled"]["overall"]
    assert 0 < o["loss_t"] < 12 and 0 < o["loss_h"] < 12
