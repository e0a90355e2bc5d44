"""Where relative data paths and the shipped configs resolve.

Configs name shipped assets relative to the repository root (`data/tokenizer`,
`data/shapes`) and are normally run from there. So that a run started from another
directory (a notebook, a test, an experiment script) still finds them, a relative path that
does not exist under the current directory falls back to the checkout that holds this
package, and then to the copy a non-editable install carries: the wheel ships `configs/`,
`data/tokenizer` and `data/shapes` under `lightning_moe/_shipped/` (setup.py), because an
installed package has no checkout around it. Paths that exist as given, and absolute paths,
are used unchanged.
"""

from pathlib import Path

# lightning_moe/paths.py -> repository root (only meaningful for a source checkout).
REPO_ROOT = Path(__file__).resolve().parents[1]
# what a wheel carries instead of the checkout (absent in a checkout)
SHIPPED_ROOT = Path(__file__).resolve().parent / "_shipped"


def shipped_path(relative: str | Path) -> Path:
    """A shipped file or directory named relative to the repository root (`configs/mole/lora.yaml`,
    `data/shapes`): the checkout's, else the installed package's copy. Raises FileNotFoundError naming
    both places when neither holds it."""
    for root in (REPO_ROOT, SHIPPED_ROOT):
        if (root / relative).exists():
            return root / relative
    raise FileNotFoundError(f"{relative} is neither in the checkout ({REPO_ROOT / relative}) nor in the installed "
                            f"package ({SHIPPED_ROOT / relative})")


def resolve_data_path(path: str | Path) -> Path:
    """`path` itself if it exists (or is absolute), else the same path under the repo root or the installed
    package's shipped copy if one exists there."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    for root in (REPO_ROOT, SHIPPED_ROOT):
        if (root / path).exists():
            return root / path
    return path
