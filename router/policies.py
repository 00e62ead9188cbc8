"""Routing policies: each one only *scores* a request; one shared step decides.

A policy maps a :class:`~classifiers.request.RoutingRequest` to a score in [0, 1], the
probability that the transformer is the better backend for it. :func:`decide` turns a score
and a threshold into a backend, the same way for every policy, so threshold sweeps and
cost/quality profiles mean the same thing whichever policy is underneath.

Registry keys are stable lowercase strings. Built-ins register with :func:`register`
exactly as an outside module would; ``LAZY`` entries (``"module:attr"``) are imported only
when asked for, so importing this module never imports numpy, torch or lightgbm.

>>> p = get_policy("rules")
>>> decide(p.score(RoutingRequest.from_prompt("Repeat this exactly: abc abc")), 0.5)
'transformer'
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Literal

from classifiers import lexicon
from classifiers.request import DEFAULT_THRESHOLD, RoutingRequest

log = logging.getLogger(__name__)

Decision = Literal["transformer", "hybrid"]
GAIN_PER_LOGIT = 0.52  # Policy.gain_per_logit's default (nats/token per logit unit)


def decide(score: float, threshold: float = DEFAULT_THRESHOLD) -> Decision:
    """The one decision rule: the transformer when ``score >= threshold``, else the hybrid.

    ``threshold = 0`` always picks the transformer, ``threshold > 1`` always the hybrid.
    """
    return "transformer" if score >= threshold else "hybrid"


class Policy:
    """Base class. Subclasses set ``name`` and implement :meth:`score`.

    ``__init__`` takes explicit keyword arguments only and stores them; no I/O beyond
    loading what the policy needs to score.
    """

    name: str = ""
    description: str = ""
    blocking: bool = False  # True when score() can take over ~1 ms: the router then runs it
    #                          in a worker thread instead of on its event loop
    fallback_: bool = False  # True: a trained policy without its artifact, scoring by rules
    # True: the router measures the prompt probe (both backends' prefill of the prompt,
    # RoutingRequest.probe) before it asks score()/explain(); the ``probe`` policy
    needs_probe: bool = False

    def threshold_without_probe(self) -> float | None:
        """The threshold a ``needs_probe`` policy's score is compared with when the probe
        failed (its prompt-only fallback's); None: the policy's own."""
        return None

    def score(self, req: RoutingRequest) -> float:
        """P(transformer is the better backend for ``req``), in [0, 1]."""
        raise NotImplementedError

    def score_batch(self, reqs: Sequence[RoutingRequest]) -> list[float]:
        """Scores for many requests (policies with a model override this to batch)."""
        return [self.score(r) for r in reqs]

    def explain(self, req: RoutingRequest) -> tuple[float, dict[str, float]]:
        """The score and the named features it was computed from (for the decision log),
        in one pass. Policies that read features override this; the default has none."""
        return self.score(req), {}

    def contributions(self, features: dict[str, float]) -> dict[str, float] | None:
        """How much each feature (from :meth:`explain`) moved the score, positive towards
        the transformer; None when the policy cannot say."""
        return None

    def params(self) -> dict[str, object]:
        """The keyword arguments this policy was built with (for logs and provenance)."""
        return {}

    def gain_per_logit(self) -> float:
        """Nats/token of predicted gap per unit of the score's logit, for :meth:`gain`; a
        policy without a gap model: the shipped classifier's own (1 / 1.92, the slope of its
        gap-to-logit calibration)."""
        return GAIN_PER_LOGIT

    def gain(self, score: float, threshold: float) -> float:
        """The predicted gain (nats/token of the answer) of the backend this score picks
        over the other, measured from the decision boundary: ``gain_per_logit * |logit(score)
        - logit(threshold)|`` (scores clipped to [1e-4, 1 - 1e-4]); a conversation's turn
        switches backend only when it beats the handoff cost (router/conversations.py)."""
        return self.gain_per_logit() * abs(_logit(score) - _logit(threshold))

    def default_threshold(self) -> float:
        """The threshold a profile uses when it sets none (a trained policy returns the one
        chosen on validation data for its operating point)."""
        return DEFAULT_THRESHOLD

    def artifact_identity(self) -> dict | None:
        """The trained artifact this policy scores with, as clients see it (name, sha256,
        created_utc); None when it scores without one."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _logit(p: float) -> float:
    p = min(1.0 - 1e-4, max(1e-4, p))
    return math.log(p / (1.0 - p))


