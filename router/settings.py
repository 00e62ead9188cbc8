"""The router's one settings object: defaults, then a YAML/TOML file, then ``ARCHROUTE_*``
environment variables, then command-line flags; unknown keys are rejected.

Environment variables name a field path with ``__`` between levels, e.g.
``ARCHROUTE_PORT=9000``, ``ARCHROUTE_BACKENDS__TRANSFORMER__BASE_URL=http://gpu:8001/v1``;
list fields take comma-separated values (``ARCHROUTE_API_KEYS=k1,k2``). Values are parsed
as YAML scalars (``true``, ``3``, ``0.5``).

With no config at all the router serves the embedded reference pair (``reference:transformer``
and ``reference:hybrid``) in-process. Secrets are ``SecretStr`` and print as ``**********``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.registry import DEFAULT_MAX_RESPONSE_BYTES, REFERENCE_SPECS, parse_spec
from models.span.decoder import (
    DEFAULT_DRAFT_MIN_MATCH,
    DEFAULT_GATE,
    check_draft,
    default_gate_name,
)
from models.span.gates import GATES, get_gate, known_gate
from router.learning.guard import MIN_ROWS as GUARD_MIN_ROWS
from router.policies import EVAL_ONLY, list_policies

log = logging.getLogger(__name__)

Role = Literal["transformer", "hybrid"]
# a profile kind, not a scoring policy: its requests are span-decoded (router/span.py), a gate
# choosing the model per token; ``policy_args: {gate: NAME, draft_k: K, draft_min_match: M}``
# (gate default copy-2; drafted copy spans, models/span/decoder.py: up to K tokens drafted from
# an induction match of M or more tokens and verified in one transformer forward, 0 = off)
SPAN_POLICY = "span"
SPAN_ARGS = frozenset({"gate", "draft_k", "draft_min_match"})
# the measured defaults (docs/span.md, "Drafted copy spans": `archroute bench span`)
DEFAULT_DRAFT_K = 8
# `model: "archroute"` when `default_profile` is unset: this span profile where the pair can
# span-decode (router/serving.py), else the request classifier's profile
DEFAULT_SPAN_PROFILE = "archroute-span"
# its gate over two engines (both backends kind upstream), where the completions API returns
# no entropy for the in-process learned gate: the learned gate trained on the top-5 entropy
# proxy the engines do return (models/span/topk_gate; docs/span.md)
ENGINE_GATE = "learned-topk"
DEFAULT_REQUEST_PROFILE = "archroute-auto"


class SettingsError(ValueError):
    """The configuration is invalid; the message says which field and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackendSettings(_Strict):
    """One backend. ``kind``: ``hf`` (a local model dir, or ``reference:transformer`` /
    ``reference:hybrid``), ``upstream`` (an OpenAI-compatible server) or ``fake`` (tests)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    kind: str = "hf"  # a kind registered in models/registry.py (KINDS)
    # hf
    path: str | None = None
    device: str = "cpu"
    # upstream
    base_url: str | None = None
    model: str | None = None
    api_key: SecretStr | None = None
    # upstream: a local tokenizer directory of the engine's model; span profiles over two
    # upstreams need it (router/span.py: the engines are sent token ids)
    tokenizer: str | None = None
    # upstream: a response body (or stream) larger than this is refused (502); 64 MiB
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024)
    # all kinds
    timeout_s: float = Field(60.0, gt=0)  # whole call, and each gap between streamed chunks
    # tool calling: None: the kind's own (upstream: passes tools on; hf: cannot); false: an
    # upstream that takes no tools (vLLM without --enable-auto-tool-choice), so the router
    # drops a request's tools for it (`tools: auto`) or refuses them (`tools: error`)
    call_tools: bool | None = None
    max_concurrency: int | None = Field(None, ge=1)  # in flight at once; None: hf 1, else 64
    max_queue: int = Field(8, ge=0)  # requests waiting beyond that; more get 429
    queue_timeout_s: float = Field(30.0, gt=0)  # longest wait for a slot; then 503
    # fake: scripted reply and delay (tests, benchmarks)
    fake_reply: str = "Hello from the fake backend."
    fake_delay_s: float = Field(0.0, ge=0)
    # fake: tool calls it answers with when a request sends tools and its last turn is not a
    # tool result (each {"name", "arguments"} or OpenAI's whole call); set: it calls tools
    fake_tool_calls: list[dict[str, Any]] | None = None
    # `serve --ray` (router/rayserve/): an in-process backend is a Ray Serve deployment of
    # `replicas` replicas, each reserving num_cpus (fractional) and num_gpus of the cluster;
    # max_replicas above replicas: Ray Serve autoscales between the two (ray.autoscaling)
    replicas: int = Field(1, ge=1)
    max_replicas: int | None = Field(None, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    num_gpus: float = Field(0.0, ge=0)

    @property
    def concurrency(self) -> int:
        if self.max_concurrency is not None:
            return self.max_concurrency
        return 1 if self.kind == "hf" else 64

    @model_validator(mode="after")
    def _kind_fields(self) -> BackendSettings:
        from models.registry import KINDS

        if self.kind not in KINDS:
            raise ValueError(f"backend {self.name!r}: unknown kind {self.kind!r}; known: "
                             f"{', '.join(KINDS)}")
        if self.kind == "hf" and not self.path:
            raise ValueError(f"backend {self.name!r}: kind 'hf' needs 'path'")
        if self.kind == "upstream" and not (self.base_url and self.model):
            raise ValueError(f"backend {self.name!r}: kind 'upstream' needs 'base_url' and 'model'")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"backend {self.name!r}: max_replicas ({self.max_replicas}) is "
                             f"below replicas ({self.replicas})")
        if self.call_tools and self.kind == "hf":
            raise ValueError(f"backend {self.name!r}: call_tools: kind 'hf' cannot call tools "
                             "(in-process models get no tool definitions)")
        return self


# a profile's `learning:` block turns on exploration at this epsilon unless it sets its own
LEARNING_EPSILON = 0.1


class LearningSettings(_Strict):
    """A profile's continuous learning (router/learning/auto.py, docs/learning-loop.md "The
    loop runs itself"): every ``retrain_every`` new labels (scored references) a candidate is
    fitted from the decision log, gated, reloaded when it passes, rolled back later if it
    does worse."""

    enabled: bool = True  # a `learning:` block turns it on; false keeps the block, off
    retrain_every: int = Field(200, ge=1)  # new scored references between retrains
    # labelled requests (not held back for the gate) needed before the first candidate; a
    # guard needs GUARD_MIN_ROWS
    min_labels: int = Field(40, ge=GUARD_MIN_ROWS)
    refit: Literal["warm", "scratch", "base"] = "warm"  # router/learning/candidate.py
    # where candidates are written: inside artifact_roots (an admin may reload one by hand)
    workdir: str = "runs/learning"
    poll_s: float = Field(5.0, gt=0)  # how often the decision log's label count is read


# nats/token of predicted gain a switch must beat per 1,000 conversation tokens the other
# backend reads again (its prefix cache lost); measured: `archroute bench handoff`
# (docs/router.md, "Conversations")
DEFAULT_HANDOFF_COST = 0.003


class ConversationSettings(_Strict):
    """A profile's follow-up turns (router/conversations.py): with ``sticky``, a turn that
    follows one this router answered stays on that turn's backend unless the policy's
    predicted gain for switching (nats/token) is at least ``handoff_cost`` times the
    thousands of tokens the other backend would read again; 0 follows the policy."""

    sticky: bool = True
    handoff_cost: float = Field(DEFAULT_HANDOFF_COST, ge=0.0, allow_inf_nan=False)


def check_probe_artifact(path: object) -> None:
    """A probe profile's artifact (``policy_args.artifact``) must exist and name the prompt
    probe's features (``archroute train --probe``); read from its meta.json alone, so a
    mistake stops the router at start in one line (the policy loads the artifact itself)."""
    import json

    from classifiers.probe import PROBE_FEATURES

    how = "train one with `archroute train --probe --labels FILE --out DIR` (docs/router.md)"
    if not isinstance(path, str) or not path:
        raise ValueError(f"policy probe needs policy_args.artifact, an artifact with the "
                         f"prompt probe's features: {how}")
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"policy probe: no readable artifact at {path} "
                         f"({type(exc).__name__}): {how}") from None
    names = meta.get("feature_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not set(names) & set(PROBE_FEATURES):
        raise ValueError(f"policy probe: the artifact at {path} was trained without the "
                         f"prompt probe's features: {how}")


class ProfileSettings(_Strict):
    """A routing profile, addressed by the request's ``model`` field."""

    policy: str = "rules"
    policy_args: dict[str, Any] = Field(default_factory=dict)
    # transformer when score >= threshold; None: the policy's own (a classifier profile: the
    # artifact's threshold for its operating point, chosen on validation data), else 0.5
    threshold: float | None = Field(None, ge=0.0, le=1.01)
    # exploration: this share of the profile's requests goes to the backend the policy did
    # not pick, at random, so an offline evaluation can see both (docs/learning-loop.md); the
    # decision log records each decision's propensity (1 - epsilon, or epsilon if explored)
    epsilon: float = Field(0.0, ge=0.0, le=0.5)
    # continuous learning (classifier and guarded profiles): None or enabled: false is off;
    # on, epsilon defaults to LEARNING_EPSILON
    learning: LearningSettings | None = None
    # follow-up turns stay on the backend that served the turn before (scoring profiles)
    conversation: ConversationSettings = Field(default_factory=ConversationSettings)
    description: str = ""

    @property
    def learns(self) -> bool:
        return self.learning is not None and self.learning.enabled

    @model_validator(mode="before")
    @classmethod
    def _learning_explores(cls, data: Any) -> Any:
        if (isinstance(data, dict) and isinstance(data.get("learning"), dict)
                and data["learning"].get("enabled", True) and "epsilon" not in data
                and data.get("policy", "rules") in ("classifier", "guarded")):
            data = {**data, "epsilon": LEARNING_EPSILON}
        return data

    @property
    def span_gate(self) -> str | None:
        """The gate of a span profile (None for a scoring policy)."""
        if self.policy != SPAN_POLICY:
            return None
        return str(self.policy_args.get("gate", DEFAULT_GATE))

    @property
    def span_draft(self) -> tuple[int, int]:
        """A span profile's drafted copy spans: (draft_k, draft_min_match); (0, _) = off."""
        if self.policy != SPAN_POLICY:
            return (0, DEFAULT_DRAFT_MIN_MATCH)
        return (self.policy_args.get("draft_k", DEFAULT_DRAFT_K),
                self.policy_args.get("draft_min_match", DEFAULT_DRAFT_MIN_MATCH))

    @model_validator(mode="after")
    def _known_policy(self) -> ProfileSettings:
        if self.learns and self.policy not in ("classifier", "guarded"):
            raise ValueError(f"learning: only classifier and guarded profiles learn (a "
                             f"trained artifact), not policy {self.policy!r}")
        if self.learns and "artifact" in self.policy_args:
            raise ValueError("learning: a profile that names its own artifact "
                             "(policy_args.artifact) is not replaced by reloads; learning "
                             "profiles use the reloadable one")
        if self.policy == "probe":
            check_probe_artifact(self.policy_args.get("artifact"))
        if self.policy == SPAN_POLICY:
            extra = sorted(set(self.policy_args) - SPAN_ARGS)
            if extra:
                raise ValueError(f"span profile: unknown policy_args {extra}; known: "
                                 f"{sorted(SPAN_ARGS)}")
            try:
                check_draft(*self.span_draft)
            except ValueError as exc:
                raise ValueError(f"span profile: policy_args.{exc}") from None
            gate = self.policy_args.get("gate", DEFAULT_GATE)
            if not isinstance(gate, str) or not (known_gate(gate) or gate.startswith("learned:")):
                import difflib

                close = difflib.get_close_matches(str(gate), list(GATES), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"span profile: unknown gate {gate!r}{hint}; known: "
                                 f"{', '.join(GATES)} (and learned:PATH; a gate followed by "
                                 "+copy-K, +copy-K-prompt-P or +mix-M[-prompt-P][-repeat-K][-tilt-B][-lock-L])")
            if self.threshold is not None:
                raise ValueError("span profile: 'threshold' does not apply (the gate decides "
                                 "per token)")
            if self.epsilon:
                raise ValueError("span profile: 'epsilon' does not apply (span decoding uses "
                                 "both models; there is no other backend to explore)")
            if "conversation" in self.model_fields_set:
                raise ValueError("span profile: 'conversation' does not apply (span decoding "
                                 "uses both models in every turn)")
            return self
        if self.policy not in list_policies():
            import difflib

            close = difflib.get_close_matches(self.policy, list_policies(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown policy {self.policy!r}{hint}; known: "
                             f"{[*list_policies(), SPAN_POLICY]}")
        if self.policy in EVAL_ONLY:
            raise ValueError(f"policy {self.policy!r} is for evals only (it needs measured gaps)")
        return self


def _default_backends() -> dict[Role, BackendSettings]:
    return {
        role: BackendSettings(**parse_spec(REFERENCE_SPECS[role], role))
        for role in ("transformer", "hybrid")
    }


@functools.cache
def default_engine_gate_name() -> str:
    """The built-in span profile's gate over two engines: :data:`ENGINE_GATE` where it
    loads, else :data:`DEFAULT_GATE` (a gate over tokens; checked once per process)."""
    try:
        get_gate(ENGINE_GATE)
        return ENGINE_GATE
    except Exception as exc:  # noqa: BLE001 - any failure: the rule gate, said in the log
        log.warning("span: the gate %s for engines does not load (%s: %s); using %s",
                    ENGINE_GATE, type(exc).__name__, exc, DEFAULT_GATE)
    return DEFAULT_GATE


def _default_profiles() -> dict[str, ProfileSettings]:
    return {
        "archroute-span": ProfileSettings(
            policy=SPAN_POLICY, policy_args={"gate": default_gate_name(),
                                             "draft_k": DEFAULT_DRAFT_K,
                                             "draft_min_match": DEFAULT_DRAFT_MIN_MATCH},
            description="pick for quality: span routing, a gate picks the model per token "
                        "(both backends in-process with one tokenizer; or two engines that "
                        "take token-id prompts, with their tokenizer set, gate learned-topk); "
                        "copy spans drafted and verified in one transformer forward "
                        "(draft_k, in-process). What `archroute` means where the pair can span"),
        "archroute-auto": ProfileSettings(
            policy="classifier", policy_args={"operating_point": "quality"},
            description="pick for whole-request routing (engines that cannot span, one "
                        "backend per answer): the request classifier at its quality "
                        "threshold; learns from the decision log"),
        "archroute-cost": ProfileSettings(
            policy="classifier", policy_args={"operating_point": "cost"},
            description="pick for cost: the classifier's best quality with at most the "
                        "artifact's budget of requests on the transformer (the backend with a "
                        "KV cache)"),
        "archroute-rules": ProfileSettings(
            policy="rules", description="a baseline without a trained model: the study's "
                                        "rules (copy and code cues to the transformer)"),
    }


# old profile names that still work: served as the profile they became, with an
# x-archroute-deprecated header (router/serving.py); a configured profile of that name wins
DEPRECATED_PROFILES: dict[str, str] = {
    "archroute-quality": DEFAULT_REQUEST_PROFILE,  # was the same as archroute-auto
}


class ModelServerSettings(_Strict):
    """``archroute serve-model`` (one backend as a server, :mod:`router.model_server`): its
    own section, ``model_server``, read in the same order as the rest (defaults, the file's
    ``model_server:``, ``ARCHROUTE_MODEL_SERVER__*``, flags). The connection limits
    (``header_timeout_s`` ...) and ``torch_threads`` are the top level's, shared with the
    router. One model, no fallback: it has no circuit breaker."""

    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)
    api_keys: list[SecretStr] = Field(default_factory=list)  # empty: no auth
    max_concurrency: int | None = Field(None, ge=1)  # run at once; None: the backend's own
    max_queue: int = Field(64, ge=0)  # requests waiting beyond that; more get 429
    # a request's longest wait in the queue, then its longest call (whole, or between
    # streamed chunks)
    timeout_s: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(4_000_000, ge=1024)  # larger request bodies get 413
    max_tokens_cap: int = Field(4096, ge=1)  # requested max_tokens above this are clamped
    # an in-process model keeps the caches of its last this-many requests and resumes one
    # when a prompt starts with what it read (span decoding over engines sends the whole
    # sequence at every span; models/prefix_cache.py); 0: off
    prefix_cache: int = Field(4, ge=0, le=64)


