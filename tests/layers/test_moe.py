"""`SparseMoE` against Hugging Face's Mixtral block, dense MLPs (upcycling) and a per-token loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, MixtralConfig, PhiConfig
from transformers.models.clip.modeling_clip import CLIPMLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.phi.modeling_phi import PhiMLP

import lightning_moe.layers.grouped as grouped
from lightning_moe.layers import SparseMoE, collect_routing
from lightning_moe.layers.moe import get_activation, run_sorted_experts


def mixtral_block(hidden: int, inter: int, experts: int, k: int) -> MixtralSparseMoeBlock:
    cfg = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_local_experts=experts,
        num_experts_per_tok=k,
        experts_implementation="eager",
    )
    block = MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    return block


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3e} > {rel} x max |expected| {scale:.3e}"


def naive_moe(moe: SparseMoE, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token-by-token, slot-by-slot reference written from the definition."""
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for s in range(indices.shape[1]):
            e = indices[t, s]
            h = moe.w_in[e] @ x[t] + (moe.b_in[e] if moe.b_in is not None else 0)
            if moe.gated:
                g, u = h.chunk(2)
                h = moe.act_fn(g) * u
            else:
                h = moe.act_fn(h)
            y = moe.down_proj[e] @ h + (moe.down_bias[e] if moe.down_bias is not None else 0)
            acc = acc + weights[t, s] * y
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize(
    "batch,seq,hidden,inter,experts,k",
    [
        (2, 9, 32, 64, 4, 2),
        (1, 2, 32, 48, 8, 2),  # 2 tokens x top-2 reach at most 4 of 8 experts
        (3, 5, 30, 20, 6, 3),  # odd sizes: grouped_mm alignment fails, loop path
        (2, 16, 64, 32, 4, 1),
        (1, 3, 512, 256, 4, 2),  # few rows, large experts: the transposed small-batch matmul path
    ],
)
def test_from_mixtral_matches_hf_block_outputs_and_gradients(batch, seq, hidden, inter, experts, k):
    block = mixtral_block(hidden, inter, experts, k)
    moe = SparseMoE.from_mixtral(block)
    x_hf = torch.randn(batch, seq, hidden, requires_grad=True)
    x_ours = x_hf.detach().clone().requires_grad_()
    y_hf, y_ours = block(x_hf), moe(x_ours)
    assert y_ours.shape == y_hf.shape and y_ours.dtype == y_hf.dtype
    assert_rel_close(y_ours, y_hf)
    grad = torch.randn_like(y_hf)
    y_hf.backward(grad)
    y_ours.backward(grad)
    assert_rel_close(x_ours.grad, x_hf.grad)
    assert_rel_close(moe.gate_up_proj.grad, block.experts.gate_up_proj.grad)
    assert_rel_close(moe.down_proj.grad, block.experts.down_proj.grad)
    assert_rel_close(moe.router.proj.weight.grad, block.gate.weight.grad)
    hit = torch.bincount(moe.last_routing.indices.reshape(-1), minlength=experts)
    if batch * seq * k < experts:
        assert (hit == 0).any()
        # experts that got no token get an exact zero gradient (not garbage from an empty buffer)
        assert torch.all(moe.gate_up_proj.grad[hit == 0] == 0)


def test_grouped_mm_and_loop_dispatch_agree(monkeypatch):
    block = mixtral_block(32, 64, 4, 2)
    moe = SparseMoE.from_mixtral(block)
    x = torch.randn(40, 32)
    assert grouped.grouped_mm_supported(x, moe.gate_up_proj.transpose(1, 2)) == hasattr(
        torch.nn.functional, "grouped_mm"
    )
    y1 = moe(x)
    y1.square().sum().backward()
    g1 = moe.gate_up_proj.grad.clone()
    moe.zero_grad()
    monkeypatch.setattr(grouped, "grouped_mm_supported", lambda *a: False)
    y2 = moe(x)
    y2.square().sum().backward()
    assert_rel_close(y2, y1, 1e-6)
    assert_rel_close(moe.gate_up_proj.grad, g1, 1e-6)


