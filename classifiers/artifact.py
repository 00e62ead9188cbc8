"""The saved request classifier: one directory, no pickles.

    classifier.txt   LightGBM booster (text) of the class model: raw score -> Platt -> P
    regressor.txt    LightGBM booster (text) of the gap model (nats/token), optional; absent
                     when the class model *is* the gap model (``meta.json``
                     ``regressor_is_classifier``: the score is a function of the expected gap)
    text_weights.npy the hashed-n-gram text model (:mod:`classifiers.textrep`), optional:
                     its logit is the last feature, ``text_logit``
    meta.json        feature names, calibration, the profiles' thresholds, margin, versions,
                     training data (files, sha256, licences), held-out metrics, and a
                     self-check (prompts with the predictions made at training time)
    manifest.json    each model file's size and sha256, checked before any parser reads it
                     (:mod:`classifiers.integrity`: atomic writes, isolated loads)

The default artifact ships in ``classifiers/default/`` and is rebuilt by ``archroute train``.
The router's classifier policy calls :func:`load_default` once and then
:meth:`RequestClassifier.predict_proba` per request.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classifiers.features import FEATURE_NAMES, TASK_NAMES, extract, extract_task
from classifiers.integrity import (
    ArtifactError,
    check_in_child,
    check_manifest,
    read_manifest,
    sha256,
    shown,
    write_atomically,
)
from classifiers.probe import PROBE_FEATURES
from classifiers.request import RoutingRequest
from classifiers.textrep import HashedTextModel

if TYPE_CHECKING:
    import lightgbm

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
TEXT_FEATURE = "text_logit"
DEFAULT_DIR = Path(__file__).resolve().parent / "default"
SELF_CHECK_PROMPTS = (
    "",
    "Once upon a time there was a quiet village by the sea, and everyone in it knew why.",
    "Quote the passage above verbatim:\n",
    "def parse(items):\n    out = {}\n    for k, v in items:\n        out[k] = (v, [k,\n",
    "<div class=\"note\"><p>Read the <a href=\"x.html\">guide</a> first.\n",
    "\\begin{itemize}\n\\item one\n\\item two\n",
    "Fix the bug in this function and return the whole corrected function.\n\n"
    "def add(a, b):\n    return a - b\n",
    "Write a short poem about the sea.",
)


@dataclass
class RequestClassifier:
    """P(transformer serves better) and the expected gap from request text alone."""

    classifier: lightgbm.Booster
    calibration: tuple[float, float]
    regressor: lightgbm.Booster | None = None
    meta: dict = field(default_factory=dict)
    text: HashedTextModel | None = None
    path: Path | None = None  # the directory it was loaded from
    sha256: str | None = None  # of its files (see :func:`digest`): which artifact this is
    file_digests: dict[str, str] = field(default_factory=dict)  # name -> sha256 of each file

    def identity(self) -> dict:
        """What identifies this artifact to a client or operator: its folder's name, sha256
        and created_utc (no server path)."""
        return {"name": None if self.path is None else self.path.name, "sha256": self.sha256,
                "created_utc": self.meta.get("created_utc")}

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.meta.get("feature_names", FEATURE_NAMES))

    @property
    def thresholds(self) -> dict[str, float]:
        """The profiles' thresholds chosen on validation data ({} for older artifacts)."""
        return {k: float(v) for k, v in self.meta.get("thresholds", {}).items()}

    @property
    def probe_names(self) -> tuple[str, ...]:
        """The prompt-probe features the model reads (:data:`PROBE_FEATURES`; empty for a
        prompt-only artifact), from :attr:`RoutingRequest.probe`."""
        return tuple(n for n in self.feature_names if n in PROBE_FEATURES)

    @property
    def needs_probe(self) -> bool:
        """True when the model was trained with probe features (``archroute train --probe``)."""
        return bool(self.probe_names)

    @property
    def _columns(self) -> tuple[bool, np.ndarray, np.ndarray]:
        """(task-only, indices of the model's request features, order): the indices are
        among :data:`TASK_NAMES` when the model uses only the task group (then only that
        group is computed), else among :data:`FEATURE_NAMES`; ``order`` puts the request
        features and then the probe features (:attr:`probe_names`) back into the model's
        own order, by name. ``text_logit`` is appended after them."""
        cols = getattr(self, "_cols", None)
        if cols is None:
            used = [n for n in self.feature_names if n != TEXT_FEATURE]
            request = [n for n in used if n not in PROBE_FEATURES]
            task_only = set(request) <= set(TASK_NAMES)
            names = TASK_NAMES if task_only else FEATURE_NAMES
            index = {n: i for i, n in enumerate(names)}
            joined = {n: i for i, n in enumerate([*request, *self.probe_names])}
            cols = (task_only, np.array([index[n] for n in request], int),
                    np.array([joined[n] for n in used], int))
            self._cols = cols
        return cols

    def _base(self, request: RoutingRequest) -> np.ndarray:
        task_only, cols, order = self._columns
        row = (extract_task(request) if task_only else extract(request))[cols]
        probe = self.probe_names
        if not probe:
            return row
        got = request.probe or {}
        values = np.array([float(got.get(n, np.nan)) for n in probe], dtype=row.dtype)
        return np.concatenate((row, values))[order]

    def features(self, requests: list[RoutingRequest]) -> np.ndarray:
        """The model's input matrix: the request features it uses, then ``text_logit`` when
        the artifact has a text model."""
        X = np.stack([self._base(r) for r in requests])
        if self.text is not None:
            X = np.column_stack((X, self.text.logits(requests)))
        return X

    def named_features(self, request: RoutingRequest) -> tuple[np.ndarray, dict[str, float]]:
        """(model input row, the model's features by name): what the decision log records."""
        row = self.features([request])
        return row, {n: float(v) for n, v in zip(self.feature_names, row[0], strict=True)}

    def proba_from_features(self, X: np.ndarray) -> np.ndarray:
        """P(transformer better), shape (n,), from a feature matrix (n, n_features)."""
        a, b = self.calibration
        raw = np.asarray(self.classifier.predict(X, raw_score=True, num_threads=1))  # dense X
        return 1.0 / (1.0 + np.exp(-np.clip(a * raw + b, -50, 50)))

    def contributions(self, X: np.ndarray) -> dict[str, float]:
        """Each feature's exact share of the first row's score (LightGBM ``pred_contrib``),
        on the calibrated logit's scale: positive pushes towards the transformer. The model's
        starting point (its mean score over the training data) is ``base``."""
        a, b = self.calibration
        c = np.asarray(self.classifier.predict(X[:1], pred_contrib=True, num_threads=1))[0]
        out = {n: float(a * v) for n, v in zip(self.feature_names, c[:-1], strict=True)}
        out["base"] = float(a * c[-1] + b)
        return out

    def gap_from_features(self, X: np.ndarray) -> np.ndarray:
        """Expected gap (nats/token, positive = hybrid better), shape (n,)."""
        if self.regressor is None:
            raise ArtifactError("this artifact has no gap regressor")
        return np.asarray(self.regressor.predict(X, num_threads=1))  # dense X: an ndarray

    @property
    def center(self) -> float:
        """The gap the classifier's classes were split at (0 unless trained centred)."""
        return float(self.meta.get("center", 0.0))

    def p_transformer_from_features(self, X: np.ndarray) -> np.ndarray:
        """P(transformer better), i.e. P(gap < 0), shape (n,).

        Trained at center 0 this is the calibrated classifier. Trained centred (labels too
        one-sided for a sign classifier, ``archroute train --center median``), the classifier
        only ranks requests, so the probability comes from the gap regressor instead:
        Phi(-gap / sigma), sigma the labels' spread (``label_summary.gap_std``), which keeps
        the ranking and tells the router the truth about who wins.
        """
        if self.center == 0.0 or self.regressor is None:
            return self.proba_from_features(X)
        from math import erf, sqrt

        sigma = float(self.meta.get("label_summary", {}).get("gap_std") or 0.2)
        z = -self.gap_from_features(X) / (sigma * sqrt(2.0))
        return np.asarray([0.5 * (1.0 + erf(v)) for v in z])

    def predict_proba(self, requests: list[RoutingRequest]) -> np.ndarray:
        """P(the transformer serves the request better), shape (len(requests),)."""
        if not requests:
            return np.zeros(0)
        return self.p_transformer_from_features(self.features(list(requests)))

    def predict_gap(self, requests: list[RoutingRequest]) -> np.ndarray:
        """Expected gap loss_transformer - loss_hybrid (nats/token), shape (len(requests),)."""
        if not requests:
            return np.zeros(0)
        return self.gap_from_features(self.features(list(requests)))


