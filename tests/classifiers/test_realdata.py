"""Real request files (classifiers.training.realdata) and their labelling (classifiers.training.labels):
validation with line numbers, reserved and eval-only files, sampling, the `label` command on
a bad file, the label cache, references cut to fit the context, and the copy share."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from classifiers.training.labels import (
    MIN_ANSWER_TOKENS,
    copy_share,
    fit_to_context,
    label_requests,
    read_labels,
)
from classifiers.training.realdata import (
    RealRequest,
    RequestFileError,
    read_request_file,
    read_requests,
)
from models.base import ChatMessage
from tests.classifiers.fakes import fake_pair

CTX = 1024  # context of the shipped reference pair


def _row(i: int | str, **over) -> dict:
    row = {"id": f"r-{i}", "source": "test-source", "kind": "open_qa",
           "messages": [{"role": "user", "content": f"Question {i}: where does the river go?"}],
           "reference": f"Answer {i}: the river runs to the harbor."}
    row.update(over)
    return row


def _write(path: Path, rows: list) -> Path:
    """One line per entry: a dict/list/number is dumped as JSON, a str is written as is."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _without(key: str, i: int) -> dict:
    row = _row(i)
    del row[key]
    return row


def _req(i: int | str, messages: list[tuple[str, str]], reference: str) -> RealRequest:
    return RealRequest(f"q-{i}", "g", "s", "k", tuple(ChatMessage(r, c) for r, c in messages),
                       reference)


# ---- read_request_file ------------------------------------------------------------------

