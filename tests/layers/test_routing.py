"""Routers and routing losses against Hugging Face's Mixtral code and hand-computed cases."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lightning_moe.layers import (
    BalanceForm,
    RouterOutput,
    TopKRouter,
    capacity_drop,
    expert_capacity,
    load_balancing_loss,
    register_balance_form,
    router_z_loss,
)
from lightning_moe.layers import routing as routing_module
from lightning_moe.layers.routing import balance_forms


def routing_from_logits(logits: torch.Tensor, k: int, normalize: bool = True) -> RouterOutput:
    probs = logits.float().softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return RouterOutput(logits=logits, probs=probs, indices=idx, weights=w)


def test_router_computes_in_float32_for_bf16_input_and_autocast():
    router = TopKRouter(16, 4, 2)
    x = torch.randn(6, 16)
    ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x)
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32
    torch.testing.assert_close(out.logits, ref.logits)  # autocast did not reach the router
    low = router(x.bfloat16())
    assert low.logits.dtype == torch.float32
    torch.testing.assert_close(low.logits, F.linear(x.bfloat16().float(), router.proj.weight))


def test_router_topk_weights_renormalised_and_ordered():
    router = TopKRouter(8, 6, 3)
    out = router(torch.randn(2, 5, 8))  # leading dims are flattened
    assert out.indices.shape == (10, 3) and out.logits.shape == (10, 6)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(10))
    chosen = out.probs.gather(-1, out.indices)
    assert torch.all(chosen[:, :-1] >= chosen[:, 1:])
    assert torch.equal(out.indices[:, 0], out.probs.argmax(-1))
    raw = TopKRouter(8, 6, 3, normalize=False)
    raw.load_state_dict(router.state_dict())
    torch.testing.assert_close(raw(torch.ones(1, 8)).weights, router(torch.ones(1, 8)).probs.topk(3).values)


def test_noisy_second_choice_never_repeats_first_choice_and_is_off_in_eval():
    router = TopKRouter(8, 4, 2, noisy_second_choice=True)
    x = torch.randn(500, 8)
    out = router(x)
    assert torch.equal(out.indices[:, 0], out.probs.argmax(-1))
    assert torch.all(out.indices[:, 0] != out.indices[:, 1])
    clean_second = out.probs.topk(2).indices[:, 1]
    assert (out.indices[:, 1] != clean_second).any()  # the Gumbel noise does change choices
    router.eval()
    assert torch.equal(router(x).indices, out.probs.topk(2).indices)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_balance_loss_equals_hf_load_balancing_loss_func(k):
    logits = torch.randn(24, 6)
    ours = load_balancing_loss(routing_from_logits(logits, k), form="switch")
    theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=k)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_switch_balance_loss_with_padding_mask_equals_hf_over_layers_concatenated():
    batch, seq, E, k = 3, 7, 4, 2
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    layers = [torch.randn(batch * seq, E) for _ in range(3)]
    routing = [routing_from_logits(lg, k) for lg in layers]
    theirs = load_balancing_loss_func(tuple(layers), num_experts=E, top_k=k, attention_mask=mask)
    ours = load_balancing_loss(routing, mask, form="switch", layers="concat")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    # the default convention sums the per-layer losses
    per_layer = sum(load_balancing_loss_func((lg,), num_experts=E, top_k=k, attention_mask=mask) for lg in layers)
    torch.testing.assert_close(load_balancing_loss(routing, mask), per_layer, rtol=1e-6, atol=0)
    torch.testing.assert_close(load_balancing_loss(routing, mask, layers="mean"), per_layer / 3, rtol=1e-6, atol=0)


def test_balance_loss_ignores_padding_tokens():
    logits = torch.randn(10, 4)
    mask = torch.tensor([1] * 6 + [0] * 4, dtype=torch.bool)
    changed = logits.clone()
    changed[6:] = torch.randn(4, 4) * 10
    for form in ("switch", "gshard", "mole"):
        a = load_balancing_loss(routing_from_logits(logits, 2), mask, form=form)
        b = load_balancing_loss(routing_from_logits(changed, 2), mask, form=form)
        c = load_balancing_loss(routing_from_logits(logits[:6], 2), form=form)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_gshard_balance_loss_matches_deepspeed_formula_and_balanced_value_is_one():
    logits = torch.randn(32, 8)
    gates = logits.softmax(-1)
    me = gates.mean(0)
    ce = F.one_hot(gates.argmax(-1), 8).float().mean(0)
    deepspeed = torch.mean(me * ce) * 8 * 8  # deepspeed/moe/sharded_moe.py top1/top2gating
    torch.testing.assert_close(load_balancing_loss(routing_from_logits(logits, 2), form="gshard"), deepspeed)
    # perfectly balanced: uniform probabilities, top-1 spread evenly over experts
    uniform = RouterOutput(
        logits=torch.zeros(8, 8),
        probs=torch.full((8, 8), 1 / 8),
        indices=torch.arange(8)[:, None].repeat(1, 2),
        weights=torch.ones(8, 2) / 2,
    )
    assert load_balancing_loss(uniform, form="gshard").item() == pytest.approx(1.0)
    assert load_balancing_loss(uniform, form="switch").item() == pytest.approx(2.0)  # balanced = k


def test_mole_balance_loss_value_and_straight_through_gradient():
    logits = torch.randn(16, 3, requires_grad=True)
    loss = load_balancing_loss(routing_from_logits(logits, 1), form="mole")
    p = logits.softmax(-1)
    y_hard = F.one_hot(p.argmax(-1), 3).float()
    c = y_hard - p.detach() + p  # LLaVA-MoLE reference
    ref = (p.mean(0) * c.mean(0)).sum()
    torch.testing.assert_close(loss, ref)
    (g_ours,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)


def test_router_z_loss_is_masked_mean_of_squared_logsumexp_summed_over_layers():
    a, b = torch.randn(6, 4) * 3, torch.randn(6, 4)
    mask = torch.tensor([1, 1, 0, 1, 0, 1])
    expected = sum(
        (torch.log(torch.exp(lg.double()).sum(-1)) ** 2)[mask.bool()].mean() for lg in (a, b)
    ).float()
    ours = router_z_loss([routing_from_logits(a, 1), routing_from_logits(b, 1)], mask)
    torch.testing.assert_close(ours, expected)


def test_capacity_drops_exactly_the_tokens_deepspeed_top2_drops():
    # 6 tokens, 3 experts, top-2, capacity_factor 0.5: capacity = ceil(6/3 * 0.5 * 2) = 2
    assert expert_capacity(6, 3, 2, 0.5, min_capacity=0) == 2
    assert expert_capacity(6, 3, 2, 0.5, min_capacity=4) == 4
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [1, 2]])
    # DeepSpeed queues first choices in token order, then second choices after all first ones:
    # expert 0: first choices of t0, t1, t2 -> t2 is the 3rd (dropped); t3's second choice dropped
    # expert 1: first choices of t3, t5 fill it -> second choices of t0, t2, t4 dropped
    # expert 2: first choice of t4, then second choice of t1 -> both kept; t5's second dropped
    expected = torch.tensor(
        [[False, True], [False, False], [True, True], [False, True], [False, True], [False, True]]
    )
    assert torch.equal(capacity_drop(indices, 3, capacity=2), expected)


def test_capacity_drop_matches_deepspeed_cumsum_locations():
    # independent re-statement of deepspeed.moe.sharded_moe.top2gating's location arithmetic
    indices = torch.randint(0, 5, (40, 1)).repeat(1, 2)
    indices[:, 1] = (indices[:, 0] + torch.randint(1, 5, (40,))) % 5
    mask1, mask2 = F.one_hot(indices[:, 0], 5), F.one_hot(indices[:, 1], 5)
    loc1 = torch.cumsum(mask1, 0) - 1
    loc2 = torch.cumsum(mask2, 0) - 1 + mask1.sum(0, keepdim=True)
    cap = expert_capacity(40, 5, 2, 1.0, 0) - 7
    kept1 = (mask1 * (loc1 < cap)).sum(1).bool()
    kept2 = (mask2 * (loc2 < cap)).sum(1).bool()
    assert torch.equal(capacity_drop(indices, 5, cap), torch.stack([~kept1, ~kept2], 1))


def test_routing_losses_of_one_real_token_and_without_a_mask():
    """One real token (the counts' denominator is 1), and z-loss with no mask (a plain mean)."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    only_first = torch.tensor([1, 0])
    p = logits[0].double().softmax(-1)
    # switch, top-1 of one token: E * f_0 * P_0 with f = one-hot of its choice
    assert load_balancing_loss(routing_from_logits(logits, 1), only_first, form="switch").item() == pytest.approx(
        3 * p[0].item(), rel=1e-6)
    lse = torch.logsumexp(logits.double(), -1) ** 2
    assert router_z_loss(routing_from_logits(logits, 1), only_first).item() == pytest.approx(lse[0].item(), rel=1e-6)
    assert router_z_loss(routing_from_logits(logits, 1)).item() == pytest.approx(lse.mean().item(), rel=1e-6)


def test_routing_loss_options_are_checked_by_name():
    routing = routing_from_logits(torch.randn(4, 3), 1)
    with pytest.raises(ValueError, match=r"^form must be one of \['gshard', 'mole', 'switch'\] \(register_balance_form "
                                         r"adds one\), got 'dense'$"):
        load_balancing_loss(routing, form="dense")
    with pytest.raises(ValueError, match="^layers must be 'sum', 'mean' or 'concat', got 'max'$"):
        load_balancing_loss(routing, layers="max")


def test_a_registered_balance_form_is_a_form_of_the_loss(monkeypatch):
    monkeypatch.setattr(routing_module, "_BALANCE_FORMS", dict(routing_module._BALANCE_FORMS))  # this test's own
    # "top1_switch": the Switch form counting only first choices; with top-1 routing it equals "switch"
    register_balance_form("top1_switch", BalanceForm(all_slots=False))
    logits = torch.randn(12, 4)
    torch.testing.assert_close(load_balancing_loss(routing_from_logits(logits, 1), form="top1_switch"),
                               load_balancing_loss(routing_from_logits(logits, 1), form="switch"))
    with pytest.raises(ValueError, match="'top1_switch' is already registered"):
        register_balance_form("top1_switch", BalanceForm(all_slots=True))
    # the MoLE kind's form is registered beside its layer (layers/adapters/mole.py)
    assert balance_forms()["mole"].straight_through and not balance_forms()["gshard"].straight_through
    # registering the same form again (a module imported twice) is no error: forms compare by value
    register_balance_form("mole", BalanceForm(all_slots=False, times_experts=False, straight_through=True))