def versions() -> dict[str, str]:
    import lightgbm
    import sklearn

    return {"python": platform.python_version(), "numpy": np.__version__,
            "lightgbm": lightgbm.__version__, "scikit-learn": sklearn.__version__}


def save(path: str | Path, router, regressor=None, meta: dict | None = None,
         text: HashedTextModel | None = None,
         calibration: tuple[float, float] | None = None,
         feature_names: Sequence[str] | None = None) -> Path:
    """Write a fitted :class:`~classifiers.training.estimators.LightGBMRouter` (and optionally a
    :class:`~classifiers.training.estimators.LightGBMGapRegressor` and a text model, whose logit is
    then the last feature) with ``meta`` to ``path``. ``calibration`` overrides the router's
    own Platt scaling (e.g. one fitted on out-of-source scores). ``feature_names`` is the
    subset of :data:`FEATURE_NAMES` and :data:`~classifiers.probe.PROBE_FEATURES` the model
    was fitted on, in order (default: all request features); an artifact with probe
    features reads them from :attr:`RoutingRequest.probe` (NaN when absent: the self-check's
    prompts have none).

    Atomic (:func:`classifiers.integrity.write_atomically`): the files and their manifest
    are written to a temporary sibling folder, fsynced and renamed into place, so a reload
    during training sees the old artifact or the new one, never a half-written one."""
    used = list(feature_names if feature_names is not None else FEATURE_NAMES)
    unknown = set(used) - set(FEATURE_NAMES) - set(PROBE_FEATURES)
    if unknown:
        raise ArtifactError(f"unknown features {sorted(unknown)}")
    shared = regressor is not None and regressor.booster_ is router.booster_  # stored once
    calibration = tuple(calibration if calibration is not None else router.calibration_)
    names = [*used, TEXT_FEATURE] if text is not None else used
    clf = RequestClassifier(router.booster_, calibration,
                            regressor.booster_ if regressor is not None else None,
                            {**(meta or {}), "feature_names": names}, text)
    reqs = [RoutingRequest.from_prompt(p) for p in SELF_CHECK_PROMPTS]
    X = clf.features(reqs)
    check = [{"prompt": p, "p_transformer": float(pt)}
             for p, pt in zip(SELF_CHECK_PROMPTS, clf.p_transformer_from_features(X), strict=True)]
    if regressor is not None:
        for row, g in zip(check, clf.gap_from_features(X), strict=True):
            row["gap"] = float(g)
    full = {"format_version": FORMAT_VERSION, "feature_names": names,
            "calibration": list(calibration), "versions": versions(),
            "regressor_is_classifier": shared,
            **(meta or {}), "self_check": check}

    def write(tmp: Path) -> list[str]:
        (tmp / "classifier.txt").write_text(router.booster_.model_to_string())
        if regressor is not None and not shared:
            (tmp / "regressor.txt").write_text(regressor.booster_.model_to_string())
        if text is not None:
            text.save(tmp / "text_weights.npy")
        (tmp / "meta.json").write_text(json.dumps(full, indent=2) + "\n")
        return [n for n in MODEL_FILES if (tmp / n).exists()]

    return write_atomically(path, write, ARTIFACT_FILES)


