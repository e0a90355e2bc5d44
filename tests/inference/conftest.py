"""Fixtures for inference tests: a tiny multimodal model with two random 4-expert MoE layers, and its store."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.inference.store import expert_layers, export_store
from lightning_moe.models import MoEConfig, build_multimodal, upcycle
from tests.conftest import TINY_LLM, tiny_encoders


def make_sparse_model(tokenizer, seed: int = 0, num_experts: int = 4):
    """Upcycled experts are identical copies: re-initialise them (and the router) so routing matters."""
    torch.manual_seed(seed)
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1))
    upcycle(model, MoEConfig(num_experts=num_experts, top_k=2, layers="all"))
    for _, moe in expert_layers(model):
        moe.reset_parameters()
        torch.nn.init.normal_(moe.router.proj.weight, std=0.5)
    return model.eval()


def prompt_batch(model, batch: int = 2, length: int = 7, seed: int = 1):
    """LEFT-padded prompts with one image placeholder each, and their images."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 60, (batch, length), generator=g)  # ids below 10 are special tokens
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0  # the second sample is shorter: left padding
    ids[:, 3] = model.placeholder_ids["image"]
    return ids, mask, torch.randn(batch, 3, 32, 32, generator=g)


@pytest.fixture
def sparse_model(tokenizer):
    return make_sparse_model(tokenizer)


@pytest.fixture
def store(sparse_model, tmp_path):
    return export_store(sparse_model, tmp_path / "store")
