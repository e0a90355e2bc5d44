"""LLaVA-MoD: the losses against float64 references, and the teacher's isolation (no gradient,
unchanged, eval mode, absent from the student's checkpoints)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_moe.data import DomainMixtureDataModule
from lightning_moe.formats import load_backbone
from lightning_moe.methods import BackboneConfig, MimicConfig, MoDDistillation, MoETuning, PreferenceConfig
from lightning_moe.methods.distill import distillation_kl, dpo_loss, kto_pair_loss, sequence_logprobs
from lightning_moe.models import MoEConfig, parameter_counts, upcycle
from lightning_moe.tokens import IGNORE_INDEX, load_tokenizer
from tests.conftest import ROOT, TINY_LLM, TINY_VISION, TOKENIZER, tiny_encoders

STUDENT = dict(llm="tiny-llama", llm_overrides=TINY_LLM, encoders=tiny_encoders())


# ---------------------------------------------------------------------------- losses
def _kl_reference(student, teacher, mask, temperature, direction):
    """Position by position in float64 with plain softmax sums."""
    total, count = 0.0, 0
    for s, t, keep in zip(student.double().reshape(-1, student.shape[-1]), teacher.double().reshape(-1, teacher.shape[-1]),
                          mask.reshape(-1)):
        if not keep:
            continue
        p_s, p_t = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
        p, q = (p_t, p_s) if direction == "forward" else (p_s, p_t)
        total += float((p * (p.log() - q.log())).sum())
        count += 1
    return total / count * temperature**2


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_matches_a_float64_reference_with_masks(direction, temperature):
    student, teacher = 3 * torch.randn(3, 7, 11), 3 * torch.randn(3, 7, 11)
    mask = torch.rand(3, 7) > 0.4
    actual = distillation_kl(student, teacher, mask, temperature, direction)
    assert actual.dtype == torch.float32
    assert actual.item() == pytest.approx(_kl_reference(student, teacher, mask, temperature, direction), rel=1e-5)
    # masked positions do not count: changing them changes nothing
    student2 = student.clone()
    student2[~mask] = 100 * torch.randn_like(student2[~mask])
    torch.testing.assert_close(distillation_kl(student2, teacher, mask, temperature, direction), actual)


def test_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    logits = torch.randn(4, 9)
    assert distillation_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_kl(logits, torch.randn(4, 9)).item() > 0


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


POLICY_C, POLICY_R = [-1.2, -3.0, -0.4], [-2.5, -0.7, -0.9]
REF_C, REF_R = [-1.0, -2.0, -1.5], [-3.0, -1.0, -1.3]


def _as_tensors(*lists):
    return [torch.tensor(x, dtype=torch.float32) for x in lists]


def test_dpo_matches_a_hand_computed_float64_reference():
    beta = 0.1
    expected = sum(-math.log(_sigmoid(beta * ((pc - pr) - (rc - rr))))
                   for pc, pr, rc, rr in zip(POLICY_C, POLICY_R, REF_C, REF_R)) / 3
    out = dpo_loss(*_as_tensors(POLICY_C, POLICY_R, REF_C, REF_R), beta=beta)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    rewards_c = [beta * (p - r) for p, r in zip(POLICY_C, REF_C)]
    rewards_r = [beta * (p - r) for p, r in zip(POLICY_R, REF_R)]
    torch.testing.assert_close(out.rewards_chosen, torch.tensor(rewards_c))
    torch.testing.assert_close(out.margins, torch.tensor(rewards_c) - torch.tensor(rewards_r))
    assert out.accuracy.item() == pytest.approx(sum(c > r for c, r in zip(rewards_c, rewards_r)) / 3)


def test_kto_pair_matches_a_hand_computed_float64_reference():
    beta = 0.1
    chosen_ratio = [p - r for p, r in zip(POLICY_C, REF_C)]
    rejected_ratio = [p - r for p, r in zip(POLICY_R, REF_R)]
    chosen_kl = max(sum(chosen_ratio) / 3, 0.0)
    rejected_kl = max(sum(rejected_ratio) / 3, 0.0)
    terms = [1 - _sigmoid(beta * (c - rejected_kl)) for c in chosen_ratio]
    terms += [1 - _sigmoid(beta * (chosen_kl - r)) for r in rejected_ratio]
    out = kto_pair_loss(*_as_tensors(POLICY_C, POLICY_R, REF_C, REF_R), beta=beta)
    assert out.loss.item() == pytest.approx(sum(terms) / 6, rel=1e-6)
    assert rejected_kl > 0 and chosen_kl == 0  # both branches of the clamp are exercised by these numbers


def test_dpo_with_policy_equal_to_reference_is_log2_with_the_expected_gradient():
    beta, n = 0.1, 4
    chosen, rejected = torch.randn(n, requires_grad=True), torch.randn(n, requires_grad=True)
    out = dpo_loss(chosen, rejected, chosen.detach().clone(), rejected.detach().clone(), beta=beta)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    out.loss.backward()
    # d/dpi_c of -log sigma(beta x) / n at x = 0 is -beta * sigma(0) / n = -beta / (2n); +beta / (2n) for pi_r
    torch.testing.assert_close(chosen.grad, torch.full((n,), -beta / (2 * n)))
    torch.testing.assert_close(rejected.grad, torch.full((n,), beta / (2 * n)))
    assert out.accuracy.item() == 0.0 and out.margins.abs().max().item() == 0.0


def test_sequence_logprobs_sum_the_response_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 6, 0]])
    logp = logits.double().log_softmax(-1)
    expected = [logp[0, 1, 3] + logp[0, 2, 4], logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 6] + logp[1, 3, 0]]
    torch.testing.assert_close(sequence_logprobs(logits, labels).double(), torch.stack(expected), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- method
@pytest.fixture
def teacher_dir(tmp_path):
    """A larger dense teacher (3 layers) saved as a stage hand-off, with its tokenizer."""
    teacher = MoETuning(stage="instruct", tokenizer=TOKENIZER,
                        backbone=BackboneConfig(**{**STUDENT, "llm_overrides": {**TINY_LLM, "num_hidden_layers": 3}}))
    path = tmp_path / "teacher"
    teacher.model.save_pretrained(path)
    teacher.tokenizer.save_pretrained(path)
    return path


def make(teacher, stage="mimic_dense", **kwargs):
    kwargs.setdefault("backbone", BackboneConfig(**STUDENT))
    return MoDDistillation(teacher=str(teacher), stage=stage, tokenizer=TOKENIZER,
                           moe=MoEConfig(num_experts=4, top_k=2, layers="::2"), **kwargs)


def _batch(tokenizer, pairs: int = 0):
    """A batch in collate_batch's layout; with pairs, rows [0, pairs) chosen and [pairs, 2 pairs) rejected."""
    rows = 2 * pairs if pairs else 3
    ids = torch.randint(20, 60, (rows, 10))
    ids[:, 2] = tokenizer.convert_tokens_to_ids("<image>")
    if pairs:
        ids[pairs:, :7] = ids[:pairs, :7]  # shared prompt, different answers
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # the response is the last 3 tokens
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": torch.randn(rows, 3, 32, 32), "domain": ["a"] * rows}
    if pairs:
        batch["num_pairs"] = pairs
    return batch


