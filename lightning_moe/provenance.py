"""Where numbers came from: the git commit of the checkout and whether its tree had uncommitted changes,
read when a run starts (experiments and benchmarks alike), and the words every generated section uses.

A dirty tree is said in every section it produced: the numbers may come from code that no commit holds.
"""

from __future__ import annotations

import subprocess
from typing import Any

from .paths import REPO_ROOT


def git_state() -> dict[str, Any]:
    """{"git_commit": the checkout's commit, with `+dirty` when tracked files differ from it (None outside a
    git checkout: an installed wheel), "git_dirty": whether they do}."""
    if not (REPO_ROOT / ".git").exists():
        return {"git_commit": None, "git_dirty": False}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):  # no git program, or not a repository after all
        return {"git_commit": None, "git_dirty": False}
    return {"git_commit": commit + ("+dirty" if dirty else ""), "git_dirty": dirty}


def provenance_words(state: dict[str, Any]) -> str:
    """'commit abc123' or 'commit abc123+dirty (started on a tree with uncommitted changes: the numbers may
    come from code no commit holds)', from a `git_state` (or a results.json `environment` holding one)."""
    commit = state.get("git_commit")
    if not commit:
        return "commit unknown (not a git checkout)"
    dirty = state.get("git_dirty", commit.endswith("+dirty"))
    return f"commit {commit}" + (" (started on a tree with uncommitted changes: the numbers may come from code "
                                 "no commit holds)" if dirty else "")
