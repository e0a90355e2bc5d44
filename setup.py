"""Packaging hook (everything else is in pyproject.toml): the wheel carries the shipped configs and data.

A non-editable install (`pip install .`) has no checkout around the package, yet the experiments and
the quickstart name `configs/...`, `data/tokenizer`, `data/shapes` and `data/retention`. They are copied into the wheel
under `lightning_moe/_shipped/`, where `lightning_moe.paths` looks when no checkout holds them. They
live at the repository root for the people who read and edit them, so they are copied at build time
rather than moved into the package. An editable install finds the checkout itself and copies nothing.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("configs", "data/tokenizer", "data/shapes", "data/retention")  # keep in step with MANIFEST.in (the sdist)


class BuildPyWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for relative in SHIPPED:
            source = ROOT / relative
            if not source.is_dir():
                raise FileNotFoundError(f"setup.py: {source} is missing; the wheel would not run its configs")
            shutil.copytree(source, Path(self.build_lib) / "lightning_moe" / "_shipped" / relative, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
