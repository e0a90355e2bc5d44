"""The LM loss: `causal_lm_loss` against float64 and against the transposed form it replaced, and the forward that
computes logits only where the loss reads them (`loss_positions`) against the full forward: the same loss, per-sample
losses and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.methods import BackboneConfig, MoETuning
from lightning_moe.methods.base import causal_lm_loss
from lightning_moe.models import MoEConfig
from lightning_moe.models.multimodal import loss_positions
from lightning_moe.tokens import IGNORE_INDEX
from tests.conftest import TINY_LLM, TOKENIZER, tiny_encoders

VOCAB = 49155  # SmolLM2's with the placeholders (docs/real_model.md): a softmax over as many terms as a real model's


def transposed_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The form `causal_lm_loss` had: cross-entropy over the class dimension of a (B, V, T - 1) view."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    per_sample, counts = token_loss.sum(1), (labels != IGNORE_INDEX).sum(1)
    return per_sample.sum() / counts.sum().clamp(min=1), per_sample, counts


def float64_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The oracle: -log softmax of the next token, summed per sample in float64, by explicit loops."""
    per_sample, counts = torch.zeros(labels.shape[0], dtype=torch.float64), torch.zeros(labels.shape[0], dtype=torch.long)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                per_sample[b] -= torch.log_softmax(logits[b, t].double(), -1)[target]
                counts[b] += 1
    return per_sample.sum() / counts.sum(), per_sample, counts


def answer_batch(seed: int = 0, batch: int = 3, length: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits of a real vocabulary's size; labels trained on a short span near each sample's end (an answer
    of the shapes data), the spans at different places, one sample with no trained token."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, length, VOCAB, generator=generator)
    labels = torch.full((batch, length), IGNORE_INDEX)
    for b, (start, stop) in enumerate([(9, 12), (5, 7)][:batch]):
        labels[b, start:stop] = torch.randint(0, VOCAB, (stop - start,), generator=generator)
    return logits, labels


def test_causal_lm_loss_matches_float64_and_the_transposed_form():
    logits, labels = answer_batch()
    loss, per_sample, counts = causal_lm_loss(logits, labels)
    ref_loss, ref_per_sample, ref_counts = float64_loss(logits, labels)
    assert counts.tolist() == ref_counts.tolist() == [3, 2, 0]
    # float32: each log-softmax sums 49155 exponentials (relative rounding ~1e-6 on a loss of about 10 per token)
    torch.testing.assert_close(per_sample.double(), ref_per_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    # the form it replaced computes the same function, within its own rounding over the same sums
    old_loss, old_per_sample, old_counts = transposed_loss(logits, labels)
    assert old_counts.tolist() == counts.tolist()
    torch.testing.assert_close(per_sample, old_per_sample, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, old_loss, rtol=1e-4, atol=1e-4)


def test_loss_positions_pair_every_trained_label_with_the_logits_before_it():
    _, labels = answer_batch()
    positions = loss_positions(labels)
    assert positions.tolist() == [4, 5, 6, 8, 9, 10, 11]  # predicting labels 5-6 and 9-11, and the positions after
    logits = torch.randn(*labels.shape, 7)
    labels = labels.clamp(max=6).where(labels != IGNORE_INDEX, IGNORE_INDEX)  # a vocabulary of 7 for the logits
    for got, expected in zip(causal_lm_loss(logits[:, positions], labels[:, positions]), causal_lm_loss(logits, labels)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    nothing = torch.full_like(labels, IGNORE_INDEX)
    assert loss_positions(nothing).numel() == 0
    assert causal_lm_loss(logits[:, :0], nothing[:, :0])[0] == 0  # no trained token: a zero loss, as before


@pytest.mark.parametrize("stage", ["instruct", "moe"])
def test_the_loss_logits_only_forward_gives_the_full_forwards_loss_and_gradients(stage, tokenizer):
    torch.manual_seed(0)
    method = MoETuning(stage=stage, tokenizer=TOKENIZER, moe=MoEConfig(num_experts=4, top_k=2, layers="::2"),
                       backbone=BackboneConfig(llm="tiny-llama", llm_overrides=TINY_LLM, encoders=tiny_encoders()))
    placeholders = {tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<audio>", "<video>")}
    words = torch.tensor([i for i in range(10, len(tokenizer)) if i not in placeholders])
    ids = words[torch.randint(0, len(words), (3, 12))]
    ids[:, 1] = tokenizer.convert_tokens_to_ids("<image>")
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a shorter sample, padded on the right
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 9:12], labels[1, 6:8], labels[2, 7:9] = ids[0, 9:12], ids[1, 6:8], ids[2, 7:9]  # the answers
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": torch.randn(3, 3, 32, 32),
             "domain": ["a", "b", "a"]}
    trained = [p for p in method.parameters() if p.requires_grad]

    def loss_and_gradients(loss_logits_only: bool):
        out = method.model(**method.model_inputs(batch), labels=labels, loss_logits_only=loss_logits_only)
        lm_loss, per_sample, counts = causal_lm_loss(out.logits, out.labels)
        routing = method.routing_losses(out.attention_mask, {})[1]
        gradients = torch.autograd.grad(lm_loss + routing, trained, allow_unused=True)
        return out, (lm_loss, per_sample, counts), gradients

    full, full_loss, full_grads = loss_and_gradients(False)
    kept, kept_loss, kept_grads = loss_and_gradients(True)
    spliced = full.logits.shape[1]
    assert full.positions is None and 0 < len(kept.positions) < spliced / 2  # the LM head on a part of the sequence
    torch.testing.assert_close(kept.logits, full.logits[:, kept.positions])
    for got, expected in zip(kept_loss, full_loss):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert int(kept_loss[2].sum()) == 7
    for parameter, got, expected in zip(trained, kept_grads, full_grads):
        if expected is None:
            assert got is None
        else:  # float32 sums over different rows: rounding of the LM head's gradient
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    step = method.compute_loss(batch)  # what training and evaluation run: the positions the loss reads
    torch.testing.assert_close(step.logs["lm_loss"], full_loss[0], rtol=1e-6, atol=1e-6)
