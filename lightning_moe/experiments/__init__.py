"""Experiments: one file per question a paper asks, run through the CLI's classes
(`python -m lightning_moe.experiments.<name> --out DIR [--quick]`). Shared helpers live here."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run inside `path` (the configs' relative `runs/...` outputs land there; `contextlib.chdir` is
    Python 3.11+). Also hides the script's own argv from LightningCLI, which warns when it gets both."""
    previous, argv = Path.cwd(), sys.argv
    os.chdir(path)
    sys.argv = argv[:1]
    try:
        yield
    finally:
        os.chdir(previous)
        sys.argv = argv
