"""Where relative data paths and the shipped configs resolve.

Configs name shipped assets relative to the repository root (`data/tokenizer`,
`data/shapes`) and are normally run from there. So that a run started from another
directory (a notebook, a test, an experiment script) still finds them, a relative path that
does not exist under the current directory falls back to the checkout that holds this
package, and then to the copy a non-editable install carries: the wheel ships `configs/`,
`data/tokenizer` and `data/shapes` under `lightning_moe/_shipped/` (setup.py), because an
installed package has no checkout around it. Paths that exist as given, and absolute paths,
are used unchanged.

`model_source_error` is the one wording for a model, tokenizer or checkpoint name that is neither
a local path nor reachable on the Hugging Face Hub (the loaders raise it; cli.py prints it).
"""

import re
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


# A Hugging Face Hub repository id: "name" or "owner/name" of word characters, dots and dashes.
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def could_be_hub_id(name: str | Path) -> bool:
    """Whether `name` may name a Hub repository (else it can only be a local path): `owner/name` form, and not
    under a local directory (`data/tokenzier` is a typo in a path, not a repository of a user "data")."""
    text = str(name)
    if not _HUB_ID.fullmatch(text) or text.startswith((".", "~")) or text.endswith((".ckpt", ".pt")):
        return False
    parent = Path(text).parent
    return parent == Path(".") or not (parent.is_dir() or (REPO_ROOT / parent).is_dir())


def model_source_error(what: str, name: str | Path, error: BaseException | None = None) -> FileNotFoundError:
    """The error for a model, tokenizer or checkpoint name that is neither a local path nor reachable: it names
    the path, where a relative one was looked for, and why the Hub was not asked or what it answered."""
    path = Path(name)
    looked = [str(path.resolve())]
    if not path.is_absolute():
        looked.append(str(REPO_ROOT / path))
    where = " nor ".join(dict.fromkeys(looked))
    if not could_be_hub_id(name):
        hub = "and it cannot be a Hugging Face Hub id"
    else:
        reason = f": {type(error).__name__}: {str(error).splitlines()[0]}" if error is not None else ""
        hub = f"and not reachable as a Hugging Face Hub id{reason}"
    return FileNotFoundError(f"{what} {str(name)!r} is neither a local directory or file (no {where}) {hub}")
