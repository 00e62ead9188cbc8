"""The learning loop's home in the router layer: what the router learns from its own traffic.

- :mod:`router.learning.exploration`: profiles' ``epsilon``, the propensity of each decision
- :mod:`router.learning.feedback`: ``POST /v1/feedback`` (rewards, thumbs, references), its
  rate limit and its queue
- :mod:`router.learning.references`: labels from references, scored on the pair as
  ``archroute label`` does (one label-request type, :class:`classifiers.training.labels.LabelRequest`)
- :mod:`router.learning.logrows`: decision-log rows as the policy saw them
- :mod:`router.learning.retrain`: ``archroute train --from-log``, a refit on labelled traffic
- :mod:`router.learning.guard`, :mod:`router.learning.gate`,
  :mod:`router.learning.candidate`, :mod:`router.learning.loop`: learning safely with few
  labels (the guard, the reload gate, warm-started candidates, the loop with rollback)
- :mod:`router.learning.auto`: the loop run by the router itself (a profile's ``learning:``),
  one trainer at a time across replicas; :mod:`router.learning.history`: ``archroute
  learning history``

Parts it uses that live with what they serve: the decision log (router/decision_log), live
reloads (router/reload.py). Off-policy evaluation from the log is evals/from_log.py and
evals/ope.py (``archroute eval --from-log``): an evaluation, so in the evals layer.
"""
