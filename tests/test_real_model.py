"""The packaged SmolLM2-135M-Instruct through the template (docs/real_model.md; marked `real_model`, skipped
without the `real` extra): the shipped retention set is answered right by the model as loaded from its GGUF;
MoE-LLaVA upcycling leaves the greedy answers and logits on every third of its questions where they were; a two-step run of
configs/real/ stage 3 saves, exports with `python -m lightning_moe.export` and reloads in plain transformers
with the same greedy answers and logits; EdgeMoE stores of the upcycled model keep its answers with int8 experts and
lose them with int2 experts."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from lightning_moe.export import main as export_main
from lightning_moe.inference import export_store, load_offloaded
from lightning_moe.formats import load_backbone
from lightning_moe.models import MoEConfig, build_multimodal, upcycle
from lightning_moe.retention import evaluate_retention, read_retention_set
from lightning_moe.tokens import load_tokenizer
from tests.real_model import REAL_MODEL, requires_real_model
from tests.test_cli import REAL, REAL_FAST, fit

# Upcycled experts are exact copies and the top-2 gate weights are renormalised to sum to 1, so a sparse layer
# computes w1 * y + w2 * y = y up to the rounding of w1 + w2 and of the weighted sum: a few float32 ulps
# (2**-23 = 1.2e-7 relative) per sparse layer. Over 15 sparse layers of 30 and logits up to about 30 in magnitude
# that is at most about 15 * 4 * 1.2e-7 * 30 = 2.2e-4 in the worst case where every rounding adds up. A wrongly
# copied expert moves logits by far more (its layer's output changes by the whole difference of the weights).
UPCYCLE_ATOL = 2e-4
# the export holds the same float32 weights and runs the same operations in transformers' Mixtral blocks, whose
# expert sum is ordered differently: rounding of the same size
EXPORT_ATOL = 1e-4


@pytest.fixture(scope="module")
def records():
    return read_retention_set()


@requires_real_model
@pytest.mark.slow  # 57 questions, then 19 of them again through the sparse model, of a 135M-parameter LLM
def test_upcycling_leaves_retention_answers_and_logits_unchanged(records):
    tokenizer = load_tokenizer(REAL_MODEL)
    model = load_backbone(REAL_MODEL).eval()
    before = evaluate_retention(model, tokenizer, records)
    assert all(before.correct), [a for a, ok in zip(before.answers, before.correct) if not ok]  # the set's check
    upcycle(model, MoEConfig(num_experts=4, top_k=2, layers="::2"))
    # every third question: a wrongly upcycled layer moves every question's logits, and each question through the
    # sparse model costs seconds on a CPU
    after = evaluate_retention(model.eval(), tokenizer, records[::3])
    assert after.answers == before.answers[::3]
    torch.testing.assert_close(after.next_token_logits, before.next_token_logits[::3], rtol=0, atol=UPCYCLE_ATOL)
    torch.testing.assert_close(after.answer_logprobs, before.answer_logprobs[::3], rtol=0, atol=UPCYCLE_ATOL)


@requires_real_model
@pytest.mark.slow  # a training run and an export of a 135M-parameter LLM made sparse
def test_a_stage3_run_exports_to_plain_transformers_with_the_same_answers(tmp_path, monkeypatch, records):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    tokenizer = load_tokenizer(REAL_MODEL)
    # stage 2's output as stage 3 reads it (training the first two stages is test_cli's chain test)
    stage2 = build_multimodal(tokenizer, REAL_MODEL,
                              encoders={"image": {"tower": "tiny-clip", "feature_layer": -1}}, torch_dtype="float32")
    stage2.save_pretrained(tmp_path / "stage2")
    tokenizer.save_pretrained(tmp_path / "stage2")
    # the export reads the model directory: no Lightning checkpoint (about 2 GB with AdamW's state) is written
    fit(REAL[2], *REAL_FAST, f"--model.init_args.backbone.pretrained={tmp_path / 'stage2'}",
        "--trainer.enable_checkpointing=false")
    saved = tmp_path / "runs" / "real" / "stage3" / "model"
    export_main(["--model", str(saved), "--out", str(tmp_path / "hf"), "--text-only"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", use_safetensors=True).eval()
    assert exported.config.model_type == "qwen2_moe"  # sparse and dense layers alternate: Mixtral has no such form

    questions = records[::5]  # a dozen: each question costs seconds through a sparse model on a CPU
    trained = evaluate_retention(load_backbone(saved).eval(), load_tokenizer(saved), questions)
    plain = evaluate_retention(exported, load_tokenizer(tmp_path / "hf"), questions)
    assert plain.answers == trained.answers
    torch.testing.assert_close(plain.next_token_logits, trained.next_token_logits, rtol=0, atol=EXPORT_ATOL)


@requires_real_model
@pytest.mark.slow  # two stores of a 270M-parameter sparse model, three questions through each
def test_int2_experts_lose_the_answers_int8_experts_keep(tmp_path, records):
    """The model of `benchmarks/edge_offload.py --model` (SmolLM2 upcycled as configs/real/stage3_moe.yaml does),
    its experts offloaded from stores at int8 and at int2: int8 keeps the float32 answers, int2 loses them and
    their reference tokens' NLL rises by nats (the full table: docs/edgemoe.md, "Quality on a real model")."""
    upcycled_model = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks/edge_offload.py"))["upcycled_model"]
    model, _ = upcycled_model(REAL_MODEL)
    tokenizer = load_tokenizer(REAL_MODEL)
    questions = records[:3]  # capitals the model answers with log-probabilities above -0.6
    reference = evaluate_retention(model, tokenizer, questions)
    scores = {}
    for bits in (8, 2):
        store = export_store(model, tmp_path / f"int{bits}", bits=bits)
        loaded, offloader = load_offloaded(store, budget_bytes=store.expert_memory_bytes)
        scores[bits] = evaluate_retention(loaded, tokenizer, questions)
        offloader.close()
    assert scores[8].retained(reference) == 3, scores[8].answers
    assert scores[2].retained(reference) == 0, scores[2].answers
    # int8 moved the 57 answers' NLL by hundredths of a nat per token (docs/edgemoe.md); int2 by tens
    assert abs(scores[8].answer_nll - reference.answer_nll) < 0.1
    assert scores[2].answer_nll > reference.answer_nll + 5
