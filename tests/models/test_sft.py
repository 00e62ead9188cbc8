"""The chat tuning of the reference pair (models/training/sft.py, sft_data.py) and its
benchmark's case builder (evals/bench/chat.py)."""

import json
import random
import tokenize
from pathlib import Path

import pytest

from evals.bench import chat
from models.base import ChatMessage, plain_chat_prompt
from models.hf import render_prompt
from models.training import sft, sft_data

FUNCS = [
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    total = a + b\n    return total\n",
    "def is_small(value, limit):\n    if value < limit:\n        return True\n    return None\n",
    "def same(x, y):\n    result = x == y\n    return result\n",
]


def _code_doc(i: int, split: str) -> dict:
    body = "\n\n".join(f.replace("def ", f"def {split}{i}_") for f in FUNCS)
    text = f"# module {split} {i}\n\n" + body + "\n" + ("# filler line of text\n" * 20)
    return {"id": f"{split}/doc{i}.py", "domain": "code", "source": "code", "text": text}


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for split, n in (("train", 6), ("val", 3)):
        with open(d / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                fh.write(json.dumps(_code_doc(i, split)) + "\n")
    (d / "manifest.json").write_text(json.dumps({"val_share": 0.05}))
    return d


@pytest.fixture
def requests_dir(tmp_path):
    d = tmp_path / "requests"
    d.mkdir()
    for name in ("dolly.jsonl", "selfinstruct_user_eval.jsonl"):
        with open(d / name, "w") as fh:
            for i in range(200):
                fh.write(json.dumps({"id": f"{name[:5]}-{i}", "source": "s", "kind": "chat",
                                     "messages": [{"role": "user", "content": f"q{i}"}],
                                     "reference": f"answer {i}"}) + "\n")
    (d / "README.md").write_text("| file | rows | size | licence |\n| --- | ---: | ---: | --- |\n"
                                 "| dolly.jsonl | 200 | 1 MB | CC-BY-SA-3.0 |\n")
    return d


@pytest.fixture(scope="module")
def tok():
    return sft.load_tokenizer()


def _count(tok):
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])


def test_chat_template_renders_the_plain_format(tok):
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi\n\n x"),
            ChatMessage("assistant", "hello"), ChatMessage("user", "Repeat exactly: a b")]
    assert render_prompt(tok, msgs) == plain_chat_prompt(msgs)
    assert render_prompt(tok, msgs).endswith("User: Repeat exactly: a b\n\nAssistant:")


def test_synthetic_examples_come_only_from_the_split_asked(corpus, tok):
    train = sft_data.load_corpus(corpus, "train")
    b = sft_data.SyntheticBuilder(train, _count(tok), seed=1)
    exs = b.build({"repeat": 10, "fix_bug": 6, "rename": 3, "reindent": 3, "summarise": 2})
    assert {e.task for e in exs} >= {"repeat", "fix_bug", "rename", "reindent", "summarise"}
    assert {e.doc for e in exs} <= {d["id"] for d in train}
    with pytest.raises(ValueError):
        sft_data.load_corpus(corpus, "test")


def test_bench_cases_are_held_out(corpus, tok):
    cases = chat.build_cases(corpus, _count(tok), n=4, n_write=1)
    assert cases and all(c.doc.startswith("val/") for c in cases)
    fixes = [c for c in cases if c.task == "fix_bug"]
    assert fixes and all(c.meta["buggy"] != c.answer for c in fixes)
    assert all(c.messages[-1]["content"].startswith("Fix the bug in this function") for c in fixes)


def test_real_requests_skip_the_eval_only_file_and_keep_a_hash_part(requests_dir):
    exs, record = sft_data.load_real_requests(requests_dir, share=0.5)
    assert set(record["files"]) == {"dolly.jsonl"}
    assert all(e.id.startswith("dolly") for e in exs)
    assert 60 < len(exs) < 140  # about half, by the stable hash
    assert record["files"]["dolly.jsonl"]["ids"] == [e.id for e in exs]
    assert record["files"]["dolly.jsonl"]["licence"] == "CC-BY-SA-3.0"
    assert len(record["files"]["dolly.jsonl"]["sha256"]) == 64
    again, _ = sft_data.load_real_requests(requests_dir, share=0.5)
    assert [e.id for e in again] == [e.id for e in exs]
    (requests_dir / "gsm8k.jsonl").write_text("")
    with pytest.raises(ValueError, match="reserved"):
        sft_data.load_real_requests(requests_dir)