@pytest.mark.parametrize("rows", [[0, 3, 5, 0], [1, 2, 0, 1], [80, 0, 9, 60]])
def test_grouped_linear_matches_per_expert_matmul_forward_and_backward(rows):
    # (4, 512, 512) experts take the transposed small-batch path for few rows, grouped_mm for many
    weight = torch.randn(4, 512, 512, requires_grad=True)
    x = torch.randn(sum(rows), 512, requires_grad=True)
    offs = grouped.make_offsets(rows, x.device)
    y = grouped.grouped_linear(x, weight, rows, offs)
    bounds = torch.tensor([0] + rows).cumsum(0).tolist()
    ref = torch.cat([x[bounds[e] : bounds[e + 1]] @ weight[e].t() for e in range(4)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, weight), g)
    rx, rw = torch.autograd.grad(ref, (x, weight), g)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-4)
    assert all(torch.all(gw[e] == 0) for e in range(4) if rows[e] == 0)


def llama_mlp() -> nn.Module:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2)
    return LlamaMLP(cfg)


def phi_mlp() -> nn.Module:
    return PhiMLP(PhiConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2))


def clip_mlp() -> nn.Module:
    return CLIPMLP(CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2))


class GPTLikeMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("make_mlp", [llama_mlp, phi_mlp, clip_mlp, GPTLikeMLP])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_upcycled_moe_matches_dense_mlp(make_mlp, k):
    mlp = make_mlp()
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.2)
    moe = SparseMoE.from_dense(mlp, num_experts=4, top_k=k)
    x = torch.randn(3, 7, 32)
    # every expert is the dense MLP and the gate weights sum to 1: float32 rounding only
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-6)
    # in float64 (loop path: no float64 grouped_mm) the only error left is the float32 gate
    # weights' sum (router is float32 by design): ~1e-7 relative, 100x below the float32 check
    mlp64, moe64 = mlp.double(), moe.double()
    torch.testing.assert_close(moe64(x.double()), mlp64(x.double()), rtol=2e-7, atol=1e-8)


def test_upcycling_copies_biases_and_keeps_router_new():
    mlp = phi_mlp()
    moe = SparseMoE.from_dense(mlp, num_experts=3, top_k=2)
    assert not moe.gated and moe.up_bias is not None
    for e in range(3):
        assert torch.equal(moe.up_proj[e], mlp.fc1.weight) and torch.equal(moe.up_bias[e], mlp.fc1.bias)
        assert torch.equal(moe.down_proj[e], mlp.fc2.weight) and torch.equal(moe.down_bias[e], mlp.fc2.bias)
    assert moe.router.proj.weight.dtype == torch.float32
    assert moe.router.proj.weight.abs().max() < 0.2  # small init: no expert preferred at start
    assert "router.proj.weight" in moe.state_dict()


def test_upcycling_unknown_mlp_layout_names_the_attributes_found():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc, self.c_proj = nn.Linear(4, 8), nn.Linear(8, 4)

    with pytest.raises(ValueError, match="c_fc.*c_proj"):
        SparseMoE.from_dense(Odd(), 4, 2)


