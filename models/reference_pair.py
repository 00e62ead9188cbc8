"""The embedded reference pair: a tiny Olmo 3 and a tiny Olmo Hybrid trained here
(see models/reference/README.md for the model card and models/training/train_reference.py for the
recipe). Shipped as safetensors, so everything runs offline."""

from __future__ import annotations

from pathlib import Path

from models.hf import HFBackend, hf_kwargs

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


def build(cfg, role: str | None = None, torch_threads: int | None = None) -> HFBackend:
    """The registry's factory for kind ``hf`` with path ``reference:ARCH`` (the embedded
    pair); the model's own architecture, whatever ``role`` says."""
    from models.registry import BackendSpecError

    del role
    arch = cfg.path.split(":", 1)[1]
    if arch not in ARCHS:
        raise BackendSpecError(f"{cfg.path}: unknown reference model {arch!r}; expected "
                               f"reference:{' or reference:'.join(ARCHS)}")
    return load_reference(arch, name=cfg.name, **hf_kwargs(cfg, torch_threads))
