"""Documents to analyse: a JSONL file (fields id, domain, text) or a directory of files.

A directory holding ``{split}.jsonl`` is read as that file (the reference corpus layout,
``data/corpus/val.jsonl``). Any other directory is walked: each text file is a document
whose domain is its first subdirectory when it has one, else its extension.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = {".py", ".js", ".mjs", ".ts", ".c", ".h", ".html", ".htm", ".md", ".tex",
                 ".sty", ".rst", ".txt", ".json", ".xml", ".css", ".sh", ".yaml", ".yml"}


@dataclass(frozen=True)
class Document:
    id: str
    domain: str
    text: str


def _files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    if (path / f"{split}.jsonl").exists():
        return [path / f"{split}.jsonl"]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such corpus file or directory")
    return sorted(p for p in path.rglob("*") if p.is_file() and
                  (p.suffix.lower() in TEXT_SUFFIXES or p.suffix == ".jsonl"))


def load_corpus(path: str | Path, split: str = "val") -> list[Document]:
    """All documents of a corpus, in a stable order (file order, then line order)."""
    path = Path(path)
    docs: list[Document] = []
    for f in _files(path, split):
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh):
                    if line.strip():
                        d = json.loads(line)
                        docs.append(Document(str(d.get("id", f"{f.name}:{n}")),
                                             str(d.get("domain", "text")), d["text"]))
            continue
        rel = f.relative_to(path) if path.is_dir() else Path(f.name)
        domain = rel.parts[0] if len(rel.parts) > 1 else (f.suffix.lstrip(".").lower() or "text")
        docs.append(Document(str(rel), domain, f.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise ValueError(f"{path}: no documents found")
    return docs


def corpus_fingerprint(docs: list[Document]) -> str:
    """A content hash of the documents (ids, domains and texts), for cache keys."""
    h = hashlib.sha1()
    for d in docs:
        for part in (d.id, d.domain, d.text):
            h.update(part.encode("utf-8", "replace"))
            h.update(b"\0")
    return h.hexdigest()