def test_teacher_gets_no_gradient_and_is_unchanged_after_a_step(teacher_dir, tokenizer):
    method = make(teacher_dir, mimic=MimicConfig(lm_weight=0.5))
    teacher_before = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    student_before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    optimizer = method.configure_optimizers()
    step = method.compute_loss(_batch(tokenizer))
    step.loss.backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in method.teacher.named_parameters())
    assert any(not torch.equal(p, student_before[n]) for n, p in method.model.named_parameters())
    assert set(step.logs) == {"kd_loss", "lm_loss", "loss"}
    torch.testing.assert_close(step.loss, step.logs["kd_loss"] + 0.5 * step.logs["lm_loss"])
    method.train()  # what Lightning does every epoch
    assert method.model.training and not method.teacher.training
    assert not any(p is q for p in method.teacher.parameters() for q in optimizer.param_groups[0]["params"])


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_kd_loss_is_zero_when_the_teacher_is_the_student(tmp_path, tokenizer, tokens):
    student = MoETuning(stage="instruct", tokenizer=TOKENIZER, backbone=BackboneConfig(**STUDENT))
    student.model.save_pretrained(tmp_path / "same")
    method = make(tmp_path / "same", backbone=BackboneConfig(pretrained=str(tmp_path / "same")),
                  mimic=MimicConfig(tokens=tokens))
    assert method.compute_loss(_batch(tokenizer)).logs["kd_loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_with_another_vision_tower_aligns_on_the_text(tmp_path, tokenizer):
    """Patch 16 instead of 8: the teacher sees 4 image features, the student 16; text positions still pair up."""
    encoders = {"image": {"tower": "tiny-clip", "overrides": {**TINY_VISION, "patch_size": 16}}}
    teacher = MoETuning(stage="instruct", tokenizer=TOKENIZER, backbone=BackboneConfig(**{**STUDENT, "encoders": encoders}))
    teacher.model.save_pretrained(tmp_path / "t")
    batch = _batch(tokenizer)
    for tokens in ("response", "all"):
        method = make(tmp_path / "t", mimic=MimicConfig(tokens=tokens))
        student, teacher = _forwards(method, batch)
        assert (student.shape[1], teacher.shape[1]) == (9 + 16, 9 + 4)  # the image: 16 features vs 4
        if tokens == "response":
            expected = _kl64(_response_logits(student), _response_logits(teacher))
        else:  # each side's text positions, found in its own layout
            expected = _kl64(_text_logits(student, 16), _text_logits(teacher, 4))
        assert method.compute_loss(batch).logs["kd_loss"].item() == pytest.approx(expected, rel=1e-4), tokens


def test_a_teacher_with_another_tokenizer_is_a_clear_error(tmp_path, teacher_dir):
    other = load_tokenizer(TOKENIZER)
    other.add_tokens(["zebra"])
    other.save_pretrained(teacher_dir)  # the tokenizer saved beside the teacher now differs
    with pytest.raises(ValueError, match="teacher's tokenizer differs from the student's.*'zebra'"):
        make(teacher_dir)


def test_mimic_sparse_upcycles_like_moe_tuning_and_trains_the_experts(teacher_dir, tokenizer):
    dense = make(teacher_dir)
    dense.model.save_pretrained(teacher_dir.parent / "dense")
    method = make(teacher_dir, "mimic_sparse", backbone=BackboneConfig(pretrained=str(teacher_dir.parent / "dense")))
    assert method.model.surgery == [{"op": "upcycle", **vars(MoEConfig(num_experts=4, top_k=2, layers=[0]))}]
    assert method.trainable_names == {n for n, _ in method.model.named_parameters()
                                      if n.startswith(("connectors.", "llm.model.layers.0.mlp."))}
    batch = _batch(tokenizer)
    with torch.no_grad():  # the same code as MoE-tuning: right after upcycling the student computes what it did
        torch.testing.assert_close(method.model(**method.model_inputs(batch)).logits,
                                   dense.model(**dense.model_inputs(batch)).logits, rtol=1e-5, atol=1e-5)
    step = method.compute_loss(batch)
    assert set(step.logs) == {"kd_loss", "lm_loss", "aux_loss", "loss"}
    torch.testing.assert_close(step.loss, step.logs["kd_loss"] + 0.01 * step.logs["aux_loss"])


@pytest.mark.parametrize("loss", ["sigmoid", "kto_pair"])
def test_preference_with_the_student_as_teacher_starts_at_the_reference_value(tmp_path, tokenizer, loss):
    sparse = MoETuning(stage="moe", tokenizer=TOKENIZER, backbone=BackboneConfig(**STUDENT))
    sparse.model.save_pretrained(tmp_path / "sparse")
    method = make(tmp_path / "sparse", "preference", backbone=BackboneConfig(pretrained=str(tmp_path / "sparse")),
                  preference=PreferenceConfig(loss=loss))
    step = method.compute_loss(_batch(tokenizer, pairs=3))
    # policy == reference: DPO is log 2, kto_pair 1 - sigmoid(0) = 0.5; rewards and margins are 0
    assert step.logs["preference_loss"].item() == pytest.approx(math.log(2) if loss == "sigmoid" else 0.5, abs=1e-5)
    assert step.logs["rewards/margin"].item() == pytest.approx(0.0, abs=1e-5)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "aux_loss"} <= set(step.logs)
    torch.testing.assert_close(step.loss, step.logs["preference_loss"] + 0.01 * step.logs["aux_loss"])
    with pytest.raises(ValueError, match="PreferenceDataModule"):
        method.compute_loss(_batch(tokenizer))  # a batch without pairs