@pytest.mark.parametrize("gated,bias", [(True, True), (False, True), (False, False)])
def test_moe_matches_per_token_reference_with_biases_and_gradients(gated, bias):
    moe = SparseMoE(16, 24, 5, 2, gated=gated, bias=bias, activation="gelu")
    with torch.no_grad():
        for p in (moe.b_in, moe.down_bias):
            if p is not None:
                p.normal_()
    x = torch.randn(11, 16)
    y = moe(x)
    r = moe.last_routing
    ref = naive_moe(moe, x, r.indices, r.weights)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    params = [p for p in moe.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(y.square().sum(), params, retain_graph=True, allow_unused=True)
    ref = naive_moe(moe, x, r.indices, moe.router(x).weights)
    g_ref = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_mode_drops_overflow_pairs_and_renormalises_kept_weights():
    moe = SparseMoE(8, 16, 3, 2, capacity_factor=0.5, min_capacity=0)
    with torch.no_grad():  # route by hand: router logits = x[:, :3] * 10
        moe.router.proj.weight.zero_()
        moe.router.proj.weight[:, :3] = torch.eye(3) * 10
    prefs = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 1], [1, 2]])
    x = torch.randn(6, 8)
    x[:, :3] = 0
    x[torch.arange(6), prefs[:, 0]] = 1.0
    x[torch.arange(6), prefs[:, 1]] = 0.5
    y = moe(x)
    r = moe.last_routing
    assert torch.equal(r.indices, prefs)
    # capacity 2, same case as tests/layers/test_routing.py: DeepSpeed drops these pairs
    dropped = torch.tensor([[0, 1], [0, 0], [1, 1], [0, 1], [0, 1], [0, 1]], dtype=torch.bool)
    assert torch.equal(r.dropped, dropped)
    # a token left with one slot gets weight 1 on it; t2 lost both slots and outputs 0
    expected_w = torch.tensor([[1.0, 0.0], [0, 0], [0, 0], [1, 0], [1, 0], [1, 0]])
    p = r.probs.gather(1, prefs)
    expected_w[1] = p[1] / p[1].sum()
    torch.testing.assert_close(r.weights, expected_w)
    ref = naive_moe(moe, x, prefs, r.weights)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert torch.all(y[2] == 0)
    # gradients through the scatter-add path (used when pairs drop) match the reference too
    params = [moe.gate_up_proj, moe.down_proj, moe.router.proj.weight]
    g_ours = torch.autograd.grad(y.square().sum(), params, retain_graph=True)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # eval uses eval_capacity_factor; without one it keeps the training factor
    moe.eval_capacity_factor = 10.0
    moe.eval()
    moe(x)
    assert not moe.last_routing.dropped.any()


def test_bf16_and_autocast_keep_router_fp32_and_output_dtype():
    moe = SparseMoE(32, 64, 4, 2)
    x = torch.randn(2, 8, 32)
    ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.float32  # same dtype as the input
    assert moe.last_routing.logits.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=0.05, atol=0.02)
    moe_bf16 = SparseMoE(32, 64, 4, 2)
    moe_bf16.load_state_dict(moe.state_dict())
    moe_bf16.gate_up_proj.data = moe_bf16.gate_up_proj.data.bfloat16()
    moe_bf16.down_proj.data = moe_bf16.down_proj.data.bfloat16()
    y16 = moe_bf16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    y16.float().sum().backward()
    assert moe_bf16.gate_up_proj.grad.dtype == torch.bfloat16
    assert moe_bf16.router.proj.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y16.float(), ref, rtol=0.05, atol=0.02)


def test_moe_accepts_an_empty_batch():
    moe = SparseMoE(8, 16, 4, 2)
    y = moe(torch.randn(0, 3, 8))
    assert y.shape == (0, 3, 8)


def test_collect_routing_returns_every_moe_layer_of_a_model():
    model = nn.Sequential(SparseMoE(8, 16, 4, 2), nn.Linear(8, 8), SparseMoE(8, 16, 4, 1))
    assert collect_routing(model) == []
    model(torch.randn(3, 8))
    routing = collect_routing(model)
    assert [r.top_k for r in routing] == [2, 1]


