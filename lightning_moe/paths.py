"""Where relative data paths resolve.

Configs name shipped assets relative to the repository root (`data/tokenizer`,
`data/shapes`) and are normally run from there. So that a run started from another
directory (a notebook, a test, an experiment script) still finds them, a relative path that
does not exist under the current directory falls back to the checkout that holds this
package. Paths that exist as given, and absolute paths, are used unchanged.
"""

from pathlib import Path

# lightning_moe/paths.py -> repository root (only meaningful for a source checkout).
REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_data_path(path: str | Path) -> Path:
    """`path` itself if it exists (or is absolute), else the same path under the repo root if that exists."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path
