"""Build the reference corpus from text that installs offline (Debian packages + the
Python standard library on disk).

The corpus itself never goes in git; this script rebuilds it deterministically::

    python -m models.training.corpus --out data/corpus            # full corpus (~25 MB)
    python -m models.training.corpus --out /tmp/c --domains code --max-mb 0.5   # smoke

Output: ``train.jsonl`` and ``val.jsonl`` (one document per line: id, domain, source,
text) and ``manifest.json`` (sources, licences, sizes, split). The held-out split is by
document: a stable hash of the document id puts ~3% of each domain in ``val``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import re
import subprocess
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VAL_SHARE = 0.05


@dataclass(frozen=True)
class Source:
    """One corpus source: a domain, a Debian package (or None for on-disk files), a licence."""

    domain: str
    package: str | None
    licence: str
    max_mb: float


SOURCES: dict[str, Source] = {
    # domain -> source. Licences are those in each package's copyright file.
    "code": Source("code", None, "PSF-2.0 (CPython standard library)", 8.0),
    "rest": Source("rest", "python3.11-doc", "PSF-2.0 (Python documentation)", 5.0),
    "html": Source("html", "python3.11-doc", "PSF-2.0 (Python documentation HTML)", 2.0),
    "html_debian": Source("html", "debian-reference-en", "GPL-2+ (Debian Reference)", 1.5),
    "markdown": Source("markdown", "nodejs-doc", "MIT (Node.js API docs)", 3.0),
    "tex": Source("tex", "texlive-latex-base-doc", "LPPL-1.3c and others (TeX Live docs)", 3.0),
    "tex_rec": Source("tex", "texlive-latex-recommended-doc", "LPPL-1.3c and others (TeX Live docs)", 2.5),
    "dict": Source("dict", "dict-gcide", "GPL-3+ (GCIDE, from Webster's 1913 + WordNet)", 2.5),
}


def _extract(package: str, cache: Path) -> Path:
    """``apt-get download`` + ``dpkg-deb -x`` a package into ``cache`` (no install)."""
    root = cache / package
    if (root / ".done").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    log.info("fetching Debian package %s (apt-get download from this machine's Debian "
             "archive; unpacked with dpkg-deb, nothing installed)", package)
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True,
                             text=True)
        if got.returncode != 0:
            raise SystemExit(
                f"corpus: `apt-get download {package}` failed (it needs apt and a reachable "
                f"Debian archive that carries {package}): {got.stderr.strip()[-300:]}")
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    (root / ".done").touch()
    return root


_NAV = re.compile(
    r'<div class="(?:related|sphinxsidebar|footer|navheader|navfooter|toc)"[^>]*>.*?</div>\s*',
    re.S)


def clean_html(text: str) -> str:
    """Keep the page body's markup; drop head, scripts and navigation boilerplate (the
    pilot found navigation dominated HTML's long repeats)."""
    m = re.search(r"<body[^>]*>(.*)</body>", text, re.S)
    body = m.group(1) if m else text
    m = re.search(r'<div class="body" role="main">(.*?)<div class="sphinxsidebar"', body, re.S)
    if m:
        body = m.group(1)
    body = re.sub(r"<script.*?</script>", "", body, flags=re.S)
    body = _NAV.sub("", body)
    body = re.sub(r"\n\s*\n+", "\n\n", body)
    return body.strip()


def _gcide_entries(dict_dz: Path) -> Iterator[tuple[str, str]]:
    """GCIDE entries grouped into documents of ~50 headwords (by first letter order)."""
    text = gzip.open(dict_dz, "rt", encoding="utf-8", errors="replace").read()
    entries = re.split(r"\n(?=\S)", text)
    entries = [e for e in entries if not e.startswith("00-database")]
    for i in range(0, len(entries), 50):
        yield f"gcide/{i // 50:05d}", "\n".join(entries[i:i + 50])


