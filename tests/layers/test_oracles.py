"""The experiments' oracles inside the adapter layers: MoLE's forced expert per sample (routing by domain)
and MoRA's forced task (each input selects among its own task's ranks only), against independent references:
the float64 per-token MoLE reference with the forced expert, and a MoRA layer holding only that task's ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_moe.layers import MoLEMLP, MoRALinear
from tests.layers.test_lora import randomise_lora_b, tiny_llama_mlp


def forced_reference(mole: MoLEMLP, x: torch.Tensor, experts: list[int]) -> torch.Tensor:
    """Sample b's tokens through base + expert experts[b]'s LoRA with weight 1, token by token, in float64."""
    mlp = mole.mlp.double()
    out = torch.empty(x.shape, dtype=torch.float64)
    for b, e in enumerate(experts):
        def proj(role, lin, h):
            return lin(h) + mole.scaling * mole.lora_B[role][e].double() @ (mole.lora_A[role][e].double() @ h)

        for t in range(x.shape[1]):
            xt = x[b, t].double()
            h = mlp.act_fn(proj("gate", mlp.gate_proj, xt)) * proj("up", mlp.up_proj, xt)
            out[b, t] = proj("down", mlp.down_proj, h)
    mole.mlp.float()
    return out.float()


@pytest.mark.parametrize("scale_by_prob", [True, False])
def test_mole_forced_expert_routes_every_token_of_a_sample_to_its_expert(scale_by_prob):
    mole = MoLEMLP(tiny_llama_mlp(), num_experts=3, r=4, alpha=8, scale_by_prob=scale_by_prob)
    randomise_lora_b(mole)
    nn.init.normal_(mole.router.proj.weight, std=1.0)  # the router alone would spread the tokens
    x = torch.randn(3, 5, 32)
    mole.forced_expert = torch.tensor([2, 0, 2])
    y = mole(x)
    assert mole.last_routing.indices[:, 0].tolist() == [2] * 5 + [0] * 5 + [2] * 5
    assert torch.all(mole.last_routing.weights == 1)
    torch.testing.assert_close(y, forced_reference(mole, x, [2, 0, 2]), rtol=1e-5, atol=1e-5)
    # the forced routing differs from the router's own (else this test would not tell them apart)
    mole.forced_expert = None
    assert not torch.allclose(mole(x), y)
    # one index per sample, inside the experts
    mole.forced_expert = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="one expert index per sample"):
        mole(x)
    mole.forced_expert = torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="outside the 3 experts"):
        mole(x)


def test_mora_forced_task_equals_a_layer_holding_only_that_tasks_ranks():
    base = nn.Linear(12, 6)
    mora = MoRALinear(base, r=3, alpha=6, temperature=0.5, top_k=2)
    mora.add_task(3)
    for b in mora.lora_B:
        nn.init.normal_(b)
    x = torch.randn(2, 4, 12)
    mora.forced_task = torch.tensor([1, 0])
    y = mora(x)
    for sample, task in enumerate([1, 0]):
        alone = MoRALinear(base, r=3, alpha=6, temperature=0.5, top_k=2)  # same scaling alpha / r
        alone.lora_A[0].data.copy_(mora.lora_A[task])
        alone.lora_B[0].data.copy_(mora.lora_B[task])
        torch.testing.assert_close(y[sample], alone(x[sample]))
        assert torch.all(mora.last_active_ranks[sample] == alone.last_active_ranks)
    # without the oracle the ranks of both tasks compete: a different output
    mora.forced_task = None
    assert not torch.allclose(mora(x), y)


def test_mora_forced_task_without_ranks_yet_leaves_the_base_output():
    mora = MoRALinear(nn.Linear(8, 4), r=2, alpha=2)
    nn.init.normal_(mora.lora_B[0])
    x = torch.randn(2, 3, 8)
    mora.forced_task = torch.tensor([1, 0])  # task 1 has no ranks yet
    y = mora(x)
    torch.testing.assert_close(y[0], mora.base_layer(x[0]))
    assert torch.all(mora.last_active_ranks[0] == 0) and torch.all(mora.last_active_ranks[1] > 0)
    assert not torch.allclose(y[1], mora.base_layer(x[1]))
    mora.forced_task = torch.tensor([0])
    with pytest.raises(ValueError, match="one task index per sample"):
        mora(x)