def test_student_checkpoint_holds_no_teacher_weights_and_reloads(tmp_path, teacher_dir):
    method = make(teacher_dir, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    data = DomainMixtureDataModule({"pope": {"train": "pope/val.jsonl", "val": "pope/test.jsonl"}},
                                   root=str(ROOT / "data/shapes"), tokenizer=TOKENIZER, batch_size=4,
                                   eval_batch_size=8, max_eval_samples_per_domain=8)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                        default_root_dir=tmp_path)
    trainer.fit(method, data)
    checkpoint_path = next(tmp_path.rglob("*.ckpt"))
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert {k for k in checkpoint["state_dict"]} == {f"model.{k}" for k in method.model.state_dict()}
    # the next stage (or inference) loads the student from it; this method resumes/validates from it
    student = load_backbone(checkpoint_path)
    assert parameter_counts(student).total == parameter_counts(method.model).total
    trainer.validate(method, data, ckpt_path=checkpoint_path, verbose=False, weights_only=False)


def test_parameter_counts_count_top_k_of_the_experts(tokenizer):
    dense = MoETuning(stage="instruct", tokenizer=TOKENIZER, backbone=BackboneConfig(**STUDENT)).model
    dense_total = parameter_counts(dense).total
    assert parameter_counts(dense).activated == dense_total
    upcycle(dense, MoEConfig(num_experts=4, top_k=1, layers=[0]))
    counts = parameter_counts(dense)
    router = TINY_LLM["hidden_size"] * 4
    mlp = 3 * TINY_LLM["hidden_size"] * TINY_LLM["intermediate_size"]  # gate, up, down (no bias)
    # top-1 of copies of the dense MLP: a token uses exactly one MLP's worth, plus the router
    assert counts.activated == dense_total + router
    assert counts.total == dense_total + 3 * mlp + router