def iter_documents(name: str, cache: Path) -> Iterator[tuple[str, str]]:
    """Yield (doc_id, text) for one source, in a deterministic order."""
    src = SOURCES[name]
    if name == "code":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for p in sorted(stdlib.rglob("*.py")):
            rel = p.relative_to(stdlib)
            if rel.parts[0] in {"site-packages", "test", "idlelib", "lib2to3", "__pycache__"}:
                continue
            yield f"stdlib/{rel}", p.read_text(encoding="utf-8", errors="replace")
        return
    assert src.package is not None
    root = _extract(src.package, cache)
    if name == "rest":
        for p in sorted((root / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt")):
            yield f"pydoc-rst/{p.name}", p.read_text(encoding="utf-8", errors="replace")
    elif name == "html":
        base = root / "usr/share/doc/python3.11/html"
        # hash order, not alphabetical: the size cap then keeps a mix of every section
        for p in sorted(base.rglob("*.html"), key=lambda q: hashlib.sha1(str(q).encode()).hexdigest()):
            if "_sources" in p.parts or p.name in {"genindex.html", "search.html"} or "genindex" in p.name:
                continue
            yield f"pydoc-html/{p.relative_to(base)}", clean_html(p.read_text(encoding="utf-8", errors="replace"))
    elif name == "html_debian":
        for p in sorted((root / "usr/share/debian-reference").glob("*.en.html")):
            yield f"debref/{p.name}", clean_html(p.read_text(encoding="utf-8", errors="replace"))
    elif name == "markdown":
        for p in sorted((root / "usr/share/doc/nodejs").rglob("*.md.gz")):
            yield f"nodejs/{p.name}", gzip.open(p, "rt", encoding="utf-8", errors="replace").read()
    elif name in {"tex", "tex_rec"}:
        for p in sorted(root.rglob("*.tex")) + sorted(root.rglob("*.tex.gz")):
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rt", encoding="utf-8", errors="replace") as fh:  # type: ignore[operator]
                yield f"{name}/{p.relative_to(root)}", fh.read()
    elif name == "dict":
        yield from _gcide_entries(root / "usr/share/dictd/gcide.dict.dz")


def is_val(doc_id: str) -> bool:
    h = int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < VAL_SHARE


def build(out: Path, domains: list[str] | None, cache: Path, max_mb: float | None) -> dict:
    """Write train/val JSONL and the manifest; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"val_share": VAL_SHARE, "sources": {}}
    with open(out / "train.jsonl", "w") as ftr, open(out / "val.jsonl", "w") as fva:
        for name, src in SOURCES.items():
            if domains and src.domain not in domains:
                continue
            cap = (max_mb if max_mb is not None else src.max_mb) * 1e6
            size = n_train = n_val = 0
            for doc_id, text in iter_documents(name, cache):
                text = text.strip()
                if len(text) < 200:
                    continue
                if size >= cap:
                    break
                size += len(text.encode())
                rec = {"id": doc_id, "domain": src.domain, "source": name, "text": text}
                if is_val(doc_id):
                    fva.write(json.dumps(rec) + "\n")
                    n_val += 1
                else:
                    ftr.write(json.dumps(rec) + "\n")
                    n_train += 1
            manifest["sources"][name] = {
                "domain": src.domain, "package": src.package, "licence": src.licence,
                "bytes": size, "train_docs": n_train, "val_docs": n_val,
            }
            log.info("%s: %.2f MB, %d train / %d val docs", name, size / 1e6, n_train, n_val)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/corpus"))
    p.add_argument("--cache", type=Path, default=Path("data/debs"), help="where packages are unpacked")
    p.add_argument("--domains", nargs="*", help=f"subset of {sorted({s.domain for s in SOURCES.values()})}")
    p.add_argument("--max-mb", type=float, help="cap per source in MB (overrides the defaults)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(a.out, a.domains, a.cache, a.max_mb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
