"""Task metrics on a generation: exact match, contains, numeric answer, code test.

Each returns a score in [0, 1]. ``code_test`` runs the prompt + generation + the request's
test in a separate Python process with a timeout (model-written code: only enable
generation on suites you trust; it is off by default).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

from evals.harness.suites import EvalRequest

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?")
# where a HumanEval-style completion of a function body ends
CODE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


def exact_match(generation: str, reference: str) -> float:
    """1 when equal after whitespace and case normalisation."""
    return float(_norm(generation) == _norm(reference))


def contains(generation: str, reference: str) -> float:
    """1 when the normalised reference occurs in the normalised generation."""
    return float(_norm(reference) in _norm(generation))


def last_number(text: str) -> float | None:
    nums = _NUMBER.findall(text)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


def numeric(generation: str, reference: str, rel_tol: float = 1e-6) -> float:
    """1 when the generation's first number equals the reference's last number."""
    ref = last_number(reference)
    m = _NUMBER.search(generation)
    if ref is None or m is None:
        return 0.0
    try:
        got = float(m.group(0).replace(",", ""))
    except ValueError:
        return 0.0
    return float(abs(got - ref) <= rel_tol * max(1.0, abs(ref)))


def truncate_code(completion: str) -> str:
    cut = min((i for s in CODE_STOPS if (i := completion.find(s)) >= 0), default=len(completion))
    return completion[:cut]


def code_test(prompt: str, completion: str, test: str, entry_point: str | None,
              timeout_s: float = 5.0) -> float:
    """1 when prompt + completion passes ``test`` (and ``check(entry_point)`` if given)."""
    program = prompt + truncate_code(completion) + "\n\n" + test + "\n"
    if entry_point:
        program += f"\ncheck({entry_point})\n"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            res = subprocess.run([sys.executable, "-I", "-c", program], cwd=tmp, timeout=timeout_s,
                                 capture_output=True)
        except subprocess.TimeoutExpired:
            return 0.0
    return float(res.returncode == 0)


def task_score(req: EvalRequest, generation: str) -> float | None:
    """The request's metric on ``generation`` (None when it has no metric)."""
    if req.metric is None:
        return None
    if req.metric == "code_test":
        return code_test(req.text, generation, req.test or "", req.entry_point)
    ref = req.reference or ""
    return {"exact_match": exact_match, "contains": contains, "numeric": numeric}[req.metric](
        generation, ref)
