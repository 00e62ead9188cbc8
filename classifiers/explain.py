"""The features behind one routing score, in plain words (the chat page's routing card,
``POST /v1/route``).

:func:`reasons` takes each feature's contribution to the score (for the trained classifier:
LightGBM's exact per-feature contributions, ``pred_contrib``, signed so that positive pushes
towards the transformer, plus ``base``, the model's starting point) and describes the
largest ones, e.g. "asks to fix code (towards the
transformer)" or "80% of the prompt is one attached block (towards the transformer)".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

_CUE = {
    "task_fix": "asks to fix or correct something",
    "task_transform": "asks to rewrite, translate or convert a given text",
    "task_split_join": "asks to split or join sentences",
    "task_extract": "asks to extract or quote from the given text",
    "task_generate": "asks for new writing or an explanation",
    "task_list": "asks for a list",
    "task_math": "reads as a math or counting problem",
    "task_short": "asks for a short answer",
}


def _chars(v: float) -> int:
    return round(math.expm1(v))


def _cue(t: str) -> Callable[[float], str]:
    """The description of task cue ``t``: ``t`` when present, its negation when not."""
    return lambda v: (t if v > 0 else t.replace("asks", "does not ask", 1)
                      .replace("reads as", "does not read as", 1))


_DESCRIBE: dict[str, Callable[[float], str]] = {
    **{k: _cue(t) for k, t in _CUE.items()},
    "payload_share": lambda v: (f"{v:.0%} of the last message is one attached block" if v > 0
                                else "no attached text or code block"),
    "payload_chars_log": lambda v: (f"the attached block is {_chars(v):,} characters" if v > 0
                                    else "no attached block"),
    "payload_code": lambda v: ("the attached block looks like code" if v >= 1
                               else "the attached block reads as prose" if v > 0
                               else "no code in the message"),
    "instruction_chars_log": lambda v: f"the instruction is {_chars(v):,} characters",
    "options_listed": lambda v: (f"lists {int(v)} answer options" if v > 0
                                 else "no answer options listed"),
    "tests_listed": lambda v: f"lists {int(v)} tests" if v > 0 else "no tests listed",
    "ends_with_question": lambda v: ("ends with a question" if v > 0
                                     else "does not end with a question"),
    "prev_answer_chars_log": lambda v: (f"follows up on a previous answer of {_chars(v):,} "
                                        "characters" if v > 0 else "a one-turn request"),
    "text_logit": lambda v: ("its wording resembles requests the transformer served better"
                             if v > 0 else "its wording resembles requests the hybrid served "
                             "better"),
    # the rules policy's cues
    "copy_cue": lambda v: "asks to copy, quote or repeat" if v > 0 else "no copy cue",
    "repeated_4gram_share": lambda v: f"{v:.0%} of its word 4-grams repeat",
    "code_cue": lambda v: "contains code or markup" if v > 0 else "no code cue",
    "unclosed_brackets": lambda v: (f"{int(v)} brackets left open" if v > 0
                                    else "no brackets left open"),
}


def describe(name: str, value: float) -> str:
    """One feature's value in words (the name and value when it has no description)."""
    f = _DESCRIBE.get(name)
    return f(value) if f is not None else f"{name} = {value:.3g}"


def reasons(features: Mapping[str, float], contributions: Mapping[str, float] | None = None,
            limit: int = 3, min_share: float = 0.05) -> list[str]:
    """The ``limit`` features that moved the score most, in words, each with its direction.
    Without contributions (a policy that has none), the features that are set, unranked.
    Contributions under ``min_share`` of the largest one are left out."""
    if not contributions:
        return [describe(k, v) for k, v in features.items() if v][:limit]
    if not any(contributions.values()):
        return ["no cue fired: the score is the policy's starting point"]
    top = sorted(contributions.items(), key=lambda kv: -abs(kv[1]))
    biggest = abs(top[0][1]) if top else 0.0
    out = []
    for name, c in top[:limit]:
        if biggest == 0 or abs(c) < min_share * biggest:
            break
        side = "transformer" if c > 0 else "hybrid"
        if name == "base":  # the model's mean score: where every request starts
            out.append(f"starting point: the {side} (the backend the training requests favour "
                       "on average)")
        else:
            out.append(f"{describe(name, features.get(name, 0.0))} (towards the {side})")
    return out
