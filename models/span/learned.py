"""The learned gate: a small model on cheap causal features of a :class:`GateState`.

At each answer step the gate computes a few features from what a decoder knows: the
induction match (length, one-hot and as a number, so that one split is any ``copy-k``;
distance; whether it points into the prompt; whether the last token continued it and for how
many tokens; the class of the token the earlier occurrence continued with, i.e. the token
the copy predicts), the position in the answer, the class of the last token's text, the
bracket depth, the line layout (indentation, tokens since the newline, newline and indented
line shares of prompt and answer), the last role, the entropy of the model that produced the
last token, and running shares (copied tokens, symbol-heavy tokens). It scores them and
picks the transformer when the score exceeds the threshold. The score estimates
``log p_T(next) - log p_H(next)`` (nats: how much better the transformer will predict the
next token), so the threshold is in nats.

The model is a linear part (``weights``) plus a small regression-tree ensemble (``trees``),
either of which may be empty; the shipped default is 100 trees of 16 leaves (a linear model
was measured too: docs/span.md). Prediction is plain Python (no numpy, no torch, no
lightgbm): tens of microseconds per token.

Features are sparse: :meth:`LearnedState.features` returns ``{name: value}`` with only the
active ones, so each name sits next to the code that computes it; :data:`FEATURES` lists
them all (absent = 0).

Artifact (JSON, no pickle): ``{"format": "archroute-span-gate", "version": 2, "kind":
"trees" | "linear", "features": [...], "weights": {name: w}, "trees": [{"feature",
"threshold", "left", "right", "value"}, ...], "threshold": t, "meta": {...}}``; the shipped
default is ``models/span/default_gate/gate.json``, its training data's provenance (files,
sha256, licences) in ``meta``. Training lives in :mod:`evals.span.train`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from models.span.gate_base import MAX_MATCH, Gate, GateState, Role

FORMAT = "archroute-span-gate"
VERSION = 2  # 2: the features after "answer_code" in FEATURES (older artifacts load)
_TREE_KEYS = ("feature", "threshold", "left", "right", "value")
DEFAULT_DIR = Path(__file__).resolve().parent / "default_gate"
# the gate for span decoding over engines (``learned-topk``): trained on the top-5 entropy
# proxy engines return (models.span.remote.topk_entropy; python -m evals.span.topk)
TOPK_DIR = Path(__file__).resolve().parent / "topk_gate"
ARTIFACT = "gate.json"

# the class of a token's text (the last token before the one being chosen for)
CLASSES = ("newline", "space", "open", "close", "digit", "punct", "word", "piece", "other")


def token_class(text: str) -> str:
    """One of :data:`CLASSES`: a token holding a newline; only spaces; an opening or a
    closing bracket; a digit; other punctuation; a word start (space + letter); a piece
    continuing a word (letters, no leading space); anything else (empty, undecodable)."""
    if "\n" in text:
        return "newline"
    if not text or "\ufffd" in text:
        return "other"
    if text.isspace():
        return "space"
    body = text.strip()
    if any(c in "([{" for c in body):
        return "open"
    if any(c in ")]}" for c in body):
        return "close"
    if any(c.isdigit() for c in body):
        return "digit"
    if not any(c.isalpha() for c in body):
        return "punct"
    return "word" if text[0].isspace() else "piece"


FEATURES: tuple[str, ...] = (
    "bias", *(f"match={k}" for k in range(1, MAX_MATCH + 1)), "log_dist", "match_x_log_dist",
    "match_in_prompt", "copy_hit", "hit_rate", "log_run", "copy_share", "log_step", "first",
    "log_prompt", *(f"class={c}" for c in CLASSES), "depth", "last_t", "ent_t", "ent_h",
    "ent_avg", "prompt_code", "answer_code",
    # version 2: every copy-k in one split, the continuation the match predicts, the layout
    "match_len", "log_hit_run", *(f"pred={c}" for c in CLASSES), "ent_last", "indent", "col",
    "prompt_nl", "answer_nl", "prompt_indent",
)
CODE_CLASSES = frozenset({"open", "close", "punct", "digit"})  # symbol-heavy text: code, maths
EMA = 0.2  # weight of the newest step in the running averages (hit_rate, ent_avg)


class LearnedState(GateState):
    """A :class:`GateState` that also tracks the copy run and running averages, computes
    the features and scores them with the gate's weights."""

    def __init__(self, gate: LearnedGate, prompt_ids: Sequence[int],
                 token_text: Callable[[int], str] | None) -> None:
        super().__init__(prompt_ids, token_text)
        self.gate = gate
        self._class_of = gate.class_lookup(token_text) if token_text is not None else None
        self.run = 0  # consecutive answer tokens ending here that complete a repeated 2-gram
        self.copied = 0  # answer tokens so far that complete a repeated 2-gram
        self.hit = False  # the last token continued the previous induction match
        self.hit_rate = 0.0  # running average of ``hit``
        self.ent_avg: float | None = None  # running average of the producers' entropies
        self._prev_dist = self.matcher.match_dist
        self.prompt_code = 0.0  # share of the prompt's tokens in CODE_CLASSES
        self.answer_code = 0  # answer tokens so far in CODE_CLASSES
        self.hit_run = 0  # consecutive answer tokens that continued the previous match
        self.prompt_nl = 0.0  # share of the prompt's tokens holding a newline
        self.answer_nl = 0  # answer tokens so far holding a newline
        self.prompt_indent = 0.0  # share of the prompt's lines that start indented
        self.col = 0  # tokens since the last newline (the prompt's included)
        self.indent = 0  # leading blanks of the current line (the prompt's included)
        self._lead = True  # still in the current line's leading blanks
        self._lines = self._indented = 0  # lines with a visible character, indented ones
        if self._class_of is not None and len(prompt_ids):
            cls = self._class_of
            n = len(prompt_ids)
            self.prompt_code = sum(cls(t) in CODE_CLASSES for t in prompt_ids) / n
            self.prompt_nl = sum(cls(t) == "newline" for t in prompt_ids) / n
            assert token_text is not None
            for t in prompt_ids:
                self._layout(token_text(t))
            self.prompt_indent = self._indented / self._lines if self._lines else 0.0

    def _layout(self, text: str) -> None:
        """Advance the line state (column, indentation) over one token's text."""
        for ch in text:
            if ch == "\n":
                self.col, self.indent, self._lead = -1, 0, True
            elif self._lead:
                if ch == " ":
                    self.indent += 1
                elif ch == "\t":
                    self.indent += 4
                else:
                    self._lead = False
                    self._lines += 1
                    self._indented += self.indent > 0
        self.col += 1

    def push(self, token_id: int, role: Role, entropy: float | None = None) -> None:
        prev_len, prev_dist = self.matcher.match_len, self._prev_dist
        super().push(token_id, role, entropy)
        m = self.matcher
        # the earlier occurrence continued: the copy predicted this token
        self.hit = prev_len > 0 and m.match_len > 0 and m.match_dist == prev_dist
        self.hit_rate += EMA * (float(self.hit) - self.hit_rate)
        self._prev_dist = m.match_dist
        if m.match_len >= 2:
            self.run += 1
            self.copied += 1
        else:
            self.run = 0
        self.hit_run = self.hit_run + 1 if self.hit else 0
        if self._class_of is not None:
            c = self._class_of(token_id)
            if c in CODE_CLASSES:
                self.answer_code += 1
            elif c == "newline":
                self.answer_nl += 1
            assert self._text is not None
            self._layout(self._text(token_id))
        if entropy is not None:
            self.ent_avg = entropy if self.ent_avg is None else \
                self.ent_avg + EMA * (entropy - self.ent_avg)

    def features(self) -> dict[str, float]:
        """The active features before choosing the next role (causal: everything here is
        known before the next token exists)."""
        f: dict[str, float] = {"bias": 1.0}
        m = self.matcher
        if m.match_len:
            f[f"match={m.match_len}"] = 1.0
            f["match_len"] = float(m.match_len)
            if self._class_of is not None:  # the token the earlier occurrence continued with
                f["pred=" + self._class_of(m.ids[len(m.ids) - m.match_dist])] = 1.0
            ld = math.log1p(m.match_dist)
            f["log_dist"] = ld
            f["match_x_log_dist"] = m.match_len * ld / MAX_MATCH
            if m.match_dist > self.step:  # the earlier occurrence is in the prompt
                f["match_in_prompt"] = 1.0
        if self.hit:
            f["copy_hit"] = 1.0
            f["log_hit_run"] = math.log1p(self.hit_run)
        if self.hit_rate:
            f["hit_rate"] = self.hit_rate
        if self.run:
            f["log_run"] = math.log1p(self.run)
        if self.copied:
            f["copy_share"] = self.copied / self.step
        f["log_step"] = math.log1p(self.step)
        if self.step == 0:
            f["first"] = 1.0
        f["log_prompt"] = math.log1p(self.n_prompt) / 7.0
        if self._class_of is not None and self.last_token is not None:
            f["class=" + self._class_of(self.last_token)] = 1.0
        if self.depth:
            f["depth"] = float(min(self.depth, 3))
        ent = self.last_entropy
        if ent is not None:
            f["ent_last"] = ent
        if self.last_role == "transformer":
            f["last_t"] = 1.0
            if ent is not None:
                f["ent_t"] = ent
        elif self.last_role == "hybrid" and ent is not None:
            f["ent_h"] = ent
        if self.ent_avg is not None:
            f["ent_avg"] = self.ent_avg
        if self.prompt_code:
            f["prompt_code"] = self.prompt_code
        if self.answer_code:
            f["answer_code"] = self.answer_code / self.step
        if self._class_of is not None:
            if self.indent:
                f["indent"] = min(self.indent, 16) / 4
            if self.col:
                f["col"] = math.log1p(self.col)
            if self.prompt_nl:
                f["prompt_nl"] = self.prompt_nl
            if self.answer_nl:
                f["answer_nl"] = self.answer_nl / self.step
            if self.prompt_indent:
                f["prompt_indent"] = self.prompt_indent
        return f

    def score(self) -> float:
        """The predicted transformer advantage on the next token (nats)."""
        return self.gate.predict(self.features())

    def choose(self) -> Role:
        thr, cost = self.gate.threshold, self.gate.switch_cost
        if cost and self.last_role is not None:  # a switch must gain its cost (hysteresis)
            thr += cost if self.last_role == "hybrid" else -cost
        score = self.score()
        self.margin = abs(score - thr)
        return "transformer" if score > thr else "hybrid"


