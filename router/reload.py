"""Reload the classifier artifact without a restart: ``POST /admin/reload`` and SIGHUP.

Every classifier profile loads its artifact again: a profile that names one
(``policy_args.artifact``) from that path, the others from the path given
(``{"artifact": PATH}``; default: the shipped ``classifiers/default/``). Artifacts load in a
worker thread with their self-check replayed strictly (``classifiers.artifact.load(...,
strict=True)``: predictions must match those recorded at training); then the new policies
and thresholds replace the old ones in one assignment (:class:`router.serving.RoutingState`).
Requests already routed finish with the backend the old policy chose; new ones use the new
policy. A failing artifact changes nothing: the old one keeps serving and the caller gets
the reason. Backends, slots and in-flight requests are not touched.

A corrupt or half-written artifact cannot take the router down: its files are checked
against its manifest before LightGBM reads a byte, and one without a manifest is loaded
first in a child process (:mod:`classifiers.integrity`). A path given in the request must
lie in ``artifact_roots`` (or be the shipped default), else 403; the answer names the
artifact (folder name, sha256, created_utc), never a server path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from router.errors import APIError, ConflictError, InvalidRequestError, PermissionDeniedError
from router.policies import Policy, get_policy
from router.serving import RoutingState

if TYPE_CHECKING:
    from router.serving import RouterService
    from router.settings import Settings

log = logging.getLogger(__name__)


class ReloadRequest(BaseModel):
    """``POST /admin/reload`` body (optional): ``{"artifact": PATH}``; ``force`` skips the
    learning loop's gate for an artifact trained on the decision log."""

    model_config = ConfigDict(extra="forbid")
    artifact: str | None = Field(None, min_length=1, max_length=4096)
    force: StrictBool = False


class GateRefusedError(ConflictError):
    """A log-trained candidate the DR gate did not let through (router/learning/gate.py)."""

    code = "gate_refused"


class ReloadError(InvalidRequestError):
    code = "reload_failed"


class RetrainRunningError(ConflictError):
    """A manual reload while the learning loop retrains (router/learning/auto.py)."""

    code = "retrain_running"


def allowed_artifact(settings: Settings, path: str) -> Path:
    """``path`` resolved (symbolic links followed), when it lies in one of the settings'
    ``artifact_roots`` (relative roots: to the working directory) or is the shipped
    default; else :class:`PermissionDeniedError` (403)."""
    from classifiers.artifact import DEFAULT_DIR

    target = Path(path).resolve()
    roots = [DEFAULT_DIR.resolve(), *(Path(r).resolve() for r in settings.artifact_roots)]
    if not any(target == r or target.is_relative_to(r) for r in roots):
        raise PermissionDeniedError(
            f"artifact {path!r} is outside the folders reloads may load from "
            f"(artifact_roots: {settings.artifact_roots}, and the shipped default); move it "
            "there or add its folder to artifact_roots", param="artifact",
            code="artifact_not_allowed")
    return target


GATED_POLICIES = ("classifier", "guarded")  # profiles whose artifact a reload replaces


def gate_check(settings: Settings, current: RoutingState, policies: dict[str, Policy],
               default: Any, default_profile: str | None = None) -> dict | None:
    """The learning loop's gate (router/learning/gate.py) for a log-trained artifact: on the
    decision log's held-back labelled requests, the new policy of the profile that serves
    ``model: "archroute"`` (else the first classifier profile that uses the artifact) must
    beat the serving one, the 95% CI of the paired DR difference above zero. None when the
    artifact was not trained on a log; :class:`GateRefusedError` (409) when it fails."""
    from router.decision_log import read_log
    from router.learning import gate

    if not gate.log_trained(getattr(default, "meta", {}) or {}):
        return None
    names = [n for n, p in settings.profiles.items() if p.policy in GATED_POLICIES
             and "artifact" not in p.policy_args and n in policies and n in current.policies]
    if not names:
        return None
    name = default_profile if default_profile in names else names[0]
    if settings.decision_log is None:
        raise GateRefusedError("the artifact was trained on a decision log, and this router "
                               "has none to judge it on: reload with {\"force\": true} to "
                               "serve it anyway", param="artifact")
    fresh = RoutingState.build(settings, policies)
    res = gate.judge(read_log(settings.decision_log), current.policies[name],
                     current.thresholds[name], policies[name], fresh.thresholds[name])
    if not res.passed:
        est = ("" if res.serving != res.serving else f", DR on the log's held-back requests: "
               f"serving {res.serving:+.4f}, candidate {res.candidate:+.4f} nats/token")
        raise GateRefusedError(
            f"the gate refused the candidate; the previous artifact keeps serving (profile "
            f"{name}{est}): {res.reason}. Reload with {{\"force\": true}} to serve it anyway",
            param="artifact")
    return {"profile": name, **res.to_dict()}


