"""LoRA, MoLE and MoRA adapters against peft's LoRA `Linear` and definitions written out in float64."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn
from transformers import LlamaConfig, PhiConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.phi.modeling_phi import PhiMLP

from lightning_moe.layers import LoRALinear, MoLEMLP, MoRALinear, load_balancing_loss


def peft_linear(base: nn.Linear, r: int, alpha: float) -> PeftLoraLinear:
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    return PeftLoraLinear(base, "default", cfg, r=r, lora_alpha=alpha)


def test_lora_linear_matches_peft_outputs_and_gradients():
    base = nn.Linear(12, 10)
    ours = LoRALinear(base, r=4, alpha=8)
    theirs = peft_linear(nn.Linear(12, 10), r=4, alpha=8)
    theirs.base_layer.load_state_dict(base.state_dict())
    nn.init.normal_(ours.lora_B.weight)  # B starts at zero; make the update visible
    # same parameter layout and names as peft: copy ours into theirs
    theirs.lora_A["default"].weight.data.copy_(ours.lora_A.weight)
    theirs.lora_B["default"].weight.data.copy_(ours.lora_B.weight)
    assert ours.scaling == theirs.scaling["default"] == 2.0
    x1 = torch.randn(3, 5, 12, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad)
    assert base.weight.grad is None  # frozen base


def test_lora_linear_init_as_peft_and_wraps_base_without_copy():
    base = nn.Linear(64, 32)
    lora = LoRALinear(base, r=8, alpha=16)
    assert lora.base_layer is base and not base.weight.requires_grad
    assert torch.all(lora.lora_B.weight == 0)
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt 5) on fan_in 64
    assert lora.lora_A.weight.abs().max() <= bound and lora.lora_A.weight.abs().max() > 0.8 * bound
    torch.testing.assert_close(lora(torch.ones(2, 64)), base(torch.ones(2, 64)))  # B = 0: no change


@pytest.mark.parametrize("exact", [True, False])
def test_merged_lora_equals_unmerged_and_merge_is_idempotent(exact):
    base = nn.Linear(16, 8)
    lora = LoRALinear(base, r=4, alpha=4)
    nn.init.normal_(lora.lora_B.weight)
    original = base.weight.detach().clone()
    x = torch.randn(5, 16)
    unmerged = lora(x)
    lora.merge(exact=exact)
    lora.merge(exact=exact)  # twice is a no-op
    assert lora.merged
    torch.testing.assert_close(base.weight, original + lora.lora_B.weight @ lora.lora_A.weight)
    torch.testing.assert_close(lora(x), unmerged)
    lora.unmerge()
    lora.unmerge()
    assert not lora.merged
    if exact:
        assert torch.equal(base.weight, original)
    else:
        torch.testing.assert_close(base.weight, original)
    torch.testing.assert_close(lora(x), unmerged)


def tiny_llama_mlp() -> nn.Module:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2)
    mlp = LlamaMLP(cfg)
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.2)
    return mlp


def randomise_lora_b(mole: MoLEMLP) -> None:
    for b in mole.lora_B.values():
        nn.init.normal_(b, std=0.3)


@pytest.mark.parametrize("scale_by_prob", [True, False])
def test_mole_with_one_expert_equals_plain_lora_on_each_projection(scale_by_prob):
    mlp = tiny_llama_mlp()
    mole = MoLEMLP(mlp, num_experts=1, r=4, alpha=8, scale_by_prob=scale_by_prob)
    randomise_lora_b(mole)
    loras = {}
    for role, name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        lora = LoRALinear(getattr(mlp, name), r=4, alpha=8)
        lora.lora_A.weight.data.copy_(mole.lora_A[role][0])
        lora.lora_B.weight.data.copy_(mole.lora_B[role][0])
        loras[role] = lora
    x = torch.randn(2, 6, 32)
    y = mole(x)
    ref = loras["down"](mlp.act_fn(loras["gate"](x)) * loras["up"](x))
    torch.testing.assert_close(y, ref)  # one expert: p = 1 whether or not the update is scaled
    y.square().sum().backward()
    ref.square().sum().backward()
    for role in loras:
        torch.testing.assert_close(mole.lora_A[role].grad[0], loras[role].lora_A.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mole.lora_B[role].grad[0], loras[role].lora_B.weight.grad, rtol=1e-5, atol=1e-5)


def mole_reference(mole: MoLEMLP, x: torch.Tensor) -> torch.Tensor:
    """Each token through base + its chosen expert's LoRA, token by token, in float64."""
    mlp = mole.mlp.double()
    p = mole.router(x).probs.double()
    out = []
    for t in range(x.shape[0]):
        e = int(p[t].argmax())
        s = mole.scaling * (p[t, e] if mole.scale_by_prob else 1.0)

        def proj(role, lin, h):
            return lin(h) + s * mole.lora_B[role][e].double() @ (mole.lora_A[role][e].double() @ h)

        xt = x[t].double()
        if mole.gated:
            h = mlp.act_fn(proj("gate", mlp.gate_proj, xt)) * proj("up", mlp.up_proj, xt)
            out.append(proj("down", mlp.down_proj, h))
        else:
            out.append(proj("down", mlp.fc2, mlp.activation_fn(proj("up", mlp.fc1, xt))))
    mole.mlp.float()
    return torch.stack(out).float()


