"""Shared test fixtures: one small CPU configuration every test reuses (tiny widths, no workers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "data" / "tokenizer")

# Smaller than the quickstart preset: tests need shapes, not learning.
TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}


# `make test` runs one pytest-xdist worker per core: torch's default of one thread per core in every worker
# would oversubscribe the CPU (tests that depend on the thread count set it themselves)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    from lightning_moe.tokens import load_tokenizer

    return load_tokenizer(TOKENIZER)


@pytest.fixture
def in_repo_root(monkeypatch):
    """Configs name paths relative to the repository root, as users run them."""
    monkeypatch.chdir(ROOT)
    return ROOT



def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run first (in collection order; the rest keep theirs). Under `make test` (pytest-xdist,
    `--dist loadgroup`, which hands out one test at a time) a long test handed out last would run alone while the
    other worker idles; handed out first, the short tests fill in around it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow (False) first
