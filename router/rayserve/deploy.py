"""The Ray Serve application ``archroute serve --ray`` runs, built from the settings:

- ``router``: the ingress (:class:`~router.rayserve.ingress.RouterIngress`),
  ``router_replicas`` replicas of ``ray.router_num_cpus`` CPUs each, behind Ray Serve's
  HTTP proxy on the settings' ``host``/``port``;
- ``transformer`` / ``hybrid``: one deployment per in-process backend
  (:class:`~router.rayserve.replicas.ModelReplica`), ``replicas`` replicas of ``num_cpus``
  CPUs and ``num_gpus`` GPUs each; ``max_replicas`` above ``replicas``: Ray Serve
  autoscales between them (``ray.autoscaling``: more of its ``AutoscalingConfig``);
- ``span``: with a span profile and two in-process backends, both models of the pair per
  replica (:class:`~router.rayserve.replicas.SpanReplica`), ``ray.span_replicas`` replicas
  (unset: the transformer's) holding the resources of both;
- an upstream backend is no deployment: the router replicas call it over HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from router.rayserve.ingress import RouterIngress, span_keys
from router.rayserve.replicas import ModelReplica, SpanReplica

if TYPE_CHECKING:
    from router.settings import BackendSettings, Settings

APP_NAME = "archroute"  # the Ray Serve application's name (serve.delete removes only it)
ROUTER = "router"
SPAN = "span"
# replicas that end get this long to finish what they serve (Ray Serve's default is 20 s)
GRACEFUL_SHUTDOWN_S = 10.0


def in_process(bs: BackendSettings) -> bool:
    """True for a backend that runs in its own deployment (not an upstream over HTTP)."""
    return bs.kind != "upstream"


def has_span(settings: Settings) -> bool:
    """A span deployment is made when a profile span-decodes and both backends run in
    replicas (span over two upstreams is the router's own business, over HTTP)."""
    return bool(span_keys(settings)) and all(in_process(b) for b in settings.backends.values())


def autoscaling(settings: Settings, bs: BackendSettings) -> dict[str, Any] | None:
    """Ray Serve's autoscaling config of a backend with ``max_replicas`` above ``replicas``."""
    if bs.max_replicas is None or bs.max_replicas <= bs.replicas:
        return None
    return {"min_replicas": bs.replicas, "initial_replicas": bs.replicas,
            "max_replicas": bs.max_replicas, **settings.ray.autoscaling}


def _scale(settings: Settings, bs: BackendSettings) -> dict[str, Any]:
    auto = autoscaling(settings, bs)
    return {"autoscaling_config": auto} if auto is not None else {"num_replicas": bs.replicas}


def deployment_problem(role: str, app: str = APP_NAME) -> str | None:
    """Why the deployment of ``role`` cannot serve now (Ray Serve's status of it), or None.
    Blocking (asks the Serve controller): call it in a thread."""
    from ray import serve

    try:
        status = serve.status().applications[app].deployments[role]
    except Exception as exc:  # noqa: BLE001 - the controller unreachable: say so
        return f"Ray Serve status unavailable ({type(exc).__name__})"
    if str(status.status).rsplit(".", 1)[-1] in ("UNHEALTHY", "DEPLOY_FAILED"):
        return f"Ray Serve deployment {role!r} is {status.status}: {status.message}"
    return None


def build_application(settings: Settings, cwd: str | None = None) -> Any:
    """The bound Ray Serve application (``serve.run`` it); ``cwd``: the folder relative
    paths in the settings are relative to."""
    from ray import serve

    models: dict[str, Any] = {}
    for role, bs in settings.backends.items():
        if not in_process(bs):
            models[role] = None
            continue
        dep = serve.deployment(
            name=role, max_ongoing_requests=bs.concurrency,
            ray_actor_options={"num_cpus": bs.num_cpus, "num_gpus": bs.num_gpus},
            graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S, **_scale(settings, bs))(ModelReplica)
        models[role] = dep.bind(bs, role, settings.torch_threads, cwd)
    span = None
    if has_span(settings):
        t, h = settings.backends["transformer"], settings.backends["hybrid"]
        dep = serve.deployment(
            name=SPAN, max_ongoing_requests=t.concurrency,
            num_replicas=settings.ray.span_replicas or t.replicas,
            ray_actor_options={"num_cpus": t.num_cpus + h.num_cpus,
                               "num_gpus": t.num_gpus + h.num_gpus},
            graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)(SpanReplica)
        span = dep.bind(t, h, settings.torch_threads, cwd)
    ingress = serve.deployment(
        name=ROUTER, num_replicas=settings.router_replicas,
        max_ongoing_requests=settings.max_connections,
        ray_actor_options={"num_cpus": settings.ray.router_num_cpus},
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)(serve.ingress()(RouterIngress))
    return ingress.bind(settings, deployment_problem, cwd, models["transformer"],
                        models["hybrid"], span)


def demands(settings: Settings) -> list[tuple[str, int, dict[str, float]]]:
    """(deployment, replicas at start, resources per replica) of every deployment."""
    out: list[tuple[str, int, dict[str, float]]] = [
        (ROUTER, settings.router_replicas, {"CPU": settings.ray.router_num_cpus})]
    for role, bs in settings.backends.items():
        if in_process(bs):
            out.append((role, bs.replicas, {"CPU": bs.num_cpus, "GPU": bs.num_gpus}))
    if has_span(settings):
        t, h = settings.backends["transformer"], settings.backends["hybrid"]
        out.append((SPAN, settings.ray.span_replicas or t.replicas,
                    {"CPU": t.num_cpus + h.num_cpus, "GPU": t.num_gpus + h.num_gpus}))
    return out
