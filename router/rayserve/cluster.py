"""``archroute serve --ray``: connect to a Ray cluster (or start a local one), check that the
settings fit it, run the application (:mod:`router.rayserve.deploy`) until SIGTERM/SIGINT,
then stop what this command started and nothing else.

- ``ray.address`` (or ``$RAY_ADDRESS``) set: join that cluster; it must answer within
  :data:`CONNECT_TIMEOUT_S` (Ray itself would wait minutes). Unset: a local cluster of
  ``ray.num_cpus`` CPUs (this machine's when unset), stopped on exit.
- Ray Serve already running there (another application): only this application is
  deleted on exit; started by this command: Serve is shut down too.
- Every problem found before anything serves is a :class:`RayServeError`, one line: the
  ``ray`` extra missing, a cluster that cannot be reached, replicas or resources the
  cluster does not have, a port already taken.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.rayserve.deploy import APP_NAME, build_application, demands
from router.settings import Settings

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
_SERVE_CONTROLLER = "SERVE_CONTROLLER_ACTOR"  # Ray Serve's controller actor, namespace "serve"


class RayServeError(RuntimeError):
    """``serve --ray`` cannot start as configured; the message says why, in one line."""


def import_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401 - the serve extra, not only ray core
    except ImportError as exc:
        raise RayServeError(f"--ray needs Ray Serve: pip install 'archroute[ray]' ({exc})"
                            ) from None
    return ray


def cluster_address(settings: Settings, environ: dict[str, str] | None = None) -> str | None:
    """The cluster to join: ``ray.address``, else ``$RAY_ADDRESS``; None: start one."""
    env = os.environ if environ is None else environ
    return settings.ray.address or env.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to ``address`` (``host:port`` or ``ray://host:port``) within
    ``timeout_s``, or a :class:`RayServeError`. ``auto`` is left to Ray."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RayServeError(f"Ray cluster address {address!r}: expected HOST:PORT or "
                            "ray://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayServeError(f"Ray cluster {address} cannot be reached within {timeout_s:g} s "
                            f"({exc.strerror or exc}); is `ray start --head` running there?"
                            ) from None


def resource_problem(settings: Settings, total: dict[str, float],
                     per_node: list[dict[str, float]]) -> str | None:
    """Why the deployments at their starting replica counts do not fit the cluster
    (``total``: its resources; ``per_node``: each live node's), or None."""
    need: dict[str, float] = {}
    parts: dict[str, list[str]] = {}
    for name, n, res in demands(settings):
        for key, amount in res.items():
            if amount <= 0:
                continue
            if not any(node.get(key, 0.0) >= amount - 1e-9 for node in per_node):
                biggest = max((node.get(key, 0.0) for node in per_node), default=0.0)
                return (f"deployment {name!r}: one replica needs {amount:g} {key}, but no node "
                        f"of the Ray cluster has that much (the largest has {biggest:g})")
            need[key] = need.get(key, 0.0) + n * amount
            parts.setdefault(key, []).append(f"{name} {n} x {amount:g}")
    for key, amount in need.items():
        have = total.get(key, 0.0)
        if amount > have + 1e-9:
            return (f"the deployments need {amount:g} {key} ({', '.join(parts[key])}), the Ray "
                    f"cluster has {have:g}; lower replicas or num_cpus/num_gpus, or add nodes")
    return None


def check_port(host: str, port: int) -> None:
    """The proxy's port must be free on this machine (a local cluster's proxy binds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RayServeError(f"port {host}:{port} is taken ({exc.strerror})") from None


def check_autoscaling(settings: Settings) -> None:
    from ray.serve.config import AutoscalingConfig

    from router.rayserve.deploy import autoscaling

    for role, bs in settings.backends.items():
        cfg = autoscaling(settings, bs)
        if cfg is None:
            continue
        try:
            AutoscalingConfig(**cfg)
        except Exception as exc:  # noqa: BLE001 - pydantic's message, on one line
            msg = " ".join(str(exc).split())
            raise RayServeError(f"backends.{role} autoscaling (ray.autoscaling): {msg}") from None


def serve_running(ray: Any) -> bool:
    """True when Ray Serve's controller already runs on the connected cluster."""
    from ray.util import list_named_actors

    return any(a.get("name") == _SERVE_CONTROLLER
               for a in list_named_actors(all_namespaces=True))


class RayRouter:
    """The router on Ray Serve while it runs: :meth:`start`, then :meth:`stop` (always)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ray = import_ray()
        self.address = cluster_address(settings)
        self.started_serve = False
        self.deployed = False  # this command's application was (being) deployed
        self.connected = False

    def start(self, connected: Callable[[], None] | None = None) -> float:
        """Connect, check, deploy; returns the seconds it took until the application was
        ready. Raises :class:`RayServeError` for what the settings ask that cannot be."""
        t0 = time.perf_counter()
        s = self.settings
        check_autoscaling(s)
        if self.address:
            check_reachable(self.address)
        else:
            check_port(s.host, s.port)
        ray = self.ray
        init: dict[str, Any] = {"include_dashboard": False, "configure_logging": False}
        if self.address:
            try:
                ray.init(address=self.address, **init)
            except ConnectionError as exc:
                msg = " ".join(str(exc).split())
                raise RayServeError(
                    f"cannot join the Ray cluster at {self.address} ({msg}); a cluster with "
                    "token authentication needs its token here (RAY_AUTH_TOKEN, or the file "
                    "`ray get-auth-token` reads)") from None
        else:  # "local": a new cluster even if another runs on this machine
            ray.init(address="local", num_cpus=s.ray.num_cpus, **init)
        self.connected = True
        if connected is not None:
            connected()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        why = resource_problem(s, ray.cluster_resources(), nodes)
        if why is not None:
            raise RayServeError(why)
        from ray import serve

        self.started_serve = not serve_running(ray)
        if not self.started_serve and APP_NAME in serve.status().applications:
            raise RayServeError(f"a Ray Serve application named {APP_NAME!r} already runs on "
                                "this cluster (another `archroute serve --ray`?); stop it first")
        if not self.started_serve:
            log.warning("Ray Serve already runs on this cluster: its HTTP proxy keeps its own "
                        "host and port (settings host/port apply only when this command "
                        "starts Serve)")
        serve.start(http_options={"host": s.host, "port": s.port})
        self.deployed = True
        serve.run(build_application(s, os.getcwd()), name=APP_NAME, route_prefix="/")
        return time.perf_counter() - t0

    def stop(self) -> None:
        """Delete this application, shut Serve down if this command started it, and leave
        the cluster (a local one stops with it)."""
        if not self.connected:
            return
        from ray import serve

        try:
            if self.started_serve:
                serve.shutdown()
            elif self.deployed:
                serve.delete(APP_NAME)
        except Exception as exc:  # noqa: BLE001 - still leave the cluster
            log.warning("stopping Ray Serve: %s: %s", type(exc).__name__, exc)
        finally:
            self.ray.shutdown()
            self.connected = False


class _Stop(BaseException):
    """SIGTERM or SIGINT: leave whatever the command is doing (starting or serving)."""


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT end the command through ``finally`` (so what it started stops).
    Called again once connected: Ray's core worker installs a SIGTERM handler of its own."""
    def stop(signum: int, _frame: Any) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal: while stopping, ignored
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def serve_on_ray(settings: Settings, pid_file: str | None = None) -> int:
    """Run the router on Ray Serve until SIGTERM or SIGINT; 0 after a clean stop. Raises
    :class:`RayServeError` before serving when the settings cannot be served."""
    router = RayRouter(settings)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    pid = Path(pid_file) if pid_file else None
    _stop_on_signals()
    try:
        took = router.start(connected=_stop_on_signals)
        log.info("archroute on Ray Serve: http://%s:%d (ready in %.1f s; cluster %s)",
                 settings.host, settings.port, took, router.address or "local")
        if pid is not None:
            pid.write_text(f"{os.getpid()}\n")
        while True:
            time.sleep(3600)
    except _Stop as stop:
        log.info("%s: stopping the application %r%s", stop, APP_NAME,
                 "" if router.address else ", Ray Serve and the local cluster")
    finally:
        router.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pid is not None and pid.exists() and pid.read_text().strip() == str(os.getpid()):
            pid.unlink()
    return 0