def test_bfloat16_teacher_halves_its_memory_and_still_distils(teacher_dir, tokenizer):
    method = make(teacher_dir, teacher_dtype="bfloat16")
    assert {p.dtype for p in method.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in method.model.parameters()} == {torch.float32}
    step = method.compute_loss(_batch(tokenizer))
    assert torch.isfinite(step.loss) and step.logs["kd_loss"].item() > 0
    step.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())


# ---------------------------------------------------------------------------- a distinct teacher
# Teacher != student: every wiring mistake (chosen/rejected, policy/reference, student/teacher) changes
# the numbers. The references read the logits of separate forwards at positions fixed by `_batch`'s
# layout (the response is the last 3 tokens, the image placeholder at position 2) and do the rest in
# float64 with plain softmax sums.
def _swap_pairs(pairs: list[list[float]]) -> list[list[float]]:
    return [pairs[1], pairs[0], pairs[3], pairs[2]]


@pytest.mark.parametrize("loss_fn", [dpo_loss, kto_pair_loss])
def test_swapping_chosen_and_rejected_or_policy_and_reference_moves_the_loss_the_expected_way(loss_fn):
    # the policy prefers every chosen answer more than the reference does: a low loss, a positive margin
    inputs = [POLICY_C, POLICY_R, REF_C, REF_R]
    prefer = [[-1.0, -0.5, -2.0], [-3.0, -2.5, -4.0], [-2.0, -1.5, -2.5], [-2.5, -2.0, -3.0]]
    base = loss_fn(*_as_tensors(*prefer))
    assert base.margins.min().item() > 0 and base.accuracy.item() == 1.0
    swapped = loss_fn(*_as_tensors(*_swap_pairs(prefer)))  # the rejected answers now called chosen
    assert swapped.loss.item() > base.loss.item() and swapped.margins.max().item() < 0
    torch.testing.assert_close(swapped.margins, -base.margins)
    as_reference = loss_fn(*_as_tensors(prefer[2], prefer[3], prefer[0], prefer[1]))  # policy and reference swapped
    assert as_reference.loss.item() > base.loss.item()
    torch.testing.assert_close(as_reference.rewards_chosen, -base.rewards_chosen)
    # the policy as its own reference: no preference at all, whatever the data
    itself = loss_fn(*_as_tensors(prefer[0], prefer[1], prefer[0], prefer[1]))
    assert itself.loss.item() == pytest.approx(math.log(2) if loss_fn is dpo_loss else 0.5, rel=1e-6)
    assert loss_fn(*_as_tensors(*inputs)).loss.item() != pytest.approx(itself.loss.item())


