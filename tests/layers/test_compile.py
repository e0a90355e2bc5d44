"""`torch.compile` traces `SparseMoE` in one graph (no graph break), and the compiled layer computes the
eager layer's output and gradients (docs/running_at_scale.md, torch.compile). Backend "aot_eager": the
trace and the autograd graph are built as inductor would get them, without compiling C++ (fast, and
independent of a compiler on the machine); benchmarks/moe_layer.py measures inductor itself.

In bfloat16 the trace takes the grouped dispatch (`run_sorted_experts`): the recorded graphs are read to
check that every expert matmul has T*k rows (dropless), not T*E (every expert on every token)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import AotEagerAndRecordGraphs

import lightning_moe.layers.grouped as grouped
from lightning_moe.layers import SparseMoE
from lightning_moe.layers.grouped import grouped_mm_compiles

KINDS = {
    "dropless": {},
    "capacity_bias": {"capacity_factor": 1.0, "min_capacity": 1, "bias": True},  # some pairs dropped
    "plain_shared": {"gated": False, "activation": "gelu", "shared_expert_size": 8, "shared_expert_gate": True},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_moe_compiles_without_graph_breaks(kind):
    moe = SparseMoE(16, 32, 4, 2, **KINDS[kind])
    explained = torch._dynamo.explain(moe)(torch.randn(2, 5, 16))
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_sparse_moe_matches_eager_output_and_gradients(kind):
    moe = SparseMoE(16, 32, 4, 2, **KINDS[kind])
    with torch.no_grad():  # a router that separates experts, so the top-k choice is not a near tie
        moe.router.proj.weight.normal_(std=1.0)
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 16)
    grad = torch.randn(2, 5, 16)
    results = []
    for module in (moe, compiled):
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.backward(grad)
        results.append((out.detach(), xi.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}))
    (eager_out, eager_gx, eager_g), (comp_out, comp_gx, comp_g) = results
    if KINDS[kind].get("capacity_factor"):
        assert moe.last_routing.dropped.any()  # the case really drops pairs
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp_gx, eager_gx, rtol=1e-5, atol=1e-6)
    assert comp_g.keys() == eager_g.keys()
    for name in eager_g:
        torch.testing.assert_close(comp_g[name], eager_g[name], rtol=1e-5, atol=1e-6, msg=name)


def grouped_mm_calls(graphs) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The operand shapes of every grouped matmul in the recorded aten graphs."""
    return [(tuple(n.args[0].meta["val"].shape), tuple(n.args[1].meta["val"].shape))
            for gm in graphs for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten._grouped_mm.default]


def run_and_grads(module, moe: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor):
    moe.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = module(xi)
    out.backward(grad)
    return out.detach(), xi.grad, {n: p.grad.clone() for n, p in moe.named_parameters() if p.requires_grad}


def sorted_dispatch_copy(moe: SparseMoE) -> SparseMoE:
    """A copy of the layer that takes the Python-counts dispatch, whatever `dispatch_path` would pick."""
    reference = copy.deepcopy(moe)
    reference.dispatch_path = lambda dtype, device: "sorted"
    return reference


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # bfloat16 keeps 8 significant bits: the two sides may round differently (another summation order in
    # the weight gradients, the combine's bmm against eager's); allow two roundings of the largest value
    err = (actual.float() - expected.float()).abs().max().item()
    bound = 2 * 2**-8 * expected.float().abs().max().item()
    assert err <= bound, f"{what}: max abs err {err:.3e} > {bound:.3e}"


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # the recording backend's, harmless
@pytest.mark.skipif(not grouped_mm_compiles(torch.bfloat16, torch.device("cpu")),
                    reason="this torch cannot trace grouped_mm in bfloat16 on the CPU")
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_compiled_sparse_moe_takes_the_dropless_grouped_dispatch(kind):
    """fullgraph=True (a graph break would raise), the compiled layer equal within bfloat16 rounding, forward and
    backward, to the eager layer on the other dispatch (Python counts, its own backward: an independent
    implementation), and the experts computed on T*k rows by grouped_mm, forward and backward."""
    moe = SparseMoE(16, 32, 4, 2, **KINDS[kind]).to(torch.bfloat16)
    with torch.no_grad():
        moe.router.proj.weight.normal_(std=1.0)
        for name, p in moe.named_parameters():
            if name.endswith("_bias"):  # expert biases start at 0: make them count
                p.normal_(std=0.1)
    reference = sorted_dispatch_copy(moe)
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(moe, backend=backend, fullgraph=True)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    grad = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    eager_out, eager_gx, eager_g = run_and_grads(reference, reference, x, grad)
    comp_out, comp_gx, comp_g = run_and_grads(compiled, moe, x, grad)
    if KINDS[kind].get("capacity_factor"):
        assert moe.last_routing.dropped.any()  # the case really drops pairs
    assert_bf16_close(comp_out, eager_out, "output")
    assert_bf16_close(comp_gx, eager_gx, "input gradient")
    assert comp_g.keys() == eager_g.keys()
    for name in eager_g:
        assert_bf16_close(comp_g[name], eager_g[name], name)

    tokens, k, E, H = 2 * 5, 2, 4, 16
    pairs = tokens * k
    forward, backward = grouped_mm_calls(backend.fw_graphs), grouped_mm_calls(backend.bw_graphs)
    n_in, inter = moe.w_in.shape[1], moe.intermediate_size
    # forward: up/gate_up then down, each on the T*k sorted pair rows against the stacked (E, ., .) weights
    assert forward == [((pairs, H), (E, H, n_in)), ((pairs, inter), (E, inter, H))]
    # backward: per projection an input gradient (T*k rows) and a weight gradient (contracting the T*k rows)
    assert len(backward) == 4
    assert all(pairs in a or pairs in b for a, b in backward)
    assert not any(tokens * E in a for a, _ in forward + backward)  # never every expert on every token


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
@pytest.mark.skipif(not grouped_mm_compiles(torch.bfloat16, torch.device("cpu")),
                    reason="this torch cannot trace grouped_mm in bfloat16 on the CPU")