def build_policies(settings: Settings, current: RoutingState,
                   path: str | None) -> tuple[dict[str, Policy], Any]:
    """New policies for every profile (classifier profiles with freshly loaded artifacts,
    the others as they are) and the artifact loaded for the default; raises on any
    failure."""
    from classifiers import artifact as A

    target = Path(path) if path else A.DEFAULT_DIR
    loaded: dict[Path, Any] = {}

    def load(p: Path) -> Any:
        key = p.resolve()
        if key not in loaded:
            loaded[key] = A.load(p, verify=True, strict=True)
        return loaded[key]

    default = load(target)
    policies: dict[str, Policy] = {}
    for name, prof in settings.profiles.items():
        if name not in current.policies:  # span profiles have no policy
            continue
        if prof.policy not in GATED_POLICIES:
            policies[name] = current.policies[name]
            continue
        args = dict(prof.policy_args)
        own = args.get("artifact")
        model = load(Path(own)) if own else default
        try:
            policies[name] = get_policy(prof.policy, **args, model=model)
        except ValueError as exc:
            raise A.ArtifactError(f"profile {name}: {exc}") from None
    return policies, default


class Reloader:
    """One reload at a time, for one router service."""

    def __init__(self, service: RouterService, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()  # signal-started reloads, kept until done
        self.reloads = 0
        self.gate_refusals = 0
        # why a reload must wait, or None: the learning loop's retrain (router/learning/auto.py)
        self.busy: Callable[[], str | None] = lambda: None

    async def reload(self, path: str | None = None, force: bool = False) -> dict:
        """Load, check and swap in; the result names the artifact and each classifier
        profile's threshold. :class:`ReloadError` (400) when the artifact is refused;
        :class:`GateRefusedError` (409) when a log-trained artifact does not pass the
        learning loop's gate (unless ``force``)."""
        from classifiers.artifact import ArtifactError

        if path is not None:
            allowed_artifact(self.settings, path)
        why = self.busy()
        if why is not None:
            raise RetrainRunningError(f"reload refused; the previous artifact keeps serving: "
                                      f"{why}", param="artifact")
        async with self._lock:
            t0 = time.perf_counter()
            try:
                policies, default = await asyncio.to_thread(
                    build_policies, self.settings, self.service.state, path)
            except (ArtifactError, ValueError, OSError) as exc:
                log.warning("reload of %s refused: %s", path or "the default", exc)
                raise ReloadError(f"reload failed; the previous artifact keeps serving: "
                                  f"{exc}", param="artifact") from None
            except Exception:  # noqa: BLE001 - reported, never half-applied
                log.exception("reload failed")
                raise APIError("reload failed (internal error, logged); the previous "
                               "artifact keeps serving", status=500, type="server_error",
                               code="reload_failed") from None
            gated = None
            if not force:
                try:
                    gated = await asyncio.to_thread(
                        gate_check, self.settings, self.service.state, policies, default,
                        self.service.default_profile)
                except GateRefusedError as exc:
                    self.gate_refusals += 1
                    log.warning("reload of %s refused by the gate: %s", path, exc.message)
                    raise
                except Exception as exc:  # noqa: BLE001 - a log that cannot be read: no evidence
                    self.gate_refusals += 1
                    log.exception("the gate could not judge %s", path)
                    raise GateRefusedError(
                        f"the gate could not judge the candidate ({type(exc).__name__}); the "
                        "previous artifact keeps serving. Reload with {\"force\": true} to "
                        "serve it anyway", param="artifact") from None
            state = RoutingState.build(self.settings, policies)
            self.service.state = state  # one assignment: new requests see all of it
            self.reloads += 1
            profiles = {}
            for name, pol in policies.items():
                art = pol.artifact_identity()
                if art is not None:
                    profiles[name] = {"threshold": state.thresholds[name],
                                      "artifact": art.get("sha256")}
            out = {"object": "archroute.reload", "artifact": default.identity(),
                   "profiles": profiles,
                   "seconds": round(time.perf_counter() - t0, 3)}
            if gated is not None or force:
                out["gate"] = gated if gated is not None else "skipped (force)"
            log.info("reloaded the classifier: %s (%s s)", default.identity(), out["seconds"])
            return out

    async def reload_logged(self, path: str | None, why: str) -> None:
        """A reload nobody waits for (SIGHUP): the outcome goes to the log."""
        try:
            await self.reload(path)
        except APIError as exc:
            log.error("%s: %s", why, exc.message)

    def reload_soon(self, path: str | None, why: str) -> None:
        """Start :meth:`reload_logged` from a signal handler (on the event loop)."""
        task = asyncio.get_running_loop().create_task(self.reload_logged(path, why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
