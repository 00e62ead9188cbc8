"""On-disk cache of per-request backend results.

One JSONL file per (backend identity, suite content, scoring settings): a header line with
the key, then one record per request, appended as they are computed (so an interrupted run
resumes). Changing the backend's weights or config, the suite's content, or the scoring
settings changes the key, so stale results are never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the record format or the scoring method changes
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _hash_file(h, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def backend_identity(backend) -> dict[str, str]:
    """What identifies a backend's outputs: its name, class, and a content hash of its local
    weights and config (a model directory) or its upstream URL and model name."""
    info = backend.info()
    ident = {"name": info.name, "class": type(backend).__name__,
             "architecture": info.architecture, "location": info.location}
    loc = Path(info.location) if info.location else None
    if loc is not None and loc.is_dir():
        h = hashlib.sha256()
        files = [loc / f for f in _MODEL_FILES if (loc / f).exists()]
        files += sorted(loc.glob("*.safetensors")) + sorted(loc.glob("*.bin"))
        for f in files:
            h.update(f.name.encode() + b"\0")
            _hash_file(h, f)
        ident["weights"] = h.hexdigest()[:16]
    else:
        ident["upstream"] = f"{info.location}#{getattr(backend, 'model', '') or info.name}"
    fp = getattr(backend, "fingerprint", None)  # a backend may state its own identity
    if callable(fp):
        ident["fingerprint"] = str(fp())
    return ident


def cache_key(identity: dict[str, str], suite_hash: str, settings: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "backend": identity, "suite": suite_hash,
                       "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class ResultCache:
    """Records for one key; ``get`` what is there, ``put`` appends."""

    def __init__(self, root: str | Path, key: str, label: str = "", enabled: bool = True) -> None:
        self.enabled = enabled
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)[:60]
        self.path = Path(root) / f"{safe}-{key}.jsonl" if safe else Path(root) / f"{key}.jsonl"
        self.key = key
        self._records: dict[str, dict] = {}
        if enabled and self.path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as f:
            lines = f.read().splitlines()
        if not lines or json.loads(lines[0]).get("key") != self.key:
            log.warning("cache %s: header mismatch, ignoring it", self.path)
            return
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a torn last line from an interrupted run
                continue
            self._records[rec["id"]] = rec

    def get(self, request_id: str) -> dict | None:
        return self._records.get(request_id)

    def __len__(self) -> int:
        return len(self._records)

    def put(self, records: list[dict]) -> None:
        for r in records:
            self._records[r["id"]] = r
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with self.path.open("a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"key": self.key, "version": CACHE_VERSION}) + "\n")
            for r in records:
                f.write(json.dumps(r) + "\n")
