"""MoE-tuning: exact trainable sets per stage, and the stage-3 upcycling invariant."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.methods import BackboneConfig, MoETuning
from lightning_moe.models import MoEConfig
from tests.conftest import TINY_LLM, TOKENIZER, tiny_encoders

BACKBONE = dict(llm="tiny-llama", llm_overrides=TINY_LLM, encoders=tiny_encoders())


def make(stage, **kwargs):
    kwargs.setdefault("backbone", BackboneConfig(**BACKBONE))
    return MoETuning(stage=stage, tokenizer=TOKENIZER, moe=MoEConfig(num_experts=4, top_k=2, layers="::2"), **kwargs)


def trainable(method):
    return {n for n, p in method.model.named_parameters() if p.requires_grad}


def all_params(method, *prefixes):
    return {n for n, _ in method.model.named_parameters() if n.startswith(prefixes)}


def test_align_trains_only_the_connector():
    method = make("align")
    assert trainable(method) == all_params(method, "connectors.")
    assert trainable(method) == {"connectors.image.0.weight", "connectors.image.0.bias",
                                 "connectors.image.2.weight", "connectors.image.2.bias"}


def test_instruct_trains_llm_and_connector_not_the_vision_tower():
    method = make("instruct")
    assert trainable(method) == all_params(method, "connectors.", "llm.")
    assert not any(n.startswith("encoders.") for n in trainable(method))


def test_moe_trains_experts_routers_and_connector_only():
    method = make("moe")
    expected = all_params(method, "connectors.", "llm.model.layers.0.mlp.")  # 2 layers, "::2" -> layer 0
    assert trainable(method) == expected
    assert "llm.model.layers.0.mlp.router.proj.weight" in expected
    assert not any(n.startswith("llm.model.layers.1.") for n in trainable(method))


def test_trainable_mlp_trains_every_dense_mlp_and_the_connector():
    # the dense control of stage 3 (lightning_moe.experiments.moe_llava): every decoder layer's MLP, nothing else
    method = make("instruct", trainable=["mlp", "connector"])
    assert trainable(method) == all_params(method, "connectors.", "llm.model.layers.0.mlp.", "llm.model.layers.1.mlp.")
    assert any(".mlp.down_proj." in n for n in trainable(method))


def test_train_vision_tower_adds_the_encoder():
    method = make("instruct", train_vision_tower=True)
    assert trainable(method) == all_params(method, "connectors.", "llm.", "encoders.")


def test_unknown_stage_is_an_error():
    with pytest.raises(ValueError, match="unknown stage"):
        make("pretrain")


def _batch(tokenizer):
    ids = torch.randint(10, len(tokenizer), (2, 9))
    ids[:, 2] = tokenizer.convert_tokens_to_ids("<image>")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.randn(2, 3, 32, 32), "domain": ["a", "b"]}


@pytest.mark.parametrize("source", ["directory", "checkpoint"])
def test_stage3_starts_with_the_stage2_logits(tmp_path, tokenizer, source):
    stage2 = make("instruct").eval()
    with torch.no_grad():  # a trained-looking stage 2, not an initialisation
        for p in stage2.model.llm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if source == "directory":
        stage2.model.save_pretrained(tmp_path / "stage2")
        path = tmp_path / "stage2"
    else:
        checkpoint = {"state_dict": stage2.state_dict()}
        stage2.on_save_checkpoint(checkpoint)
        path = tmp_path / "stage2.ckpt"
        torch.save(checkpoint, path)
    stage3 = make("moe", backbone=BackboneConfig(pretrained=str(path))).eval()
    batch = _batch(tokenizer)
    inputs = stage2.model_inputs(batch)
    with torch.no_grad():
        expected = stage2.model(**inputs).logits
        actual = stage3.model(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert stage3.model.surgery and stage3.model.surgery[0]["op"] == "upcycle"


def test_moe_loss_adds_the_weighted_balance_loss(tokenizer):
    method = make("moe")
    step = method.compute_loss(_batch(tokenizer))
    assert set(step.logs) == {"lm_loss", "aux_loss", "loss"}
    torch.testing.assert_close(step.loss, step.logs["lm_loss"] + 0.01 * step.logs["aux_loss"])
    assert len(step.routing) == 1
    # gshard form, from the router's logits in float64: E^2 * mean_i(mean prob_i * share of top-1 choices of i)
    # over the real tokens (1 when perfectly balanced, E when collapsed)
    routing, real = step.routing[0], step.token_mask.reshape(-1).bool()
    probs = routing.logits.double()[real].softmax(-1)  # (real tokens, E)
    top1 = torch.nn.functional.one_hot(probs.argmax(-1), 4).double()
    expected = 4**2 * (probs.mean(0) * top1.mean(0)).mean()
    assert step.logs["aux_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_training_step_changes_only_trainable_parameters(tokenizer):
    method = make("moe")
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    optimizer = method.configure_optimizers()
    method.compute_loss(_batch(tokenizer)).loss.backward()
    optimizer.step()
    changed = {n for n, p in method.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed <= method.trainable_names
    assert "llm.model.layers.0.mlp.router.proj.weight" in changed and "connectors.image.0.weight" in changed
