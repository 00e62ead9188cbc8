"""``archroute serve`` (the router) and ``archroute serve-model`` (one backend as a server).

Both read :mod:`router.settings` (serve-model its ``model_server`` section and the shared
connection limits): defaults, then the config file, then the environment, then these flags.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.settings import Settings

log = logging.getLogger(__name__)


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the routing server (OpenAI-compatible)",
                       description="Route each request to the transformer or the hybrid backend. "
                       "With no config: the embedded reference pair, in-process.")
    p.add_argument("--config", "-c", help="YAML or TOML settings file (or $ARCHROUTE_CONFIG)")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--transformer", metavar="SPEC", help="transformer backend: reference:transformer, "
                   "a model dir, or http://host:port/v1#MODEL")
    p.add_argument("--hybrid", metavar="SPEC", help="hybrid backend (same forms)")
    p.add_argument("--profile", dest="default_profile", help="profile that model 'archroute' means")
    p.add_argument("--api-key", dest="api_keys", action="append",
                   help="accept this API key (repeatable; visible in `ps`: prefer "
                        "--api-key-file or ARCHROUTE_API_KEYS); none: no auth")
    p.add_argument("--api-key-file", metavar="PATH",
                   help="accept the API keys in this file, one per line")
    p.add_argument("--decision-log", help="SQLite decision log path ('' to turn off)")
    p.add_argument("--log-prompts", action="store_true", default=None,
                   help="store prompt text in the decision log")
    p.add_argument("--no-fallback", dest="fallback", action="store_false", default=None,
                   help="never serve from the other backend when the chosen one fails")
    p.add_argument("--torch-threads", type=int, help="torch threads for in-process models")
    p.add_argument("--print-settings", action="store_true",
                   help="print the resolved settings (secrets redacted) and exit")
    p.add_argument("--ray", action="store_true",
                   help="serve from Ray Serve (the `ray` extra): router_replicas router replicas, "
                        "a deployment per in-process backend (its `replicas`); joins $RAY_ADDRESS "
                        "(or ray.address), else starts a local cluster, stopped on exit")
    add_pid_file(p)
    p.set_defaults(func=run_serve)


def add_pid_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pid-file", metavar="PATH",
                   help="write the process id here while serving (removed on exit): "
                        "`kill -HUP $(cat PATH)` reaches this server and no other")


def read_key_file(path: str) -> list[str]:
    """API keys, one per line (blank lines and ``#`` comments skipped); at least one."""
    keys = [ln.strip() for ln in Path(path).read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path}: no keys in the file")
    return keys


def run_serve(args: argparse.Namespace) -> int:
    import json

    from router.settings import SettingsError, load_settings

    overrides: dict[str, Any] = {k: getattr(args, k) for k in (
        "host", "port", "default_profile", "api_keys", "log_prompts", "fallback",
        "torch_threads")}
    if args.api_key_file:
        try:
            keys = read_key_file(args.api_key_file)
        except (OSError, ValueError) as exc:
            log.error("--api-key-file: %s", exc)
            return 2
        overrides["api_keys"] = [*(args.api_keys or []), *keys]
    if args.decision_log is not None:
        overrides["decision_log"] = args.decision_log  # "" turns it off (None would be "unset")
    from models.registry import BackendSpecError, parse_spec

    try:
        backends = {role: parse_spec(spec, role) for role in ("transformer", "hybrid")
                    if (spec := getattr(args, role))}
    except BackendSpecError as exc:
        log.error("%s", exc)
        return 2
    if backends:
        overrides["backends"] = backends
    try:
        settings = load_settings(args.config, overrides)
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    if args.print_settings:
        print(json.dumps(settings.redacted(), indent=2))
        return 0
    if args.ray:
        from router.rayserve.cluster import RayServeError, serve_on_ray

        try:
            return serve_on_ray(settings, pid_file=args.pid_file)
        except RayServeError as exc:
            log.error("serve --ray: %s", exc)
            return 2
    from router.app import create_app
    from router.server import serve

    serve(create_app(settings), settings.host, settings.port, settings,
          pid_file=args.pid_file, log_level="info", access_log=False)
    return 0


def add_serve_model(sub: argparse._SubParsersAction) -> None:
    from router.settings import ModelServerSettings

    default = {k: f.default for k, f in ModelServerSettings.model_fields.items()}
    p = sub.add_parser(
        "serve-model", help="serve one backend as an OpenAI-compatible server",
        description="One model behind /v1/completions (echo + logprobs too) and "
        "/v1/chat/completions, the way vLLM serves it. Its limits are the settings' "
        "model_server section: defaults, then the config file's `model_server:`, then "
        "ARCHROUTE_MODEL_SERVER__* variables (e.g. ARCHROUTE_MODEL_SERVER__MAX_QUEUE=128), "
        "then these flags; the connection limits (header_timeout_s, body_timeout_s, "
        "keep_alive_s, max_connections) and torch_threads are the top level's, as for serve.")
    p.add_argument("model", metavar="DIR_OR_SPEC",
                   help="a model directory, reference:transformer, reference:hybrid, or fake")
    p.add_argument("--config", "-c", help="YAML or TOML settings file (or $ARCHROUTE_CONFIG); "
                   "its model_server section: host, port, api_keys, max_concurrency, "
                   + ", ".join(f"{k} ({default[k]})" for k in (
                       "max_queue", "timeout_s", "max_body_bytes", "max_tokens_cap")))
    p.add_argument("--name", help="model name clients send (default: from the spec)")
    p.add_argument("--host", help=f"bind address (default {default['host']})")
    p.add_argument("--port", type=int, help=f"port (default {default['port']})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--architecture", choices=["transformer", "hybrid", "other"],
                   help="override the detected architecture")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests run at once (default: the backend's own)")
    p.add_argument("--api-key", dest="api_keys", action="append",
                   help="accept this key (visible in `ps`: prefer --api-key-file)")
    p.add_argument("--api-key-file", metavar="PATH", help="accept the keys in this file, one per line")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads for an in-process model (default: torch's)")
    p.add_argument("--print-settings", action="store_true",
                   help="print the resolved model_server settings and connection limits "
                        "(secrets redacted) and exit")
    p.add_argument("--fake-reply", default="Hello from the fake backend.",
                   help="reply of the 'fake' backend")
    p.add_argument("--fake-delay-s", type=float, default=0.0,
                   help="seconds the 'fake' backend waits before answering")
    p.add_argument("--fake-tool-calls", metavar="JSON", type=json.loads, default=None,
                   help="the 'fake' backend calls tools: these calls (a JSON list of "
                        "{\"name\", \"arguments\"}) answer a request that sends tools")
    add_pid_file(p)
    p.set_defaults(func=run_serve_model)


# top-level settings serve-model reads besides its own section (shared with the router)
MODEL_SERVER_SHARED = ("header_timeout_s", "body_timeout_s", "keep_alive_s", "max_connections",
                       "torch_threads")


def model_server_settings(args: argparse.Namespace, api_keys: list[str]) -> Settings:
    """serve-model's resolved settings (its ``model_server`` section and the shared
    connection limits): defaults < ``--config`` file < environment < flags (``api_keys``:
    those of --api-key and --api-key-file). Raises ``SettingsError``."""
    from router.settings import load_settings

    own: dict[str, Any] = {k: v for k in ("host", "port", "max_concurrency")
                           if (v := getattr(args, k)) is not None}
    if api_keys:
        own["api_keys"] = api_keys
    return load_settings(args.config, {"torch_threads": args.torch_threads, "model_server": own})


def run_serve_model(args: argparse.Namespace) -> int:
    from models.registry import BackendSpecError, from_spec, parse_spec
    from router.model_server import create_model_app
    from router.settings import SettingsError

    keys = list(args.api_keys or [])
    if args.api_key_file:
        try:
            keys += read_key_file(args.api_key_file)
        except (OSError, ValueError) as exc:
            log.error("--api-key-file: %s", exc)
            return 2
    try:
        settings = model_server_settings(args, keys)
    except SettingsError as exc:
        log.error("%s", exc)
        return 2
    shown = settings.redacted()
    shown = {"model_server": shown["model_server"], **{k: shown[k] for k in MODEL_SERVER_SHARED}}
    if args.print_settings:
        print(json.dumps(shown, indent=2))
        return 0
    log.info("settings: %s", json.dumps(shown))
    ms = settings.model_server
    spec: str = args.model
    fields: dict[str, Any] = {"device": args.device}
    if ms.max_concurrency:
        fields["max_concurrency"] = ms.max_concurrency
    if spec == "fake" or spec.startswith("fake:"):  # fake:REPLY names its reply itself
        fields.update(fake_delay_s=args.fake_delay_s, fake_tool_calls=args.fake_tool_calls,
                      **({"fake_reply": args.fake_reply} if spec == "fake" else {}))
    try:
        backend = from_spec(spec, role=args.architecture, name=args.name or parse_spec(spec)["name"],
                            torch_threads=settings.torch_threads, **fields)
    except BackendSpecError as exc:
        log.error("%s", exc)
        return 2
    log.info("serving %s as %r on %s:%d", backend.info(), args.name or backend.name,
             ms.host, ms.port)
    app = create_model_app(backend, args.name or backend.name, ms)
    import signal

    from router.server import serve

    # SIGHUP reloads the router's artifact; serve-model has nothing to reload, and the
    # default action (terminate) would kill it silently under a router that then answers 502
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: log.info("SIGHUP: serve-model has nothing to "
                                                         "reload; still serving"))
    serve(app, ms.host, ms.port, settings, pid_file=args.pid_file, log_level="info",
          access_log=False)
    return 0
