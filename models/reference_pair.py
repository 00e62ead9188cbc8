"""The embedded reference pair: a tiny Olmo 3 and a tiny Olmo Hybrid trained here
(see models/reference/README.md for the model card and models/training/train_reference.py for the
recipe). Shipped as safetensors, so everything runs offline."""

from __future__ import annotations

from pathlib import Path

from models.hf import HFBackend

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
ARCHS = ("transformer", "hybrid")


def reference_path(arch: str) -> Path:
    """The directory of one embedded model ('transformer' or 'hybrid')."""
    if arch not in ARCHS:
        raise ValueError(f"unknown reference model {arch!r}; expected one of {ARCHS}")
    path = REFERENCE_DIR / arch
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"embedded model missing: {path} (reinstall, or run the "
                                "reproduce command in models/reference/README.md)")
    return path


def load_reference(arch: str, name: str | None = None, **kwargs) -> HFBackend:
    return HFBackend(name or f"reference-{arch}", reference_path(arch), architecture=arch, **kwargs)


def load_reference_pair(**kwargs) -> tuple[HFBackend, HFBackend]:
    """(transformer, hybrid) backends on the embedded pair."""
    return load_reference("transformer", **kwargs), load_reference("hybrid", **kwargs)


def resolve_backend_spec(spec: str, **kwargs):
    """Deprecated: :func:`models.registry.from_spec` (kept until the last caller moves)."""
    from models.registry import from_spec

    return from_spec(spec, **kwargs)