def test_from_experts_matches_qwen2_moe_block_with_shared_expert_outputs_and_gradients():
    """Qwen2-MoE: no renormalisation of the top-k weights, a shared expert gated by sigmoid(Linear(H, 1))."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
                         num_experts_per_tok=2, norm_topk_prob=False, experts_implementation="eager")
    block = Qwen2MoeSparseMoeBlock(cfg)
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    moe = SparseMoE.from_experts(block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, 2,
                                 normalize_weights=False, shared_expert=block.shared_expert,
                                 shared_expert_gate=block.shared_expert_gate.weight)
    x_hf = torch.randn(2, 7, 32, requires_grad=True)
    x_ours = x_hf.detach().clone().requires_grad_()
    y_hf, y_ours = block(x_hf), moe(x_ours)
    assert_rel_close(y_ours, y_hf)
    grad = torch.randn_like(y_hf)
    y_hf.backward(grad)
    y_ours.backward(grad)
    assert_rel_close(x_ours.grad, x_hf.grad)
    assert_rel_close(moe.shared_expert.up_proj.weight.grad, block.shared_expert.up_proj.weight.grad)
    assert_rel_close(moe.shared_expert_gate.weight.grad, block.shared_expert_gate.weight.grad)
    assert_rel_close(moe.router.proj.weight.grad, block.gate.weight.grad)
    # without the shared expert the output differs: the test sees it
    moe.shared_expert = None
    assert not torch.allclose(moe(x_ours), y_hf, atol=1e-4)


@pytest.mark.parametrize("kernel", ["grouped_mm", "loop"])
@pytest.mark.parametrize("gated", [True, False])
def test_run_sorted_experts_matches_a_per_expert_loop_and_ignores_the_tail(gated, kernel, monkeypatch):
    """The local expert computation on sorted rows (what an expert-parallel exchange hands over): each
    row through its own expert, rows after offsets[-1] output 0 and pass no gradient anywhere; with
    grouped_mm, and with the per-expert loop eager falls back to where grouped_mm cannot run."""
    if kernel == "loop":
        monkeypatch.setattr(grouped, "grouped_mm_supported", lambda *a: False)
    elif not grouped.grouped_mm_supported(torch.ones(8, 8), torch.ones(2, 8, 8)):
        pytest.skip("this torch has no grouped_mm kernel for float32 on the CPU")
    E, H, I, rows = 3, 16, 24, [4, 0, 5]
    n_in = 2 * I if gated else I
    act = get_activation("silu" if gated else "gelu")
    w_in, w_down = torch.randn(E, n_in, H, requires_grad=True), torch.randn(E, H, I, requires_grad=True)
    b_in, b_down = torch.randn(E, n_in, requires_grad=True), torch.randn(E, H, requires_grad=True)
    x = torch.randn(sum(rows) + 3, H, requires_grad=True)  # 3 rows of a dropped tail
    offsets = torch.tensor(rows, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    y = run_sorted_experts(x, offsets, w_in, w_down, b_in, b_down, act, gated, masked_tail=True)
    expert = torch.repeat_interleave(torch.arange(E), torch.tensor(rows))
    ref = []
    for r, e in enumerate(expert.tolist()):
        h = w_in[e] @ x[r] + b_in[e]
        a = act(h[:I]) * h[I:] if gated else act(h)
        ref.append(w_down[e] @ a + b_down[e])
    ref = torch.cat([torch.stack(ref), torch.zeros(3, H)])
    assert_rel_close(y, ref)
    g = torch.randn_like(y)
    ours = torch.autograd.grad(y, (x, w_in, w_down, b_in, b_down), g)
    theirs = torch.autograd.grad(ref, (x, w_in, w_down, b_in, b_down), g, allow_unused=True)
    assert torch.all(ours[0][-3:] == 0)
    for a, b in zip(ours, theirs):
        assert_rel_close(a, torch.zeros_like(a) if b is None else b)


@pytest.mark.parametrize("options", [{}, {"capacity_factor": 1.0, "min_capacity": 1, "bias": True},
                                     {"gated": False, "activation": "gelu", "shared_expert_size": 8}])
def test_grouped_and_sorted_dispatch_agree_in_eager(options, monkeypatch):
    """The grouped dispatch (tensor offsets, what torch.compile traces and eager CUDA runs) against the sorted
    one (Python counts), float32 on the CPU where both run, with dropped pairs too."""
    if not grouped.grouped_mm_supported(torch.ones(8, 8), torch.ones(2, 8, 8)):
        pytest.skip("this torch has no grouped_mm kernel for float32 on the CPU")
    moe = SparseMoE(16, 24, 4, 2, **options)
    with torch.no_grad():
        moe.router.proj.weight.normal_(std=1.0)
        for name, p in moe.named_parameters():
            if name.endswith("_bias"):
                p.normal_(std=0.1)
    x, g = torch.randn(30, 16), torch.randn(30, 16)
    results = {}
    for path in ("sorted", "grouped"):
        monkeypatch.setattr(moe, "dispatch_path", lambda dtype, device, path=path: path)
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = moe(xi)
        out.backward(g)
        results[path] = [out.detach(), xi.grad] + [p.grad for p in moe.parameters()]
    if options.get("capacity_factor"):
        assert moe.last_routing.dropped.any()
    for a, b in zip(results["grouped"], results["sorted"]):
        assert_rel_close(a, b)