class RaySettings(_Strict):
    """``archroute serve --ray`` (:mod:`router.rayserve`): the cluster and what the router's
    own deployments reserve. Replica counts and resources of the models are the backends'
    (``replicas``, ``max_replicas``, ``num_cpus``, ``num_gpus``)."""

    # a running cluster (HOST:PORT or ray://HOST:PORT); None: $RAY_ADDRESS, else a local
    # cluster is started (and stopped on exit)
    address: str | None = None
    num_cpus: float | None = Field(None, gt=0)  # the local cluster's CPUs; None: this machine's
    router_num_cpus: float = Field(0.25, gt=0)  # each router replica's reservation
    # the span pair's deployment (both models per replica, their resources added); None: as
    # many replicas as the transformer's
    span_replicas: int | None = Field(None, ge=1)
    # Ray Serve's AutoscalingConfig fields (target_ongoing_requests, upscale_delay_s, ...) for
    # backends with max_replicas; checked by Ray Serve at start
    autoscaling: dict[str, Any] = Field(default_factory=dict)


class Settings(_Strict):
    """Everything the router reads. Defaults, commented, in one place."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    backends: dict[Role, BackendSettings] = Field(default_factory=_default_backends)
    profiles: dict[str, ProfileSettings] = Field(default_factory=_default_profiles)
    # what `model: "archroute"` means; None: "archroute-span" where the pair can span-decode
    # (one tokenizer, in-process or engines with their tokenizer set), else "archroute-auto"
    # (router/serving.py resolves it at start; /v1/models and each decision say which)
    default_profile: str | None = None
    fallback: bool = True  # serve from the other backend if the chosen one fails first
    failure_threshold: int = Field(3, ge=1)  # consecutive failures that open the breaker
    cooldown_s: float = Field(30.0, gt=0)  # breaker open this long, then one probe request
    api_keys: list[SecretStr] = Field(default_factory=list)  # empty: no auth
    # /admin/* (POST /admin/reload): keys of their own, not the client keys above. With
    # client keys and no admin keys, admin endpoints answer 403; with neither (local dev),
    # they are open to loopback clients only
    admin_api_keys: list[SecretStr] = Field(default_factory=list)
    # folders POST /admin/reload may load an artifact from (relative: to the working
    # directory); the shipped classifiers/default/ is always allowed
    artifact_roots: list[str] = Field(default_factory=lambda: ["runs"])
    max_body_bytes: int = Field(1_000_000, ge=1024)  # larger request bodies get 413
    # connection limits (router/server.py): a request's head must arrive within
    # header_timeout_s of its first byte and its body within body_timeout_s of its head
    # (else 408 and the connection closes); idle keep-alive connections close after
    # keep_alive_s; beyond max_connections new connections get 503
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    keep_alive_s: float = Field(75.0, gt=0)
    max_connections: int = Field(1024, ge=1)
    max_tokens_cap: int = Field(2048, ge=1)  # requested max_tokens above this are clamped
    # when the request gives none; None: up to the room the context leaves (as vLLM does)
    default_max_tokens: int | None = Field(None, ge=1)
    # a SQLite file, or a PostgreSQL URL (postgresql://user:pass@host/db, the `postgres`
    # extra) that several replicas share; None or "": off (and no feedback)
    decision_log: str | None = "archroute-decisions.sqlite"
    # decisions older than this (and their feedback) are deleted; None: kept forever
    decision_log_retention_days: float | None = Field(30.0, gt=0)
    # decision rows kept in memory while the database is unreachable, written when it is
    # back; beyond this the oldest are dropped (archroute_decision_log_dropped_rows_total)
    decision_log_buffer_rows: int = Field(10_000, ge=1)
    log_prompts: bool = False  # store prompt text in the decision log
    # POST /v1/feedback with a reference answer: scored under both backends in the
    # background, at most this many waiting (more: 429)
    feedback_queue_size: int = Field(64, ge=1)
    # /v1/feedback per API key (per client address without keys): a token bucket of
    # feedback_burst requests refilled at feedback_rate_per_s; beyond it 429 + Retry-After
    feedback_rate_per_s: float = Field(20.0, gt=0)
    feedback_burst: int = Field(40, ge=1)
    feedback_max_reference_chars: int = Field(32_768, ge=1)  # a longer reference: 400
    # a probe profile (policy: probe) measures the prompt probe, both backends' prefill of
    # the prompt, before it scores a request; past this many seconds (or on a failure) the
    # request is scored without it (archroute_probe_fallbacks_total)
    probe_timeout_s: float = Field(2.0, gt=0)
    # exploration's random generator (profiles' epsilon); None: a fresh seed, logged at start
    exploration_seed: int | None = None
    decision_in_body: bool = True  # add the `archroute` object to response bodies
    # follow-up turns remembered in this process (router/conversations.py: an LRU of
    # conversation hashes; with the decision log on, older turns are found there too)
    conversation_cache: int = Field(10_000, ge=1)
    # chat apps' own side requests (titles, tags, follow-ups; recognised by their prompt,
    # e.g. Open WebUI's "### Task:"): served by this backend role without scoring, marked
    # `side` in the decision log; "route" routes them like user requests
    side_requests: Literal["hybrid", "transformer", "route"] = "hybrid"
    # requests that carry tool definitions (`tools`, `tool_choice`, `parallel_tool_calls`, the
    # legacy `functions` / `function_call`). "auto": passed on to the backend that serves the
    # request when it can call tools (an upstream), else served without them with an
    # `x-archroute-warning` header (chat apps such as Open WebUI send tools on every turn);
    # "drop": always served without them (the warning header); "error": a 400 naming the
    # backend when the backend chosen cannot call tools (and no fallback to one that cannot)
    tools: Literal["auto", "drop", "error"] = "auto"
    torch_threads: int | None = Field(None, ge=1)  # for in-process models; None: torch's default
    # `serve --ray`: replicas of the router itself (Ray Serve's ingress deployment); the
    # cluster and the router's reservations: the `ray` section
    router_replicas: int = Field(1, ge=1)
    ray: RaySettings = Field(default_factory=RaySettings)
    # `archroute serve-model`'s own limits (the connection limits above are shared)
    model_server: ModelServerSettings = Field(default_factory=ModelServerSettings)
    # the built-in profiles (_default_profiles) no layer configured, by name; set by
    # load_settings (None: built directly, where not giving `profiles` means the built-ins)
    _builtin_profiles: frozenset[str] | None = PrivateAttr(None)

    @field_validator("decision_log")
    @classmethod
    def _log_off(cls, v: str | None) -> str | None:
        return v or None  # "" (the CLI's --decision-log '') turns it off

    @model_validator(mode="after")
    def _provenance(self, info: ValidationInfo) -> Settings:
        if info.context and "builtin_profiles" in info.context:
            self._builtin_profiles = frozenset(info.context["builtin_profiles"])
        return self

    @model_validator(mode="after")
    def _engine_span_gate(self) -> Settings:
        """The built-in ``archroute-span`` over two engines (both backends ``kind:
        upstream``) takes the gate trained for them (:func:`default_engine_gate_name`): the
        in-process one reads entropies the completions API does not return; and no drafting
        (``draft_k`` 0: the engines decode the spans). A profile a file, variable or flag
        configured keeps the gate it names (router/span.py refuses one the engines cannot
        run, naming the one that ships for them)."""
        prof = self.profiles.get(DEFAULT_SPAN_PROFILE)
        if (prof is not None and DEFAULT_SPAN_PROFILE in self.builtin_profiles()
                and all(b.kind == "upstream" for b in self.backends.values())):
            args = {**prof.policy_args, "gate": default_engine_gate_name(), "draft_k": 0}
            if args != prof.policy_args:
                self.profiles[DEFAULT_SPAN_PROFILE] = prof.model_copy(update={"policy_args": args})
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if set(self.backends) != {"transformer", "hybrid"}:
            raise ValueError("backends: need exactly 'transformer' and 'hybrid'")
        names = [b.name for b in self.backends.values()]
        if len(set(names)) != len(names):
            raise ValueError(f"backends: names must differ, got {names}")
        clash = set(names) & (set(self.profiles) | {"archroute"})
        if clash:
            raise ValueError(f"names used twice (profiles, backends, 'archroute'): {sorted(clash)}")
        if self.default_profile is not None and self.default_profile not in self.profiles:
            raise ValueError(f"default_profile {self.default_profile!r} is not a profile "
                             f"({sorted(self.profiles)})")
        if not self.profiles:
            raise ValueError("profiles: need at least one")
        learning = [n for n, p in self.profiles.items() if p.learns]
        if len(learning) > 1:
            raise ValueError(f"learning: at most one profile learns (one trainer), got "
                             f"{learning}")
        if learning:
            self._check_learning(learning[0])
        return self

    def _check_learning(self, name: str) -> None:
        """What a learning profile needs of the rest: a decision log with prompts (labels
        from references), its workdir among the artifact roots."""
        if not self.decision_log:
            raise ValueError(f"profiles.{name}.learning: needs a decision_log (labels and the "
                             "loop's history live there)")
        if not self.log_prompts:
            raise ValueError(f"profiles.{name}.learning: needs log_prompts: true (a reference "
                             "is scored on the request's prompt)")
        learning = self.profiles[name].learning
        assert learning is not None
        work = Path(learning.workdir).resolve()
        if not any(work == Path(r).resolve() or work.is_relative_to(Path(r).resolve())
                   for r in self.artifact_roots):
            raise ValueError(f"profiles.{name}.learning.workdir {learning.workdir!r} is not "
                             f"inside artifact_roots {self.artifact_roots}")

    def default_candidates(self) -> list[str]:
        """The profiles `model: "archroute"` may mean, in order of preference: the
        configured ``default_profile``; unset, the span profile (``archroute-span``) and then
        the request classifier's (``archroute-auto``, else the first profile that routes
        whole requests, else the first profile). The router takes the first span profile the
        pair can span-decode, or the first that is not a span profile."""
        if self.default_profile is not None:
            return [self.default_profile]
        out = [DEFAULT_SPAN_PROFILE] if DEFAULT_SPAN_PROFILE in self.profiles else []
        request = [n for n, p in self.profiles.items() if p.span_gate is None]
        if DEFAULT_REQUEST_PROFILE in request:
            out.append(DEFAULT_REQUEST_PROFILE)
        elif request:
            out.append(request[0])
        return out or [next(iter(self.profiles))]

    def builtin_profiles(self) -> frozenset[str]:
        """The profiles that are the built-in defaults as shipped, which no file,
        environment variable or flag configured (one that names a profile configures it). A
        built-in span profile the pair cannot span-decode is not served; a configured one is
        an error at start (router/span.py, ``check_span_profiles``)."""
        if self._builtin_profiles is not None:
            return self._builtin_profiles & set(self.profiles)
        if "profiles" in self.model_fields_set:
            return frozenset()
        return frozenset(self.profiles)

    def redacted(self) -> dict[str, Any]:
        """A JSON-able dict with every secret shown as ``**********`` (for logs, results),
        a database password in ``decision_log`` included."""
        out = self.model_dump(mode="json")
        if out.get("decision_log"):
            from router.decision_log import redact_url

            out["decision_log"] = redact_url(out["decision_log"])
        return out


# --- loading -------------------------------------------------------------------------

ENV_PREFIX = "ARCHROUTE_"
# the project's other variables with the prefix, which are not settings (a data folder,
# caches, the dev scripts' environments); any other ARCHROUTE_* must name a setting, so a
# typo is an error rather than a silently ignored override
NOT_SETTINGS = frozenset({"ARCHROUTE_CONFIG", "ARCHROUTE_CACHE", "ARCHROUTE_REQUESTS",
                          "ARCHROUTE_TEST_ARTIFACTS", "ARCHROUTE_VENV", "ARCHROUTE_VLLM_VENV",
                          "ARCHROUTE_VLLM_START_TIMEOUT", "ARCHROUTE_OPENWEBUI_VENV",
                          "ARCHROUTE_LITELLM_VENV"})
_LIST_FIELDS = {"api_keys", "admin_api_keys", "artifact_roots"}


def _read_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - any parse error is a config error
        raise SettingsError(f"{p}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise SettingsError(f"{p}: top level must be a mapping")
    return data


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in NOT_SETTINGS:
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        value: Any = ([v.strip() for v in raw.split(",") if v.strip()]
                      if path[-1] in _LIST_FIELDS else yaml.safe_load(raw) if raw else raw)
        if path[-1] in ("api_key", "base_url", "model", "path", "name"):
            value = raw  # keep strings as given
        if path[-1] == "decision_log" and raw.strip().lower() not in ("", "null", "none", "~"):
            value = raw  # a path or a database URL, as given (a password may hold anything)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(config: str | Path | None = None, overrides: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from defaults < file < environment < ``overrides`` (CLI).

    ``config`` defaults to ``$ARCHROUTE_CONFIG``. A file's ``backends`` (or ``profiles``)
    replace the default ones as a whole; later layers merge into earlier ones key by key.
    """
    environ = dict(os.environ if environ is None else environ)
    config = config or environ.get("ARCHROUTE_CONFIG")
    data: dict[str, Any] = _read_file(config) if config else {}
    builtin = set() if "profiles" in data else set(_default_profiles())
    for key, factory in (("backends", _default_backends), ("profiles", _default_profiles)):
        if key not in data:  # a file's mapping replaces the default one as a whole
            data[key] = {k: v.model_dump(mode="json", exclude_defaults=True)
                         for k, v in factory().items()}
    env = _env_overrides(environ)
    data = _merge(data, env)
    # None means "not given" (the CLI's unset flags); to turn the decision log off pass ""
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    builtin -= {*(env.get("profiles") or {}), *(over.get("profiles") or {})}  # configured
    cli_backends = over.pop("backends", {})
    data = _merge(data, over)
    for role, cfg in cli_backends.items():  # a backend given on the command line replaces
        data.setdefault("backends", {})[role] = cfg
    try:
        return Settings.model_validate(data, context={"builtin_profiles": builtin})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                 for e in exc.errors()]
        src = f" (from {config})" if config else ""
        raise SettingsError("invalid settings" + src + ":\n" + "\n".join(lines)) from None