# --- registry ------------------------------------------------------------------------

_REGISTRY: dict[str, type[Policy] | Callable[..., Policy]] = {}
# name -> "module:attr" imported on first use (e.g. the evals-only oracle)
LAZY: dict[str, str] = {"oracle": "evals.harness.oracle:OraclePolicy"}
EVAL_ONLY = frozenset({"oracle"})  # policies a serving profile may not use

_KEY = re.compile(r"^[a-z][a-z0-9-]*$")


def register(name: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: ``@register("my-policy")`` makes it available to :func:`get_policy`."""
    if not _KEY.match(name):
        raise ValueError(f"policy name {name!r}: use lowercase letters, digits and '-'")

    def wrap(cls: type[Policy]) -> type[Policy]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"policy {name!r} is already registered to {_REGISTRY[name]!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_policies() -> list[str]:
    """All policy names, registered and lazy, sorted."""
    return sorted(set(_REGISTRY) | set(LAZY))


class UnknownPolicyError(KeyError, ValueError):
    """Raised by :func:`get_policy` for a name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def get_policy(name: str, **kwargs: object) -> Policy:
    """Build the policy registered as ``name`` with keyword arguments ``kwargs``."""
    if name not in _REGISTRY and name in LAZY:
        module, attr = LAZY[name].split(":")
        cls = getattr(importlib.import_module(module), attr)
        _REGISTRY.setdefault(name, cls)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list_policies(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownPolicyError(
            f"unknown policy {name!r}{hint} (known: {', '.join(list_policies())})")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"policy {name!r}: bad arguments {kwargs}: {exc}") from exc


# --- built-ins -----------------------------------------------------------------------


@register("always-transformer")
class AlwaysTransformerPolicy(Policy):
    description = "every request to the transformer"

    def score(self, req: RoutingRequest) -> float:
        return 1.0


@register("always-hybrid")
class AlwaysHybridPolicy(Policy):
    description = "every request to the hybrid"

    def score(self, req: RoutingRequest) -> float:
        return 0.0


@register("random")
class RandomPolicy(Policy):
    """Seeded random routing; at threshold 0.5 a share ``p`` goes to the transformer.

    The score is ``clip(u + p - 0.5)`` with ``u`` uniform in [0, 1) drawn from a hash of
    (seed, request text), so the same request gets the same score whatever the order, and
    sweeping the threshold moves the transformer share linearly.
    """

    description = "seeded coin flip with transformer share p"

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"random: p must be in [0, 1], got {p}")
        self.p = p
        self.seed = seed

    def params(self) -> dict[str, object]:
        return {"p": self.p, "seed": self.seed}

    def score(self, req: RoutingRequest) -> float:
        digest = hashlib.blake2b(f"{self.seed}\0{req.text}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        return min(1.0, max(0.0, u + self.p - 0.5))


# The study's rules: the transformer wins on copying (repeated n-grams, explicit copy/quote/
# extract requests) and on closing brackets (code, markup); the hybrid on meaning-bearing,
# non-repeated text. Cheap text heuristics only, well under a millisecond per request.
# the copy cues of classifiers/lexicon.py, as the features match them: whole words with
# inflections, phrases with spaces or hyphens
_COPY_CUES = re.compile(
    r"\b(" + "|".join(re.escape(c).replace(r"\ ", "[- ]") for c in lexicon.COPY_CUES)
    + r")(s|es|d|ed|ing)?\b", re.IGNORECASE)
_CODE_CUES = re.compile(
    r"```|\bdef \w+\(|\bclass \w+[:(]|\bfunction\b|\breturn\b|=>|;\s*$|</?[a-zA-Z][\w-]*[^>]*>|"
    r"\\begin\{|\{\s*\"", re.MULTILINE)
_WORD = re.compile(r"\w+")
_PAIRS = {")": "(", "]": "[", "}": "{"}


def unclosed_brackets(text: str) -> int:
    """Count of (, [, { left open at the end of ``text`` (closers without openers ignored)."""
    stack: list[str] = []
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in _PAIRS and stack and stack[-1] == _PAIRS[ch]:
            stack.pop()
    return len(stack)


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of word n-grams in ``text`` that occur more than once (0 for short texts)."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    counts: dict[tuple[str, ...], int] = {}
    for g in grams:
        counts[g] = counts.get(g, 0) + 1
    return sum(c for c in counts.values() if c > 1) / len(grams)


def bracket_share(text: str) -> float:
    """Bracket and markup characters per character of ``text``."""
    if not text:
        return 0.0
    return sum(text.count(c) for c in "()[]{}<>") / len(text)


@register("rules")
class RulesPolicy(Policy):
    """The study's rules as additive evidence on a base score.

    Starts at ``base`` (below 0.5: by default the hybrid serves meaning-bearing text) and adds
    ``copy_weight`` for an explicit copy/quote/extract cue, ``repeat_weight`` scaled by the
    share of repeated word 4-grams, ``code_weight`` for code or markup cues and
    ``bracket_weight`` when brackets are left open (the answer must close them).

    Not :class:`classifiers.training.estimators.RulesRouter`, on purpose. This is the serving
    baseline (profile ``archroute-rules``, the harness's ``rules`` row) and the classifier's
    fallback when its artifact is missing: hand-set weights on four cues computed here, so
    it needs no labels, no numpy and no training run, scores in well under a millisecond and
    gives the same score everywhere. ``RulesRouter`` is the *fitted* rules baseline of
    ``archroute train``'s results table: the same idea, with thresholds learned from labels
    on the classifier's feature matrix. Making one call the other would change what each
    measures; what they share, the copy cues, is one list (``classifiers/lexicon.py``).
    """

    description = "study rules: copy/repetition and code/bracket cues -> transformer"

    def __init__(self, base: float = 0.3, copy_weight: float = 0.35,
                 repeat_weight: float = 0.5, code_weight: float = 0.25,
                 bracket_weight: float = 0.2) -> None:
        self.base = base
        self.copy_weight = copy_weight
        self.repeat_weight = repeat_weight
        self.code_weight = code_weight
        self.bracket_weight = bracket_weight

    def params(self) -> dict[str, object]:
        return {"base": self.base, "copy_weight": self.copy_weight,
                "repeat_weight": self.repeat_weight, "code_weight": self.code_weight,
                "bracket_weight": self.bracket_weight}

    def features(self, req: RoutingRequest) -> dict[str, float]:
        """The cues this policy reads, by name (logged in the decision log)."""
        text = req.text
        return {
            "copy_cue": float(bool(_COPY_CUES.search(req.last_user or text))),
            "repeated_4gram_share": repeated_ngram_share(text),
            "code_cue": float(bool(_CODE_CUES.search(text)) or bracket_share(text) > 0.03),
            "unclosed_brackets": float(unclosed_brackets(text)),
        }

    def explain(self, req: RoutingRequest) -> tuple[float, dict[str, float]]:
        f = self.features(req)
        return self._combine(f), f

    def score(self, req: RoutingRequest) -> float:
        return self._combine(self.features(req))

    def contributions(self, features: dict[str, float]) -> dict[str, float]:
        f = features
        return {"copy_cue": self.copy_weight * f["copy_cue"],
                "repeated_4gram_share": self.repeat_weight * min(1.0, 2 * f["repeated_4gram_share"]),
                "code_cue": self.code_weight * f["code_cue"],
                "unclosed_brackets": self.bracket_weight * min(1.0, f["unclosed_brackets"])}

    def _combine(self, f: dict[str, float]) -> float:
        s = (self.base + self.copy_weight * f["copy_cue"]
             + self.repeat_weight * min(1.0, 2 * f["repeated_4gram_share"])
             + self.code_weight * f["code_cue"]
             + self.bracket_weight * min(1.0, f["unclosed_brackets"]))
        return min(1.0, max(0.0, s))


_DEFAULT_MODEL: list[object] = []  # the default artifact, once loaded


@register("classifier")
class ClassifierPolicy(Policy):
    """The trained request classifier (``classifiers.artifact.load_default()``).

    ``operating_point`` names the artifact's threshold a profile uses when it sets none:
    ``quality`` (least expected loss), ``cost`` (best quality within the artifact's budget
    of requests on the transformer) or ``risk-ALPHA`` (``risk-0.05``, ``risk-0.1``,
    ``risk-0.2``: the most requests on the hybrid with at most ALPHA of them losing more than
    0.05 nats/token against the transformer, with 95% confidence, ``classifiers/training/risk.py``);
    all are chosen on out-of-source validation predictions at training time (``meta.json``
    ``thresholds``). ``cost_weight`` (>= 0) lowers the score
    of long prompts, where the transformer's KV cache costs most: ``score = p - cost_weight *
    L / (L + 8000)`` with ``L`` the prompt length in characters. When the default artifact (or
    its module) is missing or unusable the policy falls back to ``rules`` with a logged
    warning; ``fallback_`` is True then. An explicit ``artifact`` path that fails to load
    raises. ``model``, a loaded :class:`~classifiers.artifact.RequestClassifier`, is used
    instead of loading one (a live reload loads an artifact once for every profile).
    """

    description = "trained classifier P(transformer better), optional cost weight"

    def __init__(self, cost_weight: float = 0.0, artifact: str | None = None,
                 operating_point: str = "quality", model: object | None = None) -> None:
        if cost_weight < 0:
            raise ValueError(f"classifier: cost_weight must be >= 0, got {cost_weight}")
        if operating_point not in ("quality", "cost") and not operating_point.startswith("risk-"):
            raise ValueError(f"classifier: operating_point must be 'quality', 'cost' or "
                             f"'risk-ALPHA', got {operating_point!r}")
        self.cost_weight = cost_weight
        self.operating_point = operating_point
        self.artifact = artifact
        if model is not None and not hasattr(model, "p_transformer_from_features"):
            raise ValueError("classifier: 'model' must be a loaded classifier artifact")
        self.model_ = model if model is not None else self._load(artifact)
        known = getattr(self.model_, "thresholds", {})
        # (an artifact from before thresholds were stored has none: 0.5 for every point)
        if self.model_ is not None and known and operating_point not in known:
            raise ValueError(f"classifier: the artifact has no {operating_point!r} threshold; "
                             f"it has {sorted(known)}")
        self.fallback_ = self.model_ is None
        # features are capped in length (docs/classifier.md): ~0.3 ms at 2k tokens, so short
        # prompts are scored on the event loop; the router sends long ones to a thread
        self.blocking = False
        self._rules = RulesPolicy()

    @staticmethod
    def _load(artifact: str | None) -> object | None:
        if artifact:  # asked for by path: a failure to load is an error
            return importlib.import_module("classifiers.artifact").load(artifact)
        try:
            if not _DEFAULT_MODEL:  # one load shared by every profile that uses it
                _DEFAULT_MODEL.append(importlib.import_module("classifiers.artifact").load_default())
            return _DEFAULT_MODEL[0]
        except Exception as exc:  # noqa: BLE001 - absent or unusable: the router still starts
            log.warning("classifier artifact unavailable (%s: %s); falling back to the rules "
                        "policy", type(exc).__name__, exc)
            return None

    def gain_per_logit(self) -> float:
        """An artifact whose class model is its gap regressor (``regressor_is_classifier``,
        centre 0: the shipped one) has ``logit(P) = a * gap + b``: a logit is ``1 / |a|``
        nats/token of predicted gap, exactly; otherwise the base class's."""
        m = self.model_
        meta = getattr(m, "meta", {})
        cal = getattr(m, "calibration", None)
        if (m is not None and meta.get("regressor_is_classifier") and not meta.get("center")
                and cal is not None and cal[0]):
            return 1.0 / abs(float(cal[0]))
        return GAIN_PER_LOGIT

    def artifact_identity(self) -> dict | None:
        identity = getattr(self.model_, "identity", None)  # a test may pass a bare model
        return identity() if callable(identity) else None

    def params(self) -> dict[str, object]:
        return {"cost_weight": self.cost_weight, "artifact": self.artifact,
                "operating_point": self.operating_point}

    def default_threshold(self) -> float:
        if self.model_ is None:
            return DEFAULT_THRESHOLD
        return float(getattr(self.model_, "thresholds", {}).get(self.operating_point,
                                                                DEFAULT_THRESHOLD))

    def explain(self, req: RoutingRequest) -> tuple[float, dict[str, float]]:
        """Score and the classifier's own features (one extraction, shared by both)."""
        if self.model_ is None:
            score, feats = self._rules.explain(req)
        else:
            X, feats = self.model_.named_features(req)  # type: ignore[attr-defined]
            score = float(self.model_.p_transformer_from_features(X)[0])  # type: ignore[attr-defined]
        return min(1.0, max(0.0, score - self._cost(req))), feats

    def contributions(self, features: dict[str, float]) -> dict[str, float] | None:
        if self.model_ is None:
            return self._rules.contributions(features)
        names = self.model_.feature_names  # type: ignore[attr-defined]
        if not set(names) <= set(features):
            return None
        import numpy as np  # this module imports no numpy at import time (see above)

        X = np.array([[features[n] for n in names]])
        return self.model_.contributions(X)  # type: ignore[attr-defined]

    def _cost(self, req: RoutingRequest) -> float:
        n = len(req.text)
        return self.cost_weight * n / (n + 8000)

    def score_batch(self, reqs: Sequence[RoutingRequest]) -> list[float]:
        if not reqs:
            return []
        if self.model_ is None:
            raw = self._rules.score_batch(reqs)
        else:
            proba = self.model_.predict_proba(list(reqs))  # type: ignore[attr-defined]
            if getattr(proba, "ndim", 1) == 2:  # sklearn-style (n, 2): column 1 = transformer
                proba = proba[:, -1]
            raw = [float(p) for p in proba]
        return [min(1.0, max(0.0, s - self._cost(r))) for s, r in zip(raw, reqs, strict=True)]

    def score(self, req: RoutingRequest) -> float:
        return self.score_batch([req])[0]


@register("guarded")
class GuardedPolicy(ClassifierPolicy):
    """The classifier behind its guard (``router/learning/guard.py``): never below the best
    single backend measured on labelled traffic. An artifact made by the learning loop
    (``archroute train --from-log``, the loop's candidates) carries ``guard.json``; then each
    request goes to its cluster's best single backend unless the artifact's predicted gain
    clears the cluster's guarded threshold, and a request unlike every cluster goes to the
    best single backend overall. The score is that decision (1.0 transformer, 0.0 hybrid;
    threshold 0.5). Without a guard file it is the plain classifier policy."""

    description = "classifier behind the guard: never below the best single backend"

    def __init__(self, cost_weight: float = 0.0, artifact: str | None = None,
                 operating_point: str = "quality", model: object | None = None) -> None:
        super().__init__(cost_weight, artifact, operating_point, model)
        from router.learning.guard import load

        folder = getattr(self.model_, "path", None)
        self.guard_ = load(folder) if folder is not None else None  # ValueError: refused
        if self.guard_ is not None and getattr(self.model_, "regressor", None) is None:
            raise ValueError("guarded: the artifact has a guard but no gap regressor")
        self.blocking = self.guard_ is not None  # clustering + the regressor: a worker thread

    def default_threshold(self) -> float:
        return 0.5 if self.guard_ is not None else super().default_threshold()

    def _guarded(self, reqs: Sequence[RoutingRequest], X) -> list[float]:
        from router.learning.guard import cluster_features

        assert self.guard_ is not None
        gap = self.model_.gap_from_features(X)  # type: ignore[attr-defined]
        return [float(a) for a in self.guard_.actions(cluster_features(reqs), gap)]

    def explain(self, req: RoutingRequest) -> tuple[float, dict[str, float]]:
        if self.guard_ is None:
            return super().explain(req)
        X, feats = self.model_.named_features(req)  # type: ignore[attr-defined]
        return self._guarded([req], X)[0], feats

    def score_batch(self, reqs: Sequence[RoutingRequest]) -> list[float]:
        if self.guard_ is None or not reqs:
            return super().score_batch(reqs)
        return self._guarded(reqs, self.model_.features(list(reqs)))  # type: ignore[attr-defined]


@register("probe")
class ProbePolicy(ClassifierPolicy):
    """The request classifier with the prompt probe (issue #24 item 4): an artifact trained
    with ``archroute train --probe`` reads both backends' losses on the prompt by the study's
    token categories (:mod:`classifiers.probe`) beside the request features. ``needs_probe``:
    the router asks both backends for the prompt's log-probabilities (one prefill each,
    concurrently, within the ``probe_timeout_s`` setting) and puts the features in
    :attr:`RoutingRequest.probe` before it scores.

    ``artifact`` (required) is that artifact; one without probe features is a ``ValueError``
    (the router does not start). A request whose probe could not be measured (a backend
    failed, was slow, or the two read different tokens) is scored by ``prompt_only``, the
    prompt-only classifier (the shipped one, or ``fallback_artifact``) with its own
    threshold; the router logs and counts it. The artifact is the profile's own: live
    reloads leave it as it is."""

    description = "classifier with the prompt probe (both backends' prefill losses)"
    needs_probe = True

    def __init__(self, artifact: str | None = None, cost_weight: float = 0.0,
                 operating_point: str = "quality", model: object | None = None,
                 fallback_artifact: str | None = None) -> None:
        if artifact is None and model is None:
            raise ValueError("probe: policy_args.artifact is required: an artifact trained "
                             "with `archroute train --probe` (docs/router.md)")
        super().__init__(cost_weight, artifact, operating_point, model)
        if not getattr(self.model_, "needs_probe", False):
            raise ValueError(f"probe: the artifact {artifact or ''} was trained without the "
                             "prompt probe's features; train one with `archroute train "
                             "--probe --labels FILE --out DIR` (docs/router.md)")
        self.fallback_artifact = fallback_artifact
        self.prompt_only = ClassifierPolicy(cost_weight, fallback_artifact, operating_point)

    def threshold_without_probe(self) -> float | None:
        return self.prompt_only.default_threshold()

    def params(self) -> dict[str, object]:
        return {**super().params(), "fallback_artifact": self.fallback_artifact}

    def explain(self, req: RoutingRequest) -> tuple[float, dict[str, float]]:
        """With ``req.probe``: the probe artifact's score and features (the probe's among
        them); without: ``prompt_only``'s."""
        if req.probe is None:
            return self.prompt_only.explain(req)
        return super().explain(req)

    def contributions(self, features: dict[str, float]) -> dict[str, float] | None:
        out = super().contributions(features)
        return out if out is not None else self.prompt_only.contributions(features)

    def score_batch(self, reqs: Sequence[RoutingRequest]) -> list[float]:
        return [self.explain(r)[0] for r in reqs]
