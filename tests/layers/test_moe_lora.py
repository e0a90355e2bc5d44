"""`MoELoRA` (adapter kind "moe_lora"): LoRA on each expert's projections of a SparseMoE, against a
per-expert float64 reference, merge, and which tensors train."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_moe.layers import SparseMoE
from lightning_moe.layers.adapters import MoELoRA, adapter_kind, trainable_adapter_tensors


def reference(moe: SparseMoE, lora: MoELoRA, x: torch.Tensor) -> torch.Tensor:
    """Float64, token by token, expert by expert: W_role + (alpha/r) B A for each chosen expert."""
    routing = moe.router(x)
    x = x.double()
    out = torch.zeros_like(x)
    I = moe.intermediate_size
    for t in range(x.shape[0]):
        for slot in range(routing.indices.shape[1]):
            e, w = routing.indices[t, slot].item(), routing.weights[t, slot].double()
            d = {role: (lora.lora_B[role][e].double() @ lora.lora_A[role][e].double()) * lora.scaling
                 for role in lora.lora_A}
            gate = moe.gate_up_proj[e, :I].double() + d["gate"]
            up = moe.gate_up_proj[e, I:].double() + d["up"]
            down = moe.down_proj[e].double() + d["down"]
            out[t] += w * (down @ (F.silu(gate @ x[t]) * (up @ x[t])))
    return out


def test_moe_lora_starts_as_the_wrapped_layer_and_matches_the_reference():
    moe = SparseMoE(16, 24, num_experts=3, top_k=2)
    lora = MoELoRA(moe, r=4, alpha=8.0)
    x = torch.randn(10, 16)
    torch.testing.assert_close(lora(x), moe(x))  # B = 0
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.normal_()
    torch.testing.assert_close(lora(x).double(), reference(moe, lora, x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(lora(x), moe(x))


def test_moe_lora_merge_equals_unmerged_and_unmerge_restores():
    moe = SparseMoE(16, 24, num_experts=3, top_k=2)
    lora = MoELoRA(moe, r=4, alpha=8.0)
    with torch.no_grad():
        for b in lora.lora_B.values():
            b.normal_()
    x = torch.randn(10, 16)
    before, weights = lora(x), moe.gate_up_proj.detach().clone()
    lora.merge()
    torch.testing.assert_close(moe(x), before, rtol=1e-5, atol=1e-5)
    lora.merge()  # a second merge is a no-op
    torch.testing.assert_close(moe(x), before, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    torch.testing.assert_close(moe.gate_up_proj, weights, rtol=0, atol=1e-6)


def test_only_lora_tensors_train_and_get_gradients():
    moe = SparseMoE(16, 24, num_experts=3, top_k=2)
    lora = MoELoRA(moe, r=4, alpha=8.0)
    names = {n for n, _ in trainable_adapter_tensors(lora)}
    assert names == {f"lora_{ab}.{role}" for ab in "AB" for role in ("gate", "up", "down")}
    lora(torch.randn(10, 16)).sum().backward()
    assert lora.lora_B["down"].grad is not None and lora.lora_B["down"].grad.abs().sum() > 0
    assert moe.gate_up_proj.grad is None and moe.down_proj.grad is None
    assert adapter_kind("moe_lora").mergeable and adapter_kind("moe_lora").target == "mlp"


def test_moe_lora_on_a_plain_fc1_fc2_moe():
    moe = SparseMoE(16, 24, num_experts=2, top_k=1, gated=False, activation="gelu")
    lora = MoELoRA(moe, r=2, alpha=4.0)
    assert set(lora.lora_A) == {"up", "down"}
    with torch.no_grad():
        lora.lora_B["up"].normal_()
    x = torch.randn(5, 16)
    out = lora(x)
    lora.merge()
    torch.testing.assert_close(moe(x), out, rtol=1e-5, atol=1e-5)
