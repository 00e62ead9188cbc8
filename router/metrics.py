"""Prometheus metrics of one router app (its own registry, so apps in tests don't clash)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from router.decision_log import DecisionLog

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class RouterMetrics:
    """Requests, decisions per backend, fallbacks, latency and routing overhead (seconds)."""

    def __init__(self, decision_log: DecisionLog | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if decision_log is not None:
            r.register(_DecisionLogCollector(decision_log))
        self.requests = Counter("archroute_requests", "requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.decisions = Counter("archroute_decisions", "routing decisions by chosen backend role",
                                 ["policy", "backend"], registry=r)
        self.probe_fallbacks = Counter("archroute_probe_fallbacks", "requests a probe profile "
                                       "scored without the prompt probe, by profile and why "
                                       "(timeout, error, refused, mismatch)",
                                       ["profile", "reason"], registry=r)
        self.probe_latency = Histogram("archroute_probe_seconds", "the prompt probe's time "
                                       "per request (both backends' prefill, concurrently)",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.explored = Counter("archroute_explored", "requests exploration sent to the "
                                "backend the policy did not pick, by profile and backend role",
                                ["profile", "backend"], registry=r)
        self.conversation_turns = Counter(
            "archroute_conversation_turns", "follow-up turns of a conversation by profile and "
            "outcome: same (the policy picked the earlier turn's backend), kept (the handoff "
            "cost kept it there), switched (the predicted gain beat the handoff cost)",
            ["profile", "outcome"], registry=r)
        self.served = Counter("archroute_served", "requests served, by backend name",
                              ["backend"], registry=r)
        self.fallbacks = Counter("archroute_fallbacks", "requests served by the other backend",
                                 ["from_backend", "to_backend"], registry=r)
        self.backend_failures = Counter("archroute_backend_failures", "failed backend calls",
                                        ["backend"], registry=r)
        self.latency = Histogram("archroute_request_latency_seconds",
                                 "time from request to last byte", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("archroute_overhead_seconds",
                                  "router time outside the backend (parse, score, format)",
                                  buckets=_OVERHEAD_BUCKETS, registry=r)
        self.breaker_open = Gauge("archroute_breaker_open", "1 while a backend is cooling down",
                                  ["backend"], registry=r)
        self.in_flight = Gauge("archroute_backend_in_flight", "calls running per backend",
                               ["backend"], registry=r)

    def watch(self, collector: Collector) -> None:
        """Add metrics read when scraped (the learning loop's, router/learning/auto.py)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DecisionLogCollector(Collector):
    """The decision log's writer, read when scraped: rows buffered while the database is
    unreachable, and rows lost (beyond the buffer's bound, or unwritten at shutdown)."""

    def __init__(self, dlog: DecisionLog) -> None:
        self.dlog = dlog

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("archroute_decision_log_buffered_rows",
                                "decision rows waiting for the database to come back",
                                value=self.dlog.buffered)
        yield CounterMetricFamily("archroute_decision_log_dropped_rows",
                                  "decision rows never written (the buffer was full, or the "
                                  "database was unreachable at shutdown)",
                                  value=self.dlog.dropped)