@pytest.mark.parametrize("make_mlp", [tiny_llama_mlp, lambda: PhiMLP(PhiConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2))])
@pytest.mark.parametrize("scale_by_prob", [True, False])
def test_mole_each_token_runs_only_its_top1_expert(make_mlp, scale_by_prob):
    mole = MoLEMLP(make_mlp(), num_experts=3, r=4, alpha=8, scale_by_prob=scale_by_prob)
    randomise_lora_b(mole)
    nn.init.normal_(mole.router.proj.weight, std=1.0)  # spread tokens over the experts
    x = torch.randn(20, 32)
    y = mole(x)
    assert len(torch.unique(mole.last_routing.indices)) == 3
    torch.testing.assert_close(y, mole_reference(mole, x), rtol=1e-5, atol=1e-5)
    # the router learns from the task loss only when the update is scaled by p
    y.sum().backward()
    router_grad = mole.router.proj.weight.grad
    assert (router_grad is not None and router_grad.abs().sum() > 0) == scale_by_prob
    assert all(p.grad is None for p in mole.mlp.parameters())  # base frozen
    # the balance loss trains the router in either mode
    mole.zero_grad()
    mole(x)
    load_balancing_loss(mole.last_routing, form="mole").backward()
    assert mole.router.proj.weight.grad.abs().sum() > 0


def test_mora_with_all_ranks_equals_weighted_rank1_sum_in_float64():
    base = nn.Linear(10, 6)
    mora = MoRALinear(base, r=5, alpha=10, temperature=0.7)
    nn.init.normal_(mora.lora_B[0])
    x = torch.randn(4, 10)
    y = mora(x)
    assert torch.all(mora.last_active_ranks == 5)
    A, B, xd = mora.lora_A[0].double(), mora.lora_B[0].double(), x.double()
    expected = []
    for t in range(4):
        z = torch.stack([A[i] @ xd[t] for i in range(5)])  # A_i x
        s = z / torch.sqrt(sum(z[j] ** 2 for j in range(5)))
        w = torch.exp(s / 0.7) / torch.exp(s / 0.7).sum()
        delta = sum(w[i] * B[:, i] * z[i] for i in range(5))
        expected.append(base.weight.double() @ xd[t] + base.bias.double() + 2.0 * delta)
    torch.testing.assert_close(y.double(), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_mora_budget_and_threshold_limit_active_ranks():
    mora = MoRALinear(nn.Linear(16, 8), r=8, alpha=8, top_k=3)
    x = torch.randn(7, 16)
    mora(x)
    assert torch.all(mora.last_active_ranks == 3)
    pruned = MoRALinear(nn.Linear(16, 8), r=8, alpha=8, threshold=0.2)
    pruned.load_state_dict(mora.state_dict())
    nn.init.normal_(pruned.lora_B[0])
    y = pruned(x)
    z = x @ pruned.lora_A[0].t()
    s = z / z.norm(dim=-1, keepdim=True)
    assert torch.equal(pruned.last_active_ranks, (s >= 0.2).sum(-1))
    # pruned ranks contribute nothing: zeroing their B columns changes no output
    w = torch.softmax(s, -1) * (s >= 0.2)
    torch.testing.assert_close(y, pruned.base_layer(x) + (w * z) @ pruned.lora_B[0].t() * pruned.scaling)


def test_mora_add_task_freezes_earlier_ranks_bit_identical_after_training():
    mora = MoRALinear(nn.Linear(8, 8), r=2, alpha=2)
    opt = torch.optim.AdamW([p for p in mora.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 8)
    for _ in range(3):
        opt.zero_grad()
        mora(x).square().mean().backward()
        opt.step()
    mora.add_task(3)
    assert mora.r == 5 and [a.shape[0] for a in mora.lora_A] == [2, 3]
    frozen = [p.detach().clone() for p in (mora.lora_A[0], mora.lora_B[0])]
    opt = torch.optim.AdamW(mora.parameters(), lr=0.1, weight_decay=0.1)  # even if handed in
    for _ in range(3):
        opt.zero_grad()
        mora(x).square().mean().backward()
        opt.step()
    assert torch.equal(mora.lora_A[0], frozen[0]) and torch.equal(mora.lora_B[0], frozen[1])
    assert mora.lora_A[0].grad is None
    assert mora.lora_B[1].abs().sum() > 0  # the new task's ranks did train
    assert not mora.base_layer.weight.requires_grad
