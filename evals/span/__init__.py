"""Span routing, teacher-forced: per-token scores of both backends on (prompt, reference)
pairs (:mod:`evals.span.score`), causal gates run along them (:mod:`evals.span.evaluate`),
the learned gate's training (:mod:`evals.span.train`), reports and ``archroute span-eval``."""