BAD_LINES = {  # line number -> (line, a fragment the reason must contain)
    2: ('{"id": "x", "source": ', "invalid JSON"),
    3: (_without("reference", 3), "missing key reference"),
    4: (_row(4, reference="   "), "'reference' must be a non-empty string"),
    5: (_row(5, extra="?"), "unknown key extra"),
    6: (_row(6, messages=[]), "'messages' must be a non-empty list"),
    7: (_row(7, messages=[{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]), "last message"),
    8: (_row(8, messages=[{"role": "bot", "content": "hi"}]), "'bot' is not one of"),
    9: (_row(1), "duplicate id 'r-1' (first on line 1)"),
    10: ([1, 2, 3], "expected a JSON object, got list"),
}


def test_a_bad_file_is_refused_as_a_whole_with_each_line_named(tmp_path):
    rows = [_row(1)] + [BAD_LINES[n][0] for n in range(2, 11)] + [_row(11)]
    path = _write(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(RequestFileError) as exc:
        read_request_file(path)
    msg = str(exc.value)
    assert "9 bad lines, nothing was read" in msg
    reported = {}
    for line in msg.splitlines()[1:]:
        where, _, reason = line.partition(": ")
        file, _, n = where.rpartition(":")
        assert file == str(path)
        reported[int(n)] = reason
    assert sorted(reported) == list(range(2, 11))  # exactly the bad lines, the good ones not
    for n, (_, fragment) in BAD_LINES.items():
        assert fragment in reported[n], (n, reported[n])


@pytest.mark.parametrize("bad, fragment", [
    ("not json at all", "invalid JSON"),
    (_row(9, reference=""), "'reference' must be a non-empty string"),
    (_row(9, messages=[{"role": "user", "content": "a", "name": "x"}]), "exactly 'role'"),
    (_row(9, messages=[{"role": "user", "content": "   "}]), "last user message is empty"),
    (_row(9, id=""), "'id' must be a non-empty string"),
    ('"just a string"', "expected a JSON object, got str"),
])
def test_one_bad_line_among_good_ones_names_its_line(tmp_path, bad, fragment):
    path = _write(tmp_path / "one.jsonl", [_row(1), _row(2), bad, _row(4)])
    with pytest.raises(RequestFileError) as exc:
        read_request_file(path)
    assert f"{path}:3: " in str(exc.value) and fragment in str(exc.value)
    assert f"{path}:1:" not in str(exc.value) and f"{path}:4:" not in str(exc.value)


def test_many_bad_lines_are_listed_up_to_a_limit(tmp_path):
    path = _write(tmp_path / "junk.jsonl", ["{"] * 25)
    with pytest.raises(RequestFileError) as exc:
        read_request_file(path)
    msg = str(exc.value)
    assert "25 bad lines" in msg and f"{path}:20:" in msg and f"{path}:21:" not in msg
    assert "and 5 more" in msg


def test_a_good_file_with_blank_lines_parses(tmp_path):
    multi = _row(2, messages=[{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": "Name a river."}])
    path = _write(tmp_path / "dolly.jsonl", ["", _row(1), "   ", multi, ""])
    reqs = read_request_file(path)
    assert [r.id for r in reqs] == ["r-1", "r-2"]
    r = reqs[1]
    assert r.group == "dolly" and r.source == "test-source" and r.kind == "open_qa"
    assert r.reference == multi["reference"]
    routed = r.routing()
    assert list(routed.messages) == [ChatMessage(m["role"], m["content"])
                                     for m in multi["messages"]]
    assert routed.messages[-1].content == "Name a river."
    assert r.to_json() == {**multi, "group": "dolly"}


def test_empty_and_missing_files_are_errors(tmp_path):
    with pytest.raises(RequestFileError, match="no requests"):
        read_request_file(_write(tmp_path / "empty.jsonl", ["", " "]))
    with pytest.raises(RequestFileError, match="no such request file"):
        read_request_file(tmp_path / "absent.jsonl")


def test_split_is_stable_by_id():
    a = _req("x", [("user", "one")], "ref")
    assert a.split == RealRequest(a.id, "other", "o", "o", (ChatMessage("user", "two"),), "r").split
    # pinned: a changed split would move requests between train and test
    pinned = {"dolly-0001": "train", "dolly-0002": "train", "mbpp-7": "test", "a": "test",
              "b": "train", "c": "test", "d": "train"}
    assert {i: RealRequest(i, "g", "s", "k", (), "r").split for i in pinned} == pinned
    ids = [f"id-{i}" for i in range(2000)]
    share = sum(RealRequest(i, "g", "s", "k", (), "r").split == "test" for i in ids) / len(ids)
    assert 0.17 < share < 0.23


# ---- reserved names -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gsm8k", "arena_hard", "humaneval", "Chatbot_Arena"])
def test_reserved_files_are_refused(tmp_path, name):
    path = _write(tmp_path / f"{name}.jsonl", [_row(1)])  # a valid file: refused by its name
    with pytest.raises(RequestFileError, match="reserved"):
        read_request_file(path)
    with pytest.raises(RequestFileError, match="reserved"):
        read_requests([tmp_path])


def test_a_similar_but_unreserved_name_is_read(tmp_path):
    assert len(read_request_file(_write(tmp_path / "gsm_like.jsonl", [_row(1)]))) == 1


# ---- read_requests over a folder -----------------------------------------------------------

@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "requests"
    d.mkdir()
    _write(d / "alpha.jsonl", [_row(f"a{i}") for i in range(30)])
    _write(d / "beta.jsonl", [_row(f"b{i}") for i in range(4)])
    _write(d / "selfinstruct_user_eval.jsonl", [_row(f"e{i}") for i in range(3)])
    (d / "notes.txt").write_text("not a request file")
    return d


def test_per_group_sampling_is_deterministic(folder):
    one = read_requests([folder], per_group=5, seed=7)
    assert [r.id for r in one] == [r.id for r in read_requests([folder], per_group=5, seed=7)]
    groups = [r.group for r in one]
    assert groups.count("alpha") == 5 and groups.count("beta") == 4  # beta has fewer than 5
    assert groups.count("selfinstruct_user_eval") == 3
    alpha = [r.id for r in one if r.group == "alpha"]
    assert alpha == sorted(alpha, key=lambda i: int(i[3:]))  # kept in file order
    other = [r.id for r in read_requests([folder], per_group=5, seed=8) if r.group == "alpha"]
    assert other != alpha  # the seed matters
    assert len(read_requests([folder])) == 37  # no per_group: everything


def test_eval_only_file_can_be_left_out(folder):
    groups = {r.group for r in read_requests([folder], include_eval_only=False)}
    assert groups == {"alpha", "beta"}
    assert "selfinstruct_user_eval" in {r.group for r in read_requests([folder])}


def test_one_bad_file_in_a_folder_stops_everything(folder):
    _write(folder / "gamma.jsonl", [_row("g1"), _row("g2", messages="hi")])
    with pytest.raises(RequestFileError, match=r"gamma\.jsonl:2: 'messages'"):
        read_requests([folder], per_group=2)


def test_files_and_folders_can_be_mixed_and_missing_paths_fail(folder, tmp_path):
    extra = _write(tmp_path / "extra.jsonl", [_row("x1")])
    assert {r.group for r in read_requests([folder / "beta.jsonl", extra])} == {"beta", "extra"}
    with pytest.raises(RequestFileError, match="no such file or directory"):
        read_requests([tmp_path / "nowhere"])
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(RequestFileError, match=r"no \*\.jsonl"):
        read_requests([empty])


# ---- archroute label on a bad file ---------------------------------------------------------

@pytest.mark.parametrize("existing", [False, True])
def test_label_command_refuses_a_bad_file_and_writes_nothing(tmp_path, monkeypatch, existing):
    from router.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() rewrites sys.argv
    bad = _write(tmp_path / "dolly.jsonl", [_row(1), _row(2), _row(3, reference="")])
    out = tmp_path / "labels" / "out.jsonl"
    before = None
    if existing:
        out.parent.mkdir()
        out.write_text('{"key": "old"}\n')
        before = (out.read_bytes(), out.stat().st_mtime_ns)
    with pytest.raises(SystemExit) as exc:
        main(["label", "--requests", str(bad), "--out", str(out), "--no-progress"])
    msg = str(exc.value.code)
    assert msg.startswith("archroute label:") and f"{bad}:3: 'reference'" in msg
    if existing:
        assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    else:
        assert not out.exists() and not out.parent.exists()


# ---- read_labels ---------------------------------------------------------------------------

def test_read_labels_skips_a_truncated_last_line(tmp_path, caplog):
    path = tmp_path / "l.jsonl"
    path.write_text('{"key": "a", "gap": 0.1}\n{"key": "b", "gap": -0.2}\n{"key": "c", "ga')
    with caplog.at_level(logging.WARNING, logger="classifiers.training.labels"):
        rows = read_labels(path)
    assert [r["key"] for r in rows] == ["a", "b"]
    assert "truncated last line" in caplog.text


def test_read_labels_refuses_a_bad_line_in_the_middle(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b", "ga\n{"key": "c"}\n')
    with pytest.raises(ValueError, match=rf"{path.name}:2: not a label row"):
        read_labels(path)
    assert read_labels(tmp_path / "absent.jsonl") == []


def test_read_labels_names_the_file_line_despite_blank_lines(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"key": "a"}\n\n\n{"key": "b", "ga\n{"key": "c"}\n')
    with pytest.raises(ValueError, match=rf"{path.name}:4: "):
        read_labels(path)


def test_resuming_after_a_crash_keeps_the_cache_readable(tmp_path):
    t, h = fake_pair()
    reqs = [_req(i, [("user", f"question {i} about the river")], f"answer {i} river stone")
            for i in range(6)]
    cache = tmp_path / "l.jsonl"
    label_requests(reqs[:3], t, h, cache=cache, progress=False, chunk_size=1)
    cache.write_bytes(cache.read_bytes()[:-40])  # the crash: last row cut, no newline
    assert len(label_requests(reqs, t, h, cache=cache, progress=False, chunk_size=2)) == 6
    assert {r["id"] for r in read_labels(cache)} == {r.id for r in reqs}


# ---- labelling real requests on the reference pair -----------------------------------------

LONG_REF = "The cat sat on the mat and looked at the bird in the old tree. " * 250
LONG_PROMPT = "Tell me about the stone bridge over the narrow river. " * 250


def test_fit_to_context_cuts_a_long_reference(reference_pair):
    t, _ = reference_pair
    assert t.context_length == CTX
    prompt = t.render([ChatMessage("user", "Repeat the sentence many times.")])
    cut, flags = fit_to_context(t, prompt, LONG_REF)
    n_full, n_cut = len(t.encode(LONG_REF)), len(t.encode(cut))
    assert flags == {"ref_cut": True, "prompt_cut": False, "ref_tokens_full": n_full}
    assert n_full > CTX and LONG_REF.startswith(cut)
    assert len(t.encode(prompt)) + n_cut <= CTX - 1 and n_cut > CTX - 64  # fills the context

    cut, flags = fit_to_context(t, LONG_PROMPT, LONG_REF)  # both long: MIN_ANSWER_TOKENS kept
    assert flags["ref_cut"] and flags["prompt_cut"]
    assert len(t.encode(cut)) == MIN_ANSWER_TOKENS and LONG_REF.startswith(cut)

    # a minimum longer than the context is capped by it
    cut, flags = fit_to_context(t, LONG_PROMPT, LONG_REF, min_answer=5 * CTX)
    assert flags["ref_cut"] and len(t.encode(cut)) == CTX - 1

    short = "It runs to the harbor."
    assert fit_to_context(t, prompt, short) == (
        short, {"ref_cut": False, "prompt_cut": False, "ref_tokens_full": len(t.encode(short))})
    # a backend without tokenizer/context is trusted to fit
    assert fit_to_context(fake_pair()[0], LONG_PROMPT, LONG_REF)[1]["ref_tokens_full"] is None


def test_labels_flag_cut_references_and_reuse_the_cache(reference_pair, tmp_path, monkeypatch):
    t, h = reference_pair
    reqs = [
        _req("long", [("user", "Repeat the sentence many times.")], LONG_REF),
        _req("both", [("user", LONG_PROMPT)], LONG_REF),
        _req("short", [("user", "Where does the river go?")], "It runs to the harbor."),
    ]
    cache = tmp_path / "l.jsonl"
    rows = label_requests(reqs, t, h, cache=cache, progress=False)
    by = {r["id"]: r for r in rows}
    assert [r["id"] for r in rows] == [r.id for r in reqs]
    long, both, short = by["q-long"], by["q-both"], by["q-short"]
    assert long["ref_cut"] and not long["prompt_cut"]
    assert long["ref_tokens_full"] > long["n_tokens"] >= MIN_ANSWER_TOKENS
    assert long["n_tokens"] > CTX - 64
    assert both["ref_cut"] and both["prompt_cut"] and both["n_tokens"] >= MIN_ANSWER_TOKENS
    assert both["ref_tokens_full"] > both["n_tokens"]
    assert not short["ref_cut"] and not short["prompt_cut"]
    assert short["n_tokens"] == short["ref_tokens_full"] == len(t.encode("It runs to the harbor."))
    assert short["ref_chars_scored"] == len("It runs to the harbor.")
    for r in rows:
        assert r["gap"] == pytest.approx(r["loss_transformer"] - r["loss_hybrid"], abs=1e-5)
        assert 0 <= r["copy4_share"] <= 1
    assert long["copy4_share"] > 0.9  # the reference repeats one sentence

    size = cache.stat().st_size
    assert sorted(r["key"] for r in read_labels(cache)) == sorted(r["key"] for r in rows)

    # a raising score_batch would be swallowed (the request skipped): count the calls instead
    calls = []
    monkeypatch.setattr(t, "score_batch", lambda pairs, *a, **k: calls.append(pairs))
    monkeypatch.setattr(h, "score_batch", lambda pairs, *a, **k: calls.append(pairs))
    assert label_requests(reqs, t, h, cache=cache, progress=False) == rows
    assert calls == [] and cache.stat().st_size == size


def test_a_conversation_is_rendered_by_the_backend(reference_pair, monkeypatch):
    t, h = reference_pair
    turns = [("system", "Be brief."), ("user", "Name a river."), ("assistant", "The Nile."),
             ("user", "And another?")]
    # the shipped pair's chat template renders exactly the plain fallback (models/reference/SFT.md)
    from models.base import ChatMessage, plain_chat_prompt

    msgs = [ChatMessage(r, c) for r, c in turns]  # type: ignore[arg-type]
    assert t.render(msgs) == h.render(msgs) == plain_chat_prompt(msgs)
    req = _req("chat", turns, "The Amazon.")
    seen: dict[str, list] = {}
    for b in (t, h):
        real = b.score_batch

        def record(pairs, *a, _b=b, _real=real, **k):
            seen.setdefault(_b.name, []).extend(pairs)
            return _real(pairs, *a, **k)

        monkeypatch.setattr(b, "score_batch", record)
    row = label_requests([req], t, h, progress=False)[0]
    for b in (t, h):
        [(prompt, answer)] = seen[b.name]
        assert prompt == b.render(list(req.messages)) and answer == "The Amazon."
        assert prompt.endswith("Assistant:")
        at = [prompt.index(c) for _, c in turns]
        assert at == sorted(at) and "User: And another?" in prompt
    assert row["messages"][-1] == {"role": "user", "content": "And another?"}
    assert row["n_tokens"] == len(t.encode("The Amazon."))


def test_each_backend_renders_the_conversation_its_own_way():
    t, h = fake_pair()
    seen = []

    class Templated(type(t)):
        def render(self, prompt):
            return "".join(f"<|{m.role}|>{m.content}" for m in prompt) + f"<|{self.name}|>"

        def score_batch(self, pairs):
            seen.extend((self.name, p) for p, _ in pairs)
            return super().score_batch(pairs)

    req = _req("c", [("user", "hi"), ("assistant", "yo"), ("user", "why")], "because")
    rows = label_requests([req], Templated(t.name, -0.3, -2.2), Templated(h.name, -0.9, -1.9),
                          progress=False)
    assert len(rows) == 1 and rows[0]["copy4_share"] is None  # fakes expose no token ids
    assert seen == [(t.name, f"<|user|>hi<|assistant|>yo<|user|>why<|{t.name}|>"),
                    (h.name, f"<|user|>hi<|assistant|>yo<|user|>why<|{h.name}|>")]
    # without render, the plain fallback
    plain = label_requests([req], t, h, progress=False)
    assert plain[0]["gap"] == plain[0]["gap"] and not plain[0]["ref_cut"]


# ---- copy_share ---------------------------------------------------------------------------

def test_copy_share_of_a_repeat_and_of_fresh_text(reference_pair):
    t, _ = reference_pair
    passage = ("Seven quiet lanterns drifted over the harbor while the old ferryman counted "
               "the gulls, humming a song his grandmother taught him about winter storms.")
    fresh = ("Quantum chromodynamics describes gluons binding quarks; asymptotic freedom "
             "weakens that coupling at high energies, as measured in deep inelastic scattering.")
    prompt = t.render([ChatMessage("user", f"Repeat this exactly: {passage}")])
    repeat = copy_share(t.encode(" " + passage), prompt, t)
    novel = copy_share(t.encode(" " + fresh), prompt, t)
    assert repeat > 0.85 and novel < 0.1


def test_copy_share_counts_exactly():
    class Chars:  # one token per character
        @staticmethod
        def encode(s):
            return [ord(c) for c in s]

    ids = Chars.encode
    # prompt 4-grams abcd bcde cdef; answer "abcd": only the last token completes one seen
    assert copy_share(ids("abcd"), "abcdef", Chars()) == pytest.approx(1 / 4)
    assert copy_share(ids("abcd"), "xabcd", Chars()) == pytest.approx(1 / 4)  # the prompt's last
    # repeats inside the answer count too: the second "wxyz" completes a seen 4-gram
    assert copy_share(ids("wxyzwxyz"), "....", Chars()) == pytest.approx(1 / 8)
    assert copy_share([], "abc", Chars()) is None
    assert copy_share(ids("abcd"), "abcd", object()) is None  # no tokenizer: unknown


def test_requests_a_pair_was_tuned_on_are_left_out(folder, tmp_path):
    """#22: labels, the classifier's tables and span-eval never score a request the pair
    was instruction-tuned on: its ids come from sft_data.json in the model directories."""
    import json

    from models.reference_pair import tuned_request_ids

    everything = read_requests([folder])
    drop = {everything[0].id, everything[3].id}
    tdir, hdir, raw = tmp_path / "t", tmp_path / "h", tmp_path / "raw"
    for d, ids in ((tdir, [everything[0].id]), (hdir, [everything[3].id])):
        d.mkdir()
        (d / "sft_data.json").write_text(json.dumps(
            {"requests": {"files": {"x.jsonl": {"ids": ids}}}}))
    raw.mkdir()
    ids, files = tuned_request_ids(tdir, hdir, raw, None)
    assert ids == drop and [f["path"] for f in files] == [str(tdir / "sft_data.json"),
                                                           str(hdir / "sft_data.json")]
    assert all(len(f["sha256"]) == 64 for f in files)
    kept = read_requests([folder], exclude=ids)
    assert {r.id for r in kept} == {r.id for r in everything} - drop
    assert tuned_request_ids(raw) == (frozenset(), [])  # a raw-text pair excludes nothing