Tree = tuple[list, list, list, list, list]  # (feature or None at a leaf, threshold, left, right, value)


def tree_value(tree: Tree, f: dict[str, float]) -> float:
    """One regression tree on sparse features (absent = 0): from node 0, go left while
    ``x[feature] <= threshold``, right otherwise, to a leaf's value."""
    feat, thr, left, right, value = tree
    i = 0
    while feat[i] is not None:
        i = left[i] if f.get(feat[i], 0.0) <= thr[i] else right[i]
    return value[i]


class LearnedGate(Gate):
    """``transformer`` when ``sum(weights[f] * x[f]) + sum(tree(x)) > threshold``: a linear
    model, a small tree ensemble (trees), or both.

    ``switch_cost`` (nats, >= 0; 0 = none) prices a switch: after a hybrid token the
    transformer takes over only when the score exceeds ``threshold + switch_cost``, after a
    transformer token the hybrid only when it falls to ``threshold - switch_cost`` or below
    (hysteresis: the predicted advantage must pay for the catch-up a switch costs). The
    first answer token uses ``threshold``. Chosen on the training sources
    (``python -m evals.span.switch_cost``; docs/span.md)."""

    needs_text = True

    def __init__(self, weights: dict[str, float], threshold: float = 0.0,
                 meta: dict | None = None, name: str = "learned",
                 trees: list[Tree] | None = None, switch_cost: float = 0.0) -> None:
        used = set(weights) | {f for t in trees or () for f in t[0] if f is not None}
        unknown = used - set(FEATURES)
        if unknown:
            raise ValueError(f"learned gate: unknown features {sorted(unknown)}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.trees: list[Tree] = [tuple(list(a) for a in t) for t in trees or ()]  # type: ignore[misc]
        self.threshold = float(threshold)
        if not switch_cost >= 0:
            raise ValueError(f"learned gate: switch_cost must be >= 0, got {switch_cost!r}")
        self.switch_cost = float(switch_cost)
        self.meta = dict(meta or {})
        self.name = name
        self._classes: tuple[Callable[[int], str], Callable[[int], str]] | None = None

    @property
    def kind(self) -> str:
        return "trees" if self.trees else "linear"

    def predict(self, f: dict[str, float]) -> float:
        """The score of sparse features ``f`` (nats: the predicted transformer advantage)."""
        w = self.weights
        s = sum(w.get(k, 0.0) * v for k, v in f.items()) if w else 0.0
        for t in self.trees:
            s += tree_value(t, f)
        return s

    def class_lookup(self, token_text: Callable[[int], str]) -> Callable[[int], str]:
        """token id -> class, memoised for the last ``token_text`` function seen (a decoder
        keeps one per vocabulary; the function is held, so its id is never reused)."""
        if self._classes is None or self._classes[0] is not token_text:
            memo: dict[int, str] = {}

            def class_of(i: int) -> str:
                c = memo.get(i)
                if c is None:
                    c = memo[i] = token_class(token_text(i))
                return c

            self._classes = (token_text, class_of)
        return self._classes[1]

    def start(self, prompt_ids, token_text=None) -> LearnedState:
        return LearnedState(self, prompt_ids, token_text)

    # ---- artifact ----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": self.kind,
                "features": list(FEATURES), "weights": self.weights,
                "trees": [dict(zip(_TREE_KEYS, t, strict=True)) for t in self.trees],
                "threshold": self.threshold, "switch_cost": self.switch_cost, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        """Write ``gate.json`` (into ``path`` when it is a directory or has no suffix),
        compact JSON (``python -m json.tool`` pretty-prints it)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / ARTIFACT
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")) + "\n")
        return path

    @classmethod
    def from_json(cls, d: dict, name: str = "learned") -> LearnedGate:
        if d.get("format") != FORMAT or d.get("kind") not in ("linear", "trees"):
            raise ValueError(f"not a learned span gate (format {d.get('format')!r}, kind "
                             f"{d.get('kind')!r})")
        if int(d.get("version", 0)) > VERSION:
            raise ValueError(f"learned gate version {d['version']} is newer than this code ({VERSION})")
        trees = [tuple(t[k] for k in _TREE_KEYS) for t in d.get("trees", [])]
        return cls(d.get("weights", {}), d.get("threshold", 0.0), d.get("meta"), name,
                   trees, d.get("switch_cost", 0.0))  # type: ignore[arg-type]


def load_learned_gate(path: str | Path | None = None, name: str | None = None) -> LearnedGate:
    """The learned gate at ``path`` (a ``gate.json`` or a folder holding one); the shipped
    default (``models/span/default_gate``) when None. ``name``: the gate's name (default
    ``learned``, or ``learned:PATH``)."""
    p = Path(path) if path is not None else DEFAULT_DIR
    if p.is_dir():
        p = p / ARTIFACT
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no learned gate there (train one with "
                                "archroute span-eval --train-gate DIR)")
    name = name or ("learned" if path is None else f"learned:{path}")
    return LearnedGate.from_json(json.loads(p.read_text()), name=name)
