"""The base's hooks for what a method adds, used by a method written here (as a user would): its own
parameter group (`parameter_groups`) trains through the freeze plan and `trainable`, and its own loss
term (`extra_losses`) joins the loss, is logged, and moves the parameters through a real training step."""

from __future__ import annotations

import inspect
from typing import Any, Literal

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_moe.methods import BackboneConfig, MoETuning, MultimodalMethod, Stage
from tests.conftest import TINY_LLM, TOKENIZER, tiny_encoders

BACKBONE = BackboneConfig(llm="tiny-llama", llm_overrides=TINY_LLM, encoders=tiny_encoders())


def norm_weights(model):
    return (p for name, p in model.llm.named_parameters() if "norm" in name)


class NormTuning(MultimodalMethod):
    """Trains only the LLM's normalisation weights, pulled toward 1 by an L2 term."""

    STAGES = {"norms": Stage(train=["norms"])}

    def __init__(self, stage: Literal["norms"] = "norms", pull: float = 0.5, **kwargs: Any):
        self.pull = pull
        super().__init__(stage=stage, **kwargs)

    def parameter_groups(self):
        return {"norms": norm_weights}

    def extra_losses(self, step, batch):
        return {"norm_pull": (sum(((p - 1) ** 2).sum() for p in norm_weights(self.model)), self.pull)}


def make(**kwargs) -> NormTuning:
    torch.manual_seed(0)
    method = NormTuning(backbone=BACKBONE, tokenizer=TOKENIZER, **kwargs)
    with torch.no_grad():  # away from 1, so that the pull is not zero
        for p in norm_weights(method.model):
            p.copy_(1 + 0.5 * torch.rand_like(p))
    return method


def batch(tokenizer) -> dict[str, Any]:
    ids = torch.randint(10, len(tokenizer), (2, 9))
    ids[:, 2] = tokenizer.convert_tokens_to_ids("<image>")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.randn(2, 3, 32, 32), "domain": ["a", "b"]}


def test_hooks_are_documented_in_the_base():
    doc = inspect.getdoc(MultimodalMethod)
    for hook in ("parameter_groups", "extra_losses"):
        assert f"`{hook}(" in doc and callable(getattr(MultimodalMethod, hook))


def test_a_methods_own_group_trains_through_the_stage_plan_and_trainable():
    method = make()
    norms = {n for n, _ in method.model.named_parameters() if n.startswith("llm.") and "norm" in n}
    assert len(norms) == 2 * TINY_LLM["num_hidden_layers"] + 1  # two per decoder layer and the final one
    assert method.trainable_names == norms
    both = make(trainable=["norms", "connector"])
    assert both.trainable_names == norms | {n for n, _ in both.model.named_parameters() if n.startswith("connectors.")}
    with pytest.raises(ValueError, match=r"unknown parameter groups \['router'\]; known: \[.*'norms'"):
        make(trainable=["router"])  # Uni-MoE's group: declared by UniMoE, not by every method
    with pytest.raises(ValueError, match=r"unknown parameter groups \['norms'\]"):
        MoETuning(stage="instruct", backbone=BACKBONE, tokenizer=TOKENIZER, trainable=["norms"])


def test_an_extra_loss_joins_the_loss_and_the_logs(tokenizer):
    method, inputs = make(), batch(tokenizer)
    step = method.compute_loss(inputs)
    expected = sum(((p.double() - 1) ** 2).sum() for p in norm_weights(method.model))  # float64, by hand
    assert step.logs["norm_pull"].item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(step.loss, step.logs["lm_loss"] + 0.5 * step.logs["norm_pull"])
    assert step.logs["loss"] is step.loss
    # its gradient is coefficient x d(term): 0.5 * 2 (p - 1) beside the LM loss's
    step.loss.backward()
    with_pull = [p.grad.clone() for p in norm_weights(method.model)]
    method.model.zero_grad()
    method.pull = 0.0
    method.compute_loss(inputs).loss.backward()
    for p, total in zip(norm_weights(method.model), with_pull):
        torch.testing.assert_close(total - p.grad, (p - 1).detach(), rtol=1e-4, atol=1e-6)


def test_the_extra_loss_and_group_work_through_a_training_step(tokenizer):
    method = make(pull=100.0, optimizer=lambda params: torch.optim.SGD(params, lr=1e-4))
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, train_dataloaders=DataLoader([batch(tokenizer)], batch_size=None))
    assert "train/norm_pull" in trainer.callback_metrics
    after = dict(method.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(before[n], p)}
    assert changed == method.trainable_names  # the method's group trained, nothing else
    # the pull dominates the step: every norm weight moved toward 1
    for name in changed:
        assert ((after[name] - 1).abs() < (before[name] - 1).abs()).all(), name