def test_float32_layer_under_bf16_autocast_compiles_to_the_grouped_dispatch_with_dynamic_tokens():
    """bf16-mixed training: float32 parameters, bfloat16 autocast; the token count a symbolic size."""
    moe = SparseMoE(16, 32, 4, 2, capacity_factor=1.0, min_capacity=1, bias=True)
    with torch.no_grad():
        moe.router.proj.weight.normal_(std=1.0)
    reference = sorted_dispatch_copy(moe)
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(moe, backend=backend, fullgraph=True, dynamic=True)
    x, grad = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    results = []
    for module, params in ((reference, reference), (compiled, moe)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xi)
        out.backward(grad)
        results.append([out.detach(), xi.grad] + [p.grad for p in params.parameters()])
    assert results[1][0].dtype == torch.float32
    for ours, theirs in zip(*results):
        assert_bf16_close(ours, theirs, "output or gradient")
    assert len(grouped_mm_calls(backend.fw_graphs)) == 2


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_dispatch_follows_what_grouped_mm_can_trace(dtype):
    """Where this torch cannot trace grouped_mm for the dtype (float32 in torch 2.13), the trace falls back
    to every expert on every token: no grouped_mm node, and still no graph break."""
    moe = SparseMoE(16, 32, 4, 2).to(dtype)
    backend = AotEagerAndRecordGraphs()
    torch.compile(moe, backend=backend, fullgraph=True)(torch.randn(2, 5, 16, dtype=dtype))
    assert bool(grouped_mm_calls(backend.fw_graphs)) == grouped_mm_compiles(dtype, torch.device("cpu"))


@pytest.mark.slow  # inductor compiles the forward and backward graphs to C++: about a minute on 2 shared cores
@pytest.mark.skipif(not grouped_mm_compiles(torch.bfloat16, torch.device("cpu")),
                    reason="this torch cannot trace grouped_mm in bfloat16 on the CPU")
def test_bf16_sparse_moe_compiles_with_inductor():
    moe = SparseMoE(16, 32, 4, 2, capacity_factor=1.0, min_capacity=1, shared_expert_size=8).to(torch.bfloat16)
    with torch.no_grad():
        moe.router.proj.weight.normal_(std=1.0)
    reference = sorted_dispatch_copy(moe)
    compiled = torch.compile(moe, backend="inductor", fullgraph=True)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    grad = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    eager_out, eager_gx, eager_g = run_and_grads(reference, reference, x, grad)
    comp_out, comp_gx, comp_g = run_and_grads(compiled, moe, x, grad)
    assert_bf16_close(comp_out, eager_out, "output")
    assert_bf16_close(comp_gx, eager_gx, "input gradient")
    for name in eager_g:
        assert_bf16_close(comp_g[name], eager_g[name], name)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mole_compiles_without_graph_breaks_and_matches_eager(dtype):
    """MoLE's LoRA experts: the grouped matmuls on offsets where grouped_mm traces (one per projection and
    LoRA factor, T rows each: top-1), else every LoRA expert on every token; the eager answer either way."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from lightning_moe.layers import MoLEMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2))
    mole = MoLEMLP(mlp, num_experts=3, r=8, alpha=16).to(dtype)
    with torch.no_grad():
        mole.router.proj.weight.normal_(std=1.0)
        for b in mole.lora_B.values():  # zero-initialised: make the experts differ
            b.normal_(std=0.1)
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(mole, backend=backend, fullgraph=True)
    x, grad = torch.randn(2, 7, 32, dtype=dtype), torch.randn(2, 7, 32, dtype=dtype)
    eager_out, eager_gx, eager_g = run_and_grads(mole, mole, x, grad)
    comp_out, comp_gx, comp_g = run_and_grads(compiled, mole, x, grad)
    assert len(mole.last_routing.indices.unique()) > 1  # more than one expert in use
    close = assert_bf16_close if dtype == torch.bfloat16 else (
        lambda a, b, what: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what))
    close(comp_out, eager_out, "output")
    close(comp_gx, eager_gx, "input gradient")
    assert comp_g.keys() == eager_g.keys() and sum(name.startswith("lora_") for name in comp_g) == 6
    for name in eager_g:
        close(comp_g[name], eager_g[name], name)
    forward = grouped_mm_calls(backend.fw_graphs)
    if grouped_mm_compiles(dtype, torch.device("cpu")):
        assert len(forward) == 6 and all(a[0] == 14 for a, _ in forward)
    else:
        assert forward == []


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")
def test_a_trace_runs_the_grouped_mm_probes_as_a_constant(monkeypatch):
    """`grouped_mm_compiles` carries `torch.compiler.assume_constant_result`'s marker (set by hand: layers/ does
    not import torch._dynamo), so a trace that meets it before any eager call runs the probes outside the graph."""
    marker = [name for name in vars(torch.compiler.assume_constant_result(lambda: None)) if "constant" in name]
    assert marker and all(getattr(grouped.grouped_mm_compiles, name) is True for name in marker)
    monkeypatch.setattr(grouped, "_PROBED", {})  # nothing probed yet
    monkeypatch.setattr(grouped, "_META_PROBED", {})
    moe = SparseMoE(16, 32, 4, 2).to(torch.bfloat16)
    torch.compile(moe, backend="aot_eager", fullgraph=True)(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert (torch.bfloat16 in grouped._META_PROBED) and ("cpu", torch.bfloat16) in grouped._PROBED
