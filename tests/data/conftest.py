"""Fixtures of the data tests (the shipped `tokenizer` fixture comes from tests/conftest.py)."""

from pathlib import Path

import pytest

from lightning_moe.data.synthetic import generate


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """The shapes data set with 24 train and 6 val/test records per domain."""
    root = tmp_path_factory.mktemp("shapes")
    generate(root, n_train=24, n_eval=6)
    return root
