"""Where a result came from: the git commit of this checkout (one implementation for the
artifact metadata, the analysis and the evaluation harness)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_state(root: str | Path = ROOT) -> tuple[str, bool]:
    """(commit hash or "unknown", whether tracked files differ from it). Best effort: no
    git, no repository or a slow git give ("unknown", False)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit, dirty


def git_commit(root: str | Path = ROOT) -> str:
    """The commit hash, or "unknown"."""
    return git_state(root)[0]