ARTIFACT_FILES = ("meta.json", "classifier.txt", "regressor.txt", "text_weights.npy")
MODEL_FILES = ARTIFACT_FILES[1:]  # read by native parsers: sizes and sha256 in the manifest
STRICT_DRIFT = 1e-4  # a strict load refuses an artifact whose self-check moved more


def _digest(blobs: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in ARTIFACT_FILES:
        if name in blobs:
            h.update(name.encode() + b"\0" + blobs[name] + b"\0")
    return h.hexdigest()


def digest(path: str | Path) -> str:
    """sha256 over an artifact directory's files (names and bytes, in a fixed order; the
    manifest is not among them, so signing an artifact does not change it)."""
    return _digest({n: (Path(path) / n).read_bytes() for n in ARTIFACT_FILES
                    if (Path(path) / n).is_file()})


class _Named(io.BytesIO):
    """Bytes read from a file, shown as the file's name in parsers' messages."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.shown = name

    def __str__(self) -> str:
        return self.shown

    def __format__(self, spec: str) -> str:
        return self.shown


def load(path: str | Path, verify: bool = True, strict: bool = False,
         isolate: bool = True) -> RequestClassifier:
    """Load an artifact directory; raises :class:`ArtifactError` when it does not fit this
    build's features. ``verify`` replays the self-check (which also warms the feature
    tables and parsers) and logs a warning when predictions moved since training; with
    ``strict`` (a live reload) a self-check that moved by more than :data:`STRICT_DRIFT`, or
    gives non-finite predictions, or is missing, is an :class:`ArtifactError` instead.

    Every file is read once; the model files' bytes are checked against ``manifest.json``
    before LightGBM or numpy parses them, and then those same bytes are parsed. An artifact
    without a manifest is first loaded and self-checked in a child process (``isolate``; see
    :mod:`classifiers.integrity`), so a native abort on a corrupt file kills the child, not
    this process."""
    import lightgbm as lgb

    path = Path(path)
    where = shown(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file() or not (path / "classifier.txt").is_file():
        raise ArtifactError(f"no classifier artifact at {where} (run `archroute train`)")
    try:
        blobs = {n: (path / n).read_bytes() for n in ARTIFACT_FILES if (path / n).is_file()}
    except OSError as exc:
        raise ArtifactError(f"{where}: cannot read it ({type(exc).__name__})") from None
    try:
        meta = json.loads(blobs["meta.json"])
    except ValueError as exc:
        raise ArtifactError(f"{where}/meta.json: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{where}/meta.json: not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where}: format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    names = list(meta.get("feature_names", ()))
    has_text = bool(names) and names[-1] == TEXT_FEATURE
    if (not names or has_text != ("text_weights.npy" in blobs)
            or not set(names[:-1] if has_text else names) <= {*FEATURE_NAMES, *PROBE_FEATURES}):
        raise ArtifactError(f"{where} was trained on different features than this build "
                            "computes; rebuild it with `archroute train`")
    manifest = read_manifest(path)
    if manifest is not None:
        check_manifest(path, manifest, blobs, MODEL_FILES)  # before any parser sees a byte
    elif isolate:
        log.warning("%s has no manifest: loading it in a child process first", where)
        check_in_child(path, blobs, strict)
    try:
        clf = lgb.Booster(model_str=blobs["classifier.txt"].decode())
    except (lgb.basic.LightGBMError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where}/classifier.txt: not a LightGBM model: {exc}") from None
    if clf.num_feature() != len(names):
        raise ArtifactError(f"{where}: the model takes {clf.num_feature()} features but meta.json "
                            f"names {len(names)}: trained on different features than this build "
                            "computes; rebuild it with `archroute train`")
    try:
        reg = (clf if meta.get("regressor_is_classifier")
               else lgb.Booster(model_str=blobs["regressor.txt"].decode())
               if "regressor.txt" in blobs else None)
    except (lgb.basic.LightGBMError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where}/regressor.txt: not a LightGBM model: {exc}") from None
    try:
        text = (HashedTextModel.load(_Named(blobs["text_weights.npy"],
                                            f"{where}/text_weights.npy"))
                if has_text else None)
    except (ValueError, EOFError) as exc:
        raise ArtifactError(str(exc)) from None
    try:
        a, b = meta["calibration"]
        calibration = (float(a), float(b))
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"{where}/meta.json: no valid 'calibration'") from None
    out = RequestClassifier(clf, calibration, reg, meta, text, path=path, sha256=_digest(blobs),
                            file_digests={n: sha256(d) for n, d in blobs.items()})
    if strict and not meta.get("self_check"):
        raise ArtifactError(f"{where}: no self-check in meta.json; cannot verify it")
    if verify and meta.get("self_check"):
        try:
            reqs = [RoutingRequest.from_prompt(c["prompt"]) for c in meta["self_check"]]
            p = out.predict_proba(reqs)
            drift = float(np.max(np.abs(p - [c["p_transformer"] for c in meta["self_check"]])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: the self-check failed: {type(exc).__name__}: "
                                f"{exc}") from None
        if strict and not (np.isfinite(p).all() and drift <= STRICT_DRIFT):
            raise ArtifactError(f"{where}: the self-check failed: predictions differ from "
                                f"those recorded at training by up to {drift:.3g} (more than "
                                f"{STRICT_DRIFT:g}; versions then {meta.get('versions')}, now "
                                f"{versions()})")
        if drift > 1e-6:
            log.warning("%s: predictions differ from training by up to %.3g (versions: %s "
                        "now %s)", where, drift, meta.get("versions"), versions())
    return out


def sign(path: str | Path) -> dict:
    """Give an artifact made before manifests its ``manifest.json``, once it has loaded and
    passed its self-check in a child process (a file that crashes the parser is never
    signed). Returns the manifest."""
    from classifiers.integrity import MANIFEST, write_manifest

    path = Path(path)
    (path / MANIFEST).unlink(missing_ok=True)
    load(path, verify=True, strict=True, isolate=True)
    return write_manifest(path, [n for n in MODEL_FILES if (path / n).is_file()])


def load_default() -> RequestClassifier:
    """The shipped classifier (``classifiers/default/``)."""
    return load(DEFAULT_DIR)


def _child(argv: list[str]) -> int:
    """``python -m classifiers.artifact DIR [--strict]``: load DIR unisolated and print
    one result line (:func:`classifiers.integrity.check_in_child` runs it)."""
    from classifiers import artifact  # this module runs as __main__: the imported one's classes
    from classifiers.integrity import _MARK

    folder = Path(argv[0])
    try:
        clf = artifact.load(folder, verify=True, strict="--strict" in argv[1:], isolate=False)
        result: dict = {"files": clf.file_digests}
    except artifact.ArtifactError as exc:  # this module runs as __main__: the imported class
        result = {"error": str(exc)}
    sys.stdout.write("\n" + _MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