def _response_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (B, 3, V) float64: the positions predicting the last 3 (response) tokens."""
    return logits[:, -4:-1].double()


def _text_logits(logits: torch.Tensor, image_features: int) -> torch.Tensor:
    """(B, T, V) -> (B, 8, V): positions predicting a text token (token 1, and tokens 3..9 after the image)."""
    keep = [0] + list(range(image_features + 1, image_features + 8))
    return logits[:, keep].double()


def _kl64(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Forward KL(teacher || student), mean over positions, float64."""
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def _sharpen(method, scale: float = 10.0):
    """Random tiny models predict nearly uniform tokens, where KL is almost symmetric and log-ratios almost 0:
    a scaled final norm scales both models' logits (the output layer is tied to the input embeddings, so
    it stays), so that a swap shows."""
    with torch.no_grad():
        for model in (method.model, method.teacher):
            model.llm.model.norm.weight.mul_(scale)
    return method


def _forwards(method, batch):
    with torch.no_grad():
        inputs = method.model_inputs(batch)
        teacher = method.teacher  # loaded on first use; it sets the shared vocabulary
        v = method.shared_vocab
        return method.model(**inputs).logits[..., :v], teacher(**inputs).logits[..., :v]


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_mimic_kd_with_a_distinct_teacher_matches_a_float64_reference(teacher_dir, tokenizer, tokens):
    method = _sharpen(make(teacher_dir, mimic=MimicConfig(tokens=tokens)))
    batch = _batch(tokenizer)
    student, teacher = _forwards(method, batch)
    features = student.shape[1] - 9  # one placeholder became this many image features
    pick = _response_logits if tokens == "response" else lambda x: _text_logits(x, features)
    expected = _kl64(pick(student), pick(teacher))
    kd = method.compute_loss(batch).logs["kd_loss"].item()
    assert kd == pytest.approx(expected, rel=1e-4)
    # the KL is not symmetric here: student and teacher swapped would give another value
    assert abs(_kl64(pick(teacher), pick(student)) - expected) > 0.05 * expected


