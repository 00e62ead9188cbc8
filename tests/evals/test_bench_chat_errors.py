"""evals.bench.chat_errors: the teacher-forced first wrong token agrees with greedy decoding
on the shipped transformer."""

from collections import Counter

import pytest

from evals.bench import chat_errors
from models.base import ChatMessage, GenerationParams
from models.training import sft_data

# a passage the shipped transformer repeats and then ends (shorter ones are often copied twice)
PROMPT = "Repeat exactly: The harbour was quiet at dawn and the boats were still tied to the pier."


@pytest.fixture(scope="module")
def transformer():
    from models.hf import HFBackend
    from models.reference_pair import reference_path

    return HFBackend("t", reference_path("transformer"), architecture="transformer")


def _case(prompt: str, answer: str) -> sft_data.Example:
    return sft_data.Example("c", "repeat", [{"role": "user", "content": prompt}], answer, "d")


def test_an_answer_greedy_decoding_gives_has_no_wrong_token(transformer):
    prompt = PROMPT
    out = transformer.generate([ChatMessage("user", prompt)],
                               GenerationParams(max_tokens=40, temperature=0.0))
    assert out.finish_reason == "stop"  # the tuned pair ends its answers
    rows = chat_errors.first_errors(transformer.model, transformer.tokenizer,
                                    [_case(prompt, out.text)], Counter())
    assert rows[0]["wrong"] == 0 and "at" not in rows[0]


def test_the_first_wrong_token_is_where_the_reference_leaves_greedy(transformer):
    prompt = PROMPT
    out = transformer.generate([ChatMessage("user", prompt)],
                               GenerationParams(max_tokens=40, temperature=0.0)).text.strip()
    tok = transformer.tokenizer
    ids = tok(" " + out, add_special_tokens=False)["input_ids"]
    k = len(ids) // 2
    other = next(t for t in tok(" zebra quantum", add_special_tokens=False)["input_ids"]
                 if t != ids[k])
    changed = tok.decode(ids[:k] + [other] + ids[k + 1:]).strip()
    assert tok(" " + changed, add_special_tokens=False)["input_ids"][:k + 1] == ids[:k] + [other]
    row = chat_errors.first_errors(transformer.model, tok, [_case(prompt, changed)],
                                   Counter({other: 7}))[0]
    assert row["wrong"] >= 1 and row["at"] == k
    assert row["ref"] == tok.decode([other]) and row["ref_count"] == 7
    assert row["p_got"] >= row["p_ref"]
