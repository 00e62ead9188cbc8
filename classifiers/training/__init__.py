"""Training the request classifier: labels measured on a backend pair (``archroute label``),
the request sets they are measured on (the synthetic mix, real request files), the estimators,
the fit and its out-of-source evaluation (``archroute train``), held-out metrics, risk
thresholds and ceilings. The router never imports this at serve time, except the label
request type and its scoring (labels from references, :mod:`router.learning.references`).

What the router loads at serve time is :mod:`classifiers` itself: the artifact, features,
the request, categories, lexicon, structure, text representation, integrity, explanations.
"""