def test_preference_with_a_distinct_teacher_matches_a_float64_reference(tmp_path, teacher_dir, tokenizer):
    sparse = MoETuning(stage="moe", tokenizer=TOKENIZER, backbone=BackboneConfig(**STUDENT))
    sparse.model.save_pretrained(tmp_path / "sparse")
    beta, n = 0.5, 3
    batch = _batch(tokenizer, pairs=n)
    answers = batch["input_ids"][:, -3:]
    for loss in ("sigmoid", "kto_pair"):
        method = make(teacher_dir, "preference", backbone=BackboneConfig(pretrained=str(tmp_path / "sparse")),
                      preference=PreferenceConfig(loss=loss, beta=beta))
        _sharpen(method)
        student, teacher = _forwards(method, batch)

        def logps(logits):
            return torch.gather(_response_logits(logits).log_softmax(-1), 2, answers[..., None])[..., 0].sum(-1)

        pc, pr, rc, rr = (x.tolist() for x in (*logps(student).split(n), *logps(teacher).split(n)))
        if loss == "sigmoid":
            expected = sum(-math.log(_sigmoid(beta * ((a - b) - (c - d)))) for a, b, c, d in zip(pc, pr, rc, rr)) / n
        else:
            kl_c = max(sum(a - c for a, c in zip(pc, rc)) / n, 0.0)
            kl_r = max(sum(b - d for b, d in zip(pr, rr)) / n, 0.0)
            expected = (sum(1 - _sigmoid(beta * ((a - c) - kl_r)) for a, c in zip(pc, rc))
                        + sum(1 - _sigmoid(beta * (kl_c - (b - d))) for b, d in zip(pr, rr))) / (2 * n)
        logs = method.compute_loss(batch).logs
        assert logs["preference_loss"].item() == pytest.approx(expected, rel=1e-4), loss
        margin = sum(beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, rc, rr)) / n
        assert logs["rewards/margin"].item() == pytest.approx(margin, rel=1e-4, abs=1e-6), loss
        assert logs["logps/chosen"].item() == pytest.approx(sum(pc) / n, rel=1e-4), loss
        rewards = sum(beta * (a - c) for a, c in zip(pc, rc)) / n
        assert logs["rewards/chosen"].item() == pytest.approx(rewards, rel=1e-4), loss
        # a distinct teacher: the loss is well beyond the tolerance above from its value at policy = reference
        assert abs(expected - (math.log(2) if loss == "sigmoid" else 0.5)) > 10 * 1e-4 * expected, loss
        assert abs(rewards) > 0.1, loss


def test_loss_defaults_and_argument_checks():
    student, teacher = 3 * torch.randn(4, 9), 3 * torch.randn(4, 9)
    # the defaults are the reference's: temperature 1, beta 0.1
    torch.testing.assert_close(distillation_kl(student, teacher), distillation_kl(student, teacher, None, 1.0))
    pairs = _as_tensors(POLICY_C, POLICY_R, REF_C, REF_R)
    for loss_fn in (dpo_loss, kto_pair_loss):
        torch.testing.assert_close(loss_fn(*pairs).loss, loss_fn(*pairs, beta=0.1).loss)
    # one position counts: the mean is over one, not clamped above it
    mask = torch.tensor([False, True, False, False])
    assert distillation_kl(student, teacher, mask).item() == pytest.approx(
        _kl_reference(student[None], teacher[None], mask[None], 1.0, "forward"), rel=1e-5)
    with pytest.raises(ValueError, match="^direction must be one of \\('forward', 'reverse'\\), got 'both'$"):
        distillation_kl(student, teacher, direction="both")
    with pytest.raises(ValueError, match="^student logits \\(4, 9\\) and teacher logits \\(4, 8\\) are not aligned$"):
        distillation_kl(student, teacher[:, :8])
