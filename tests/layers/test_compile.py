"""`torch.compile` traces `SparseMoE` in one graph (no graph break), and the compiled layer computes the
eager layer's output and gradients (docs/running_at_scale.md, torch.compile). Backend "aot_eager": the
trace and the autograd graph are built as inductor would get them, without compiling C++ (fast, and
independent of a compiler on the machine); benchmarks/moe_layer.py measures inductor itself."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from lightning_moe.layers import SparseMoE

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
