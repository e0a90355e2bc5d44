"""`torch.compile` of `MultimodalLM.forward` (docs/running_at_scale.md, torch.compile): the one place it breaks
the graph is the spliced sequence length, `int(totals.max())` in `embed` (a length that depends on how many
items each sample holds), and the compiled model computes the eager model's logits and gradients. Backend
"aot_eager" (the autograd graph inductor would get, without compiling C++)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from lightning_moe.models import MoEConfig, build_multimodal, upcycle
from tests.conftest import TINY_LLM, tiny_encoders


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def sparse_model(tokenizer):
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1))
    upcycle(model, MoEConfig(num_experts=4, top_k=2, layers="::1"))
    return model


def _inputs(model):
    """Right-padded: an image in the middle of sample 0, at the start of sample 1 (which ends early)."""
    image = model.placeholder_ids["image"]
    ids = torch.tensor([[1, 5, image, 7, 8, 2], [1, image, 9, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 7, 8, 2], [-100, -100, 9, 2, -100, -100]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.randn(2, 3, 32, 32)}


def test_multimodal_forward_breaks_the_graph_only_at_the_spliced_length(sparse_model):
    explained = torch._dynamo.explain(sparse_model)(**_inputs(sparse_model))
    # one break, counted in the two frames it stops (forward, and embed inside it): 3 graphs
    assert explained.graph_break_count == 2 and explained.graph_count == 3
    assert {b.user_stack[-1].line.strip() for b in explained.break_reasons} == {"new_length = int(totals.max())"}


def test_compiled_multimodal_forward_matches_eager_logits_and_gradients(sparse_model):
    inputs = _inputs(sparse_model)
    compiled = torch.compile(sparse_model, backend="aot_eager")
    results = []
    for module in (sparse_model, compiled):
        sparse_model.zero_grad(set_to_none=True)
        out = module(**inputs)
        out.logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in sparse_model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp.logits, eager.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(comp.labels, eager.labels) and torch.equal(comp.attention_mask, eager.attention_mask)
    assert comp_grads.keys() == eager_grads.keys() and any("encoders.image" in n for n in eager_grads)
    for name in eager_grads:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