def test_planted_bug_is_the_only_occurrence_of_its_token():
    for src in FUNCS:
        buggy, what = sft_data.plant_bug(src, random.Random(0))
        old, new = what.split(" -> ")
        toks = [t.string for t in tokenize.generate_tokens(iter(buggy.splitlines(True)).__next__)]
        assert buggy != src and toks.count(new) == 1
    assert sft_data.plant_bug("def f(a, b):\n    return a - b + 1\n", random.Random(0)) is None


def test_answers_end_with_eos_and_only_answers_carry_loss(tok):
    ex = sft_data.Example("x", "repeat", [{"role": "user", "content": "Repeat exactly: a b c"}],
                          "a b c", "d")
    ids, start = sft.encode_example(tok, ex)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:start]).endswith("Assistant:")
    assert tok.decode(ids[start:-1]) == " a b c"
    short = sft_data.Example("y", "define", [{"role": "user", "content": "Define x."}], "A letter.", "d")
    rows = [{"ids": ids, "answer_start": start},
            {"ids": sft.encode_example(tok, short)[0], "answer_start": sft.encode_example(tok, short)[1]}]
    batch, labels = sft.collate(rows, [0, 1], pad_id=1)
    for r, row in enumerate(rows):
        n, s = len(row["ids"]), row["answer_start"]
        assert (labels[r, :s] == -100).all() and (labels[r, n:] == -100).all()
        assert labels[r, s:n].tolist() == row["ids"][s:]
        assert labels[r, n - 1] == tok.eos_token_id


def test_batch_order_is_a_pure_function_of_data_and_config():
    exs = [{"ids": [0] * (5 + i % 7), "answer_start": 2, "task": "repeat"} for i in range(50)]
    cfg = sft.SFTConfig(steps=7, batch_size=4)
    a, b = sft.batch_order(exs, cfg), sft.batch_order(exs, cfg)
    assert a == b and len(a) == 7 and all(len(x) == 4 for x in a)


def test_bench_figures():
    assert chat.norm_code("\ndef f():  \n    return 1\n\n") == "def f():\n    return 1"
    lo, hi = chat.wilson(80, 100)
    assert 0.70 < lo < 0.80 < hi < 0.88


