"""``archroute serve`` (the router) and ``archroute serve-model`` (one backend as a server).

Flags override the config file and the environment (see :mod:`router.settings`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

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
    p.set_defaults(func=run_serve)


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
    from router.app import create_app
    from router.server import serve

    serve(create_app(settings), settings.host, settings.port, settings,
          log_level="info", access_log=False)
    return 0


def add_serve_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-model", help="serve one backend as an OpenAI-compatible server",
                       description="One model behind /v1/completions (echo + logprobs too) and "
                       "/v1/chat/completions, the way vLLM serves it.")
    p.add_argument("model", metavar="DIR_OR_SPEC",
                   help="a model directory, reference:transformer, reference:hybrid, or fake")
    p.add_argument("--name", help="model name clients send (default: from the spec)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--device", default="cpu")
    p.add_argument("--architecture", choices=["transformer", "hybrid", "other"],
                   help="override the detected architecture")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests run at once (default: the backend's own)")
    p.add_argument("--api-key", dest="api_keys", action="append",
                   help="accept this key (visible in `ps`: prefer --api-key-file)")
    p.add_argument("--api-key-file", metavar="PATH", help="accept the keys in this file, one per line")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--fake-reply", default="Hello from the fake backend.",
                   help="reply of the 'fake' backend")
    p.add_argument("--fake-delay-s", type=float, default=0.0,
                   help="seconds the 'fake' backend waits before answering")
    p.add_argument("--fake-tool-calls", metavar="JSON", type=json.loads, default=None,
                   help="the 'fake' backend calls tools: these calls (a JSON list of "
                        "{\"name\", \"arguments\"}) answer a request that sends tools")
    p.set_defaults(func=run_serve_model)


def run_serve_model(args: argparse.Namespace) -> int:

    from models.registry import BackendSpecError, from_spec, parse_spec
    from router.model_server import create_model_app

    spec: str = args.model
    fields: dict[str, Any] = {"device": args.device}
    if args.max_concurrency:
        fields["max_concurrency"] = args.max_concurrency
    if spec == "fake" or spec.startswith("fake:"):  # fake:REPLY names its reply itself
        fields.update(fake_delay_s=args.fake_delay_s, fake_tool_calls=args.fake_tool_calls,
                      **({"fake_reply": args.fake_reply} if spec == "fake" else {}))
    try:
        backend = from_spec(spec, role=args.architecture, name=args.name or parse_spec(spec)["name"],
                            torch_threads=args.torch_threads, **fields)
    except BackendSpecError as exc:
        log.error("%s", exc)
        return 2
    log.info("serving %s as %r on %s:%d", backend.info(), args.name or backend.name,
             args.host, args.port)
    keys = list(args.api_keys or [])
    if args.api_key_file:
        try:
            keys += read_key_file(args.api_key_file)
        except (OSError, ValueError) as exc:
            log.error("--api-key-file: %s", exc)
            return 2
    app = create_model_app(backend, args.name or backend.name, api_keys=keys or None,
                           max_concurrency=args.max_concurrency)
    from router.server import serve

    serve(app, args.host, args.port, log_level="info", access_log=False)
    return 0
