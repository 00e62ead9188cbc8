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


TUNED_IDS_FILE = "sft_data.json"  # in a model directory: the requests it was tuned on (#22)


def tuned_request_ids(*locations: str | Path | None) -> tuple[frozenset[str], list[dict]]:
    """Ids of the shared real requests a model was instruction-tuned on, read from
    ``sft_data.json`` in each model directory given (``models.training.sft export`` writes it
    there); the union, and for each file found its path and sha256. A model scores text it was
    tuned on with a lower loss, so labels, the classifier's tables and span-eval leave these
    out. Directories without the file (the raw-text pair, upstream engines) add nothing."""
    import hashlib
    import json

    ids: set[str] = set()
    found: list[dict] = []
    for loc in locations:
        f = Path(loc) / TUNED_IDS_FILE if loc else None
        if f is None or not f.is_file():
            continue
        raw = f.read_bytes()
        data = json.loads(raw)
        for entry in data.get("requests", {}).get("files", {}).values():
            ids.update(entry.get("ids", ()))
        found.append({"path": str(f), "sha256": hashlib.sha256(raw).hexdigest()})
    return frozenset(ids), found
