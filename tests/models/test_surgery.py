"""Surgery: upcycling keeps the model's function; layer specs; freeze groups; older records replay."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.layers import SparseMoE
from lightning_moe.models import (MoEConfig, build_multimodal, canonical_log, decoder_layers, replay_surgery,
                                  set_trainable, upcycle)
from lightning_moe.models import resolve_layers
from tests.conftest import TINY_LLM, tiny_encoders


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-phi"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_model_computes_what_the_dense_model_did(tokenizer, llm, top_k):
    model = build_multimodal(tokenizer, llm, {**TINY_LLM, "num_hidden_layers": 4}, tiny_encoders()).eval()
    ids = torch.randint(10, len(tokenizer), (2, 12))
    mask = torch.ones_like(ids)
    dense = model(ids, mask).logits
    chosen = upcycle(model, MoEConfig(num_experts=4, top_k=top_k, layers="::2"))
    assert chosen == [0, 2]
    layers = decoder_layers(model.llm)
    assert [isinstance(layers[i].mlp, SparseMoE) for i in range(4)] == [True, False, True, False]
    torch.testing.assert_close(model(ids, mask).logits, dense, rtol=1e-5, atol=1e-5)


def test_layer_specs():
    assert resolve_layers("::2", 5) == [0, 2, 4]
    assert resolve_layers("1::2", 5) == [1, 3]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers([-1, 0], 4) == [0, 3]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([7], 4)
    with pytest.raises(ValueError, match="slice"):
        resolve_layers("every other", 4)


def test_unknown_parameter_group_is_an_error(tokenizer):
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders())
    with pytest.raises(ValueError, match="unknown parameter groups"):
        set_trainable(model, ["decoder"])


def test_a_methods_extra_groups_join_the_generic_ones(tokenizer):
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders())
    norms = {"norms": lambda m: (p for n, p in m.llm.named_parameters() if "norm" in n)}
    trainable = set_trainable(model, ["norms", "connector"], norms)
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("connectors.")
                         or (n.startswith("llm.") and "norm" in n)}
    with pytest.raises(ValueError, match=r"unknown parameter groups \['norms'\]; known: \['adapters', 'connector', "
                                         r"'llm', 'moe', 'vision'\]"):
        set_trainable(model, ["norms"])


def test_an_older_modality_experts_record_replays_as_the_upcycle_it_was(tokenizer):
    """Uni-MoE's upcycling was logged under its own op, with one slot per expert; it reads as an `upcycle`."""
    old = {"op": "modality_experts", "experts": ["dense", "image", "audio"], "top_k": 2, "layers": [0, 1],
           "normalize_weights": True, "capacity_factor": None}
    upcycled = {"op": "upcycle", **vars(MoEConfig(num_experts=3, top_k=2, layers=[0, 1]))}
    assert canonical_log([old]) == [upcycled]
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders())
    replay_surgery(model, [old])
    assert model.surgery == [upcycled]
    reference = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders())
    upcycle(reference, MoEConfig(num_experts=3, top_k=2, layers=[0, 1]))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(moe.top_k == 2 and moe.num_experts == 3 for moe in (layer.mlp for layer in decoder_layers(model.llm)))
