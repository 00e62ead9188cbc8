"""Artifacts that cannot hurt the process that loads them.

A classifier artifact is parsed by native code (LightGBM's C++ model reader) that aborts the
whole process on some malformed inputs: a ``classifier.txt`` cut to 2,000 bytes is a SIGABRT,
not an exception. So no parser sees a byte that was not checked first:

* :func:`write_atomically` builds an artifact in a temporary sibling folder, fsyncs it and
  renames it into place (an existing artifact folder is swapped out whole), so a reader sees
  the old artifact or the new one, never half of one. The folder's ``manifest.json`` records
  each model file's size and sha256 (:func:`write_manifest`).
* A load reads every file once, into memory, and checks those bytes against the manifest
  (:func:`check_manifest`) before any parser runs; the parsers then read the same bytes.
* An artifact without a manifest (built before manifests, or by hand) is loaded and
  self-checked first in a child process (:func:`check_in_child`): a native abort kills the
  child, and the parent refuses the artifact. The child reports the sha256 of the bytes it
  read; the parent parses only if its own bytes are the same.

``meta.json`` is not in the manifest: only Python's ``json`` reads it, every field is checked
by :func:`classifiers.artifact.load`, and operators may edit it (thresholds); the self-check
recorded in it is replayed on every live reload.

A subprocess rather than ``multiprocessing``: it starts clean (no fork of a threaded server,
no re-import of the server's ``__main__`` as spawn does), its exit signal is read directly,
and it has a plain timeout.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
CHILD_TIMEOUT_S = 120.0  # a child check that takes longer is a refusal
_MARK = "ARCHROUTE-ARTIFACT-CHECK "  # prefixes the child's one result line on stdout
ROOT = Path(__file__).resolve().parents[1]


class ArtifactError(RuntimeError):
    """The artifact is missing, incomplete, altered, or built for different features."""


def shown(path: str | Path) -> str:
    """A path as messages show it: relative to the repository for the shipped artifacts
    (no server layout in answers), else as given."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- writing ---------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, names: Iterable[str]) -> dict:
    """Record the size and sha256 of ``names`` (files in ``folder``) in its manifest."""
    files = {}
    for name in sorted(names):
        data = (folder / name).read_bytes()
        files[name] = {"bytes": len(data), "sha256": sha256(data)}
    manifest = {"manifest_version": MANIFEST_VERSION, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_atomically(path: str | Path, write: Callable[[Path], Iterable[str]],
                     replaceable: Iterable[str]) -> Path:
    """Build the folder ``path`` with ``write(tmp)`` (which returns the names to put in the
    manifest) in a temporary sibling, fsync every file and the folder, then rename it into
    place. An existing ``path`` is replaced only when it holds nothing but ``replaceable``
    names (an artifact folder): it is swapped out in one step where the system allows
    (``renameat2``), else renamed aside first, and then deleted."""
    path = Path(path)
    allowed = {*replaceable, MANIFEST}
    if path.exists():
        if not path.is_dir():
            raise ArtifactError(f"{path} exists and is not a folder")
        other = sorted(p.name for p in path.iterdir() if p.name not in allowed)
        if other:
            raise ArtifactError(f"{path} holds other files ({', '.join(other[:5])}); an "
                                "artifact replaces a folder that holds only an artifact: "
                                "give a new folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        write_manifest(tmp, write(tmp))
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if path.exists():
            if _exchange(tmp, path):
                old = tmp  # the old artifact now sits at the temporary name
            else:
                old = path.with_name(f".{path.name}.old-{tag}")
                os.rename(path, old)
                os.rename(tmp, path)
            _fsync(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
            _fsync(path.parent)
    finally:
        if tmp.exists() and tmp != path:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# --- checking --------------------------------------------------------------------------

def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, None when it has none; :class:`ArtifactError` when it is not
    a manifest."""
    f = folder / MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_bytes())
        files = m["files"]
        ok = (m.get("manifest_version") == MANIFEST_VERSION and isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int)
            and isinstance(v.get("sha256"), str) for v in files.values()))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ArtifactError(f"{shown(f)}: not a valid manifest (expected "
                            f"manifest_version {MANIFEST_VERSION} and each file's bytes and "
                            "sha256); rebuild the artifact with `archroute train`")
    return m


def check_manifest(folder: Path, manifest: dict, blobs: Mapping[str, bytes],
                   covered: Iterable[str]) -> None:
    """Every ``covered`` file present (``blobs``: name -> the bytes read) is listed with its
    size and sha256, and every listed file is present with them; else
    :class:`ArtifactError` naming the first difference."""
    listed = manifest["files"]
    where = shown(folder)
    for name in sorted(set(covered) & set(blobs)):
        if name not in listed:
            raise ArtifactError(f"{where}: {name} is not in {MANIFEST} (an altered or mixed "
                                "artifact); rebuild it with `archroute train`")
    for name, want in sorted(listed.items()):
        data = blobs.get(name)
        if data is None:
            raise ArtifactError(f"{where}: {name} is listed in {MANIFEST} but missing "
                                "(a half-written or partly copied artifact)")
        if len(data) != want["bytes"]:
            raise ArtifactError(f"{where}: {name} is {len(data)} bytes, expected "
                                f"{want['bytes']} ({MANIFEST}): a truncated or half-written "
                                "artifact; nothing was parsed")
        if sha256(data) != want["sha256"]:
            raise ArtifactError(f"{where}: {name} does not match the sha256 in {MANIFEST} "
                                "(an altered or corrupt artifact); nothing was parsed")


def check_in_child(folder: Path, blobs: Mapping[str, bytes], strict: bool,
                   timeout_s: float = CHILD_TIMEOUT_S) -> None:
    """Load and self-check the artifact at ``folder`` in a child Python process; refuse it
    (:class:`ArtifactError`) when the child dies (a native abort), times out, or reports an
    error, or when the bytes it read differ from ``blobs`` (the files changed meanwhile)."""
    cmd = [sys.executable, "-m", "classifiers.artifact", str(folder)]
    if strict:
        cmd.append("--strict")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    where = shown(folder)
    try:
        run = subprocess.run(cmd, capture_output=True, timeout=timeout_s, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"{where}: the isolated load took more than {timeout_s:g} s; "
                            "refused") from None
    lines = [ln for ln in run.stdout.decode("utf-8", "replace").splitlines()
             if ln.startswith(_MARK)]
    if run.returncode < 0 or not lines:
        sig = -run.returncode
        how = (f"was killed by {signal.Signals(sig).name}" if run.returncode < 0
               and sig in signal.Signals._value2member_map_ else
               f"exited with status {run.returncode}")
        raise ArtifactError(f"{where}: loading it crashed the loader (an isolated load "
                            f"{how}): a corrupt or half-written artifact (it has no "
                            f"{MANIFEST}; rebuild it with `archroute train`)")
    out = json.loads(lines[-1][len(_MARK):])
    if out.get("error"):
        raise ArtifactError(out["error"])
    theirs = out.get("files", {})
    ours = {name: sha256(data) for name, data in blobs.items()}
    if theirs != ours:
        raise ArtifactError(f"{where}: its files changed while it was being checked; "
                            "refused (try again once it is written)")
