"""Shared fixtures for the layer tests: tiny shapes, float32, deterministic seeds, 1 thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
