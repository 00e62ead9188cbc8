"""Backend kinds, one spec grammar and one ``build``: the only place a backend is made.

The router (settings), every CLI command (``--transformer SPEC``, ``serve-model SPEC``), the
evaluation harness and the analysis all go through :func:`build` / :func:`from_spec`.

**Kinds** are registered like the router's policies, as lazy ``"module:function"`` entries,
so importing this module imports no torch: ``function(cfg, role, torch_threads)`` returns a
:class:`~models.base.Backend`. Adding a kind is one module with such a function plus one
line in :data:`KINDS` (the fake backend, ``models/fake.py`` ``build``, is the example).

**Spec grammar** (one for every command):

- ``reference:transformer`` / ``reference:hybrid``: the embedded pair (kind ``hf``);
- ``http://host:port/v1#MODEL`` (or ``https``): an OpenAI-compatible server serving MODEL
  (kind ``upstream``; the model name is required: engines refuse requests without it);
- ``fake`` or ``fake:REPLY``: an instant test double (kind ``fake``);
- anything else: a local model directory (kind ``hf``).

**Config** (:class:`BackendConfig`; the router's ``BackendSettings`` has the same fields):
``name``, ``kind``, ``path`` (hf), ``base_url``/``model``/``api_key`` (upstream),
``fake_reply``/``fake_delay_s``/``fake_tool_calls`` (fake), ``device``, ``timeout_s``,
``max_concurrency``, ``call_tools`` (False: an upstream that takes no tools; None: the
kind's default, see ``Backend.can_call_tools``), ``max_response_bytes`` (upstream).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from models.base import Backend

# the embedded reference pair's specs: every command's default backends
REFERENCE_SPECS: dict[str, str] = {"transformer": "reference:transformer",
                                   "hybrid": "reference:hybrid"}
# an upstream response body (or stream) larger than this is refused (kind upstream)
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024

# kind -> "module:function(cfg, role, torch_threads) -> Backend"
REFERENCE_BUILD = "models.reference_pair:build"  # kind hf, path reference:ARCH
KINDS: dict[str, str] = {
    "hf": "models.hf:build",
    "upstream": "models.upstream:build",
    "fake": "models.fake:build",
}


class BackendSpecError(ValueError):
    """A backend spec or config that cannot be built; the message says why."""


class Config(Protocol):
    """What :func:`build` reads (``BackendSettings`` and :class:`BackendConfig` both are);
    read-only, so a narrower field type (``device: str``) still fits."""

    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def path(self) -> str | None: ...
    @property
    def device(self) -> str | None: ...
    @property
    def base_url(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def api_key(self) -> Any: ...  # str | SecretStr | None
    @property
    def timeout_s(self) -> float: ...
    @property
    def max_concurrency(self) -> int | None: ...
    @property
    def fake_reply(self) -> str: ...
    @property
    def fake_delay_s(self) -> float: ...
    @property
    def fake_tool_calls(self) -> list[dict[str, Any]] | None: ...
    @property
    def call_tools(self) -> bool | None: ...
    @property
    def max_response_bytes(self) -> int: ...


@dataclass
class BackendConfig:
    """A backend's config outside the router's settings (CLI specs, the harness)."""

    name: str
    kind: str = "hf"
    path: str | None = None
    device: str | None = None  # None: CUDA when available, else CPU
    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    timeout_s: float = 60.0
    max_concurrency: int | None = None
    fake_reply: str = "Hello from the fake backend."
    fake_delay_s: float = 0.0
    fake_tool_calls: list[dict[str, Any]] | None = None
    call_tools: bool | None = None
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES


def parse_spec(spec: str, role: str | None = None) -> dict[str, Any]:
    """The config fields a spec stands for (see the module docstring), as a dict the
    router's settings and :class:`BackendConfig` both accept. ``role`` names the default
    for names that the spec does not give (``fake-hybrid``)."""
    if not spec:
        raise BackendSpecError("empty backend spec")
    if spec == "fake" or spec.startswith("fake:"):
        out: dict[str, Any] = {"name": f"fake-{role}" if role else "fake", "kind": "fake"}
        if spec.startswith("fake:"):
            out["fake_reply"] = spec[5:]
        return out
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if not model:
            raise BackendSpecError(f"{spec}: give the upstream's model as URL#MODEL "
                                   "(e.g. http://127.0.0.1:8001/v1#allenai/Olmo-3-7B-Instruct)")
        return {"name": model.replace("/", "-"), "kind": "upstream", "base_url": url,
                "model": model}
    if spec.startswith("reference:"):
        return {"name": f"reference-{spec.split(':', 1)[1]}", "kind": "hf", "path": spec}
    return {"name": Path(spec).name or spec, "kind": "hf", "path": spec}


def build(cfg: Config, role: str | None = None, torch_threads: int | None = None) -> Backend:
    """The backend ``cfg`` describes (loads model weights for kind ``hf``). ``role``
    (transformer / hybrid) is the architecture a kind that cannot tell states."""
    target = KINDS.get(cfg.kind)
    if target is None:
        raise BackendSpecError(f"unknown backend kind {cfg.kind!r}; known: {', '.join(KINDS)}")
    if cfg.kind == "hf" and (cfg.path or "").startswith("reference:"):
        target = REFERENCE_BUILD  # the embedded pair: kind hf from the shipped folder
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)(cfg, role, torch_threads)


def from_spec(spec: str, role: str | None = None, name: str | None = None,
              torch_threads: int | None = None, **fields: Any) -> Backend:
    """A backend from a spec string; ``fields`` override config fields (``device``,
    ``max_concurrency``, ...)."""
    cfg = BackendConfig(**{**parse_spec(spec, role), **fields})
    if name:
        cfg.name = name
    return build(cfg, role, torch_threads)
