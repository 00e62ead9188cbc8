"""The learning loop's home in the router layer: what the router learns from its own traffic.

- :mod:`router.learning.logrows`: decision-log rows as the policy saw them
- :mod:`router.learning.retrain`: ``archroute train --from-log``, a refit on labelled traffic

Serving-side parts that feed it: exploration (profiles' ``epsilon``, router/serving.py),
``POST /v1/feedback`` and labels from references (router/feedback.py), the decision log
(router/decision_log.py), live reloads (router/reload.py). Off-policy evaluation from the log
is evals/from_log.py and evals/ope.py (``archroute eval --from-log``).
"""