@pytest.mark.slow
def test_two_step_tuning_of_both_models(tmp_path, corpus, requests_dir):
    run = tmp_path / "run"
    assert sft.main(["data", "--run", str(run), "--corpus", str(corpus), "--requests",
                     str(requests_dir), "--steps", "2", "--batch-size", "8",
                     "--real-share", "0.02"]) == 0
    record = json.loads((run / "sft_data.json").read_text())
    assert record["synthetic"]["corpus_split"] == "train"
    assert "selfinstruct_user_eval.jsonl" not in record["requests"]["files"]
    rows = [json.loads(x) for x in (run / "examples.jsonl").read_text().splitlines()]
    assert all(not r["doc"].startswith("val/") for r in rows)
    common = ["--run", str(run), "--steps", "2", "--batch-size", "2", "--threads", "1",
              "--ckpt-every", "1", "--no-progress"]
    for arch in sft.ARCHS:
        assert sft.main(["train", "--arch", arch, *common]) == 0
        log = [json.loads(x) for x in (run / arch / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
        assert (run / arch / "final" / "model.safetensors").exists()
    assert sft.main(["train", "--arch", "hybrid", *common]) == 0  # resumed: nothing to do
    assert len((run / "hybrid" / "metrics.jsonl").read_text().splitlines()) == 2
    sft.main(["export", "--run", str(run), "--out", str(tmp_path / "out")])
    from models.hf import HFBackend

    b = HFBackend("t", tmp_path / "out" / "transformer")
    assert b.tokenizer.chat_template == sft_data.CHAT_TEMPLATE
    assert b.render([ChatMessage("user", "hi")]) == "User: hi\n\nAssistant:"

    # a second phase from the first one's weights, on fewer request ids: the exported model
    # still names every id either phase was tuned on (the exclusion list is the union)
    def phase(name: str, share: str, seed: str, init) -> Path:
        """Data, training of both models from ``init(arch)``, export to ``tmp_path/out-NAME``."""
        new = tmp_path / name
        assert sft.main(["data", "--run", str(new), "--corpus", str(corpus), "--requests",
                         str(requests_dir), "--steps", "2", "--batch-size", "8",
                         "--real-share", share, "--seed", seed]) == 0
        for arch in sft.ARCHS:
            assert sft.main(["train", "--arch", arch, *common[:1], str(new), *common[2:],
                             "--init", str(init(arch))]) == 0
        sft.main(["export", "--run", str(new), "--out", str(tmp_path / f"out-{name}")])
        return new

    run2 = phase("run2", "0.01", "7", lambda arch: run / arch / "final")
    ids1 = set(record["requests"]["files"]["dolly.jsonl"]["ids"])
    ids2 = set(json.loads((run2 / "sft_data.json").read_text())["requests"]["files"]
               ["dolly.jsonl"]["ids"])
    assert ids1 and ids2 < ids1
    # the first run started from the default init, the shipped pair, itself a tuned model:
    # its phases and request ids are inherited too
    base = json.loads((sft.REFERENCE / "transformer" / "sft_data.json").read_text())
    inherited = set(base["requests"]["files"]["dolly.jsonl"]["ids"])
    base_runs = [p["run"] for p in base["phases"]]
    shipped = json.loads((tmp_path / "out-run2" / "hybrid" / "sft_data.json").read_text())
    assert set(shipped["requests"]["files"]["dolly.jsonl"]["ids"]) == ids1 | ids2 | inherited
    assert [p["run"] for p in shipped["phases"]] == [*base_runs, str(run), str(run2)]

    # a further phase started from the EXPORTED model (as phase 7 started from the shipped
    # pair) inherits its phases and every id they were tuned on
    run3 = phase("run3", "0.005", "9", lambda arch: tmp_path / "out-run2" / arch)
    third = json.loads((tmp_path / "out-run3" / "transformer" / "sft_data.json").read_text())
    assert [p["run"] for p in third["phases"]] == [*base_runs, str(run), str(run2), str(run3)]
    assert set(third["requests"]["files"]["dolly.jsonl"]["ids"]) == ids1 | ids2 | inherited


def test_phase6_tasks_long_repeats_and_continuations_that_stop_at_a_sentence_end(tok):
    prose = ("The river rose in the night. " * 3 + "Boats drifted past the mill, and the "
             "miller watched them go until the light failed. He wrote it all down.\n") * 12
    docs = [{"id": f"train/p{i}.txt", "domain": "prose", "source": "p", "text": prose}
            for i in range(4)]
    b = sft_data.SyntheticBuilder(docs, _count(tok), seed=3)
    exs = b.build({"repeat_long": 5, "continue_sentence": 5})
    longs = [e for e in exs if e.task == "repeat_long"]
    conts = [e for e in exs if e.task == "continue_sentence"]
    assert longs and all(60 <= e.meta["tokens"] <= 160 for e in longs)
    assert all(e.messages[-1]["content"].endswith(e.answer) for e in longs)
    assert conts and all(e.answer.endswith((".", "!", "?")) or "\n" not in e.answer
                         for e in conts)
    assert all(e.meta["tokens"] >= 10 for e in conts)
    assert "repeat_long" in sft_data.COPY_TASKS and "continue_sentence" not in sft_data.COPY_TASKS


def test_rare_repeats_pick_the_passage_with_the_most_rare_words(tok):
    common = "the cat sat on the mat and the dog sat on the log " * 40
    rare = "zyxomorph quillantine brevoxial"
    docs = [{"id": f"train/c{i}.txt", "domain": "prose", "source": "p", "text": common}
            for i in range(6)]
    docs.append({"id": "train/r.txt", "domain": "prose", "source": "p",
                 "text": (common[:300] + rare + " ") * 3})
    b = sft_data.SyntheticBuilder(docs, _count(tok), seed=5)
    assert b.rare_words(rare + " the cat") == 3 and b.rare_words("the cat sat") == 0
    picked = [e for e in (b.repeat_rare() for _ in range(40)) if e]
    plain = [e for e in (b.repeat() for _ in range(40)) if e]
    share = lambda exs: sum(b.rare_words(e.answer) > 0 for e in exs) / len(exs)  # noqa: E731
    assert picked and plain and share(picked) > share(plain)
    assert all(e.task == "repeat_rare" and e.messages[-1]["content"].endswith(e.answer)
               for e in picked)
    assert "repeat_rare" in sft_data.COPY_TASKS


def test_token_repeats_draw_vocabulary_pieces_and_fit_the_length(tok):
    pieces = sft.vocabulary_pieces(tok)
    assert pieces and all("\ufffd" not in p for p in pieces)
    assert tok.eos_token not in pieces and len(pieces) > 0.9 * (len(tok) - 4)
    b = sft_data.SyntheticBuilder([], _count(tok), seed=1, pieces=pieces)
    exs = [e for e in (b.repeat_tokens() for _ in range(30)) if e]
    assert len(exs) >= 20  # most draws fit 20-60 tokens
    assert all(20 <= e.meta["tokens"] <= 60 and e.doc == "vocabulary" for e in exs)
    assert sft_data.SyntheticBuilder([], _count(tok), seed=1).repeat_tokens() is None
    assert "repeat_tokens" in sft_data.COPY_TASKS
