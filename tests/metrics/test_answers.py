"""Answer metrics on hand-written answers: exact match and its normalisation, POPE's yes/no rule and
its five scores, per-domain and overall aggregation in the shared evaluation, and the reduction of
two processes' states (what `sync_dist` does) against one process that saw every sample."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.metrics import ExactMatch, POPEMetrics, majority_answer_score, normalize_answer, pope_says_yes


def test_majority_answer_score_counts_normalised_answers():
    # "Yes." and "yes" are one answer after normalisation: 3 of 5
    assert majority_answer_score(["yes", "Yes.", "no", " YES ", "no"]) == pytest.approx(3 / 5)
    assert majority_answer_score(["left"]) == 1.0


def test_majority_answer_score_refuses_no_answers():
    with pytest.raises(ValueError, match="^no reference answers: the majority-answer score is undefined$"):
        majority_answer_score([])


# ---------------------------------------------------------------------------- exact match
@pytest.mark.parametrize("prediction, target, same", [
    ("Left", "left", True),  # case
    ("  left.  ", "left", True),  # surrounding space and one trailing period
    ("left...", "left", True),  # every trailing period
    ("left!", "left", False),  # other punctuation is kept: deliberately simple (tokens.normalize_answer)
    ("l.eft", "left", False),  # a period inside is kept
    ("a circle", "circle", False),  # articles are kept
    ("left side", "left", False),  # trailing words are an error, not a match
    ("3", "three", False),  # no number words
])
def test_normalisation_decides_what_matches(prediction, target, same):
    assert (normalize_answer(prediction) == normalize_answer(target)) is same
    metric = ExactMatch()
    metric.update([prediction], [target])
    assert metric.compute().item() == (1.0 if same else 0.0)


def test_exact_match_counts_hand_made_answers():
    metric = ExactMatch()
    metric.update(["Red.", "blue", "a red"], ["red", "green", "red"])  # 1 of 3
    metric.update(["TWO"], ["two"])  # 2 of 4 over both batches
    assert (metric.correct.item(), metric.total.item()) == (2, 4)
    assert metric.compute().item() == pytest.approx(0.5)


def test_exact_match_of_nothing_is_zero_and_mismatched_lengths_are_an_error():
    assert ExactMatch().compute().item() == 0.0  # an empty domain: 0 / max(0, 1), never nan
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        ExactMatch().update(["a", "b"], ["a"])


# ---------------------------------------------------------------------------- POPE
@pytest.mark.parametrize("answer, yes", [
    ("Yes", True), ("yes.", True), ("YES, there is a circle.", True),
    ("No", False), ("no.", False), ("NO, there is not.", False),
    ("There is not a circle in the image.", False),  # "not" anywhere in the first sentence
    ("Yes. There is no square.", True),  # only the first sentence counts
    ("I see none", True),  # "none" is neither "no" nor "not": whole words only
    ("nothing; notably", True),
    ("", True),  # no negation at all
])
def test_pope_says_yes_follows_the_reference_rule(answer, yes):
    assert pope_says_yes(answer) is yes


def _pope(predictions: list[str], targets: list[str]) -> dict[str, float]:
    metric = POPEMetrics()
    metric.update(predictions, targets)
    return {k: v.item() for k, v in metric.compute().items()}


def test_pope_scores_of_a_hand_made_confusion_matrix():
    # tp 3, fp 1, fn 2, tn 4 (positive = "yes"); precision 3/4 != recall 3/5, so a swap shows
    targets = ["yes"] * 3 + ["no"] * 1 + ["yes"] * 2 + ["no"] * 4
    predictions = ["Yes."] * 3 + ["yes, there is"] * 1 + ["No, there is not."] * 2 + ["no"] * 4
    scores = _pope(predictions, targets)
    precision, recall = 3 / 4, 3 / 5
    assert scores == pytest.approx({
        "pope_accuracy": 7 / 10,
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1": 2 * precision * recall / (precision + recall),
        "pope_yes_ratio": 4 / 10,
    })


def test_pope_all_yes_and_all_no_answers():
    targets = ["yes", "yes", "no", "no", "no"]
    all_yes = _pope(["yes"] * 5, targets)
    assert all_yes == pytest.approx({"pope_accuracy": 2 / 5, "pope_precision": 2 / 5, "pope_recall": 1.0,
                                     "pope_f1": 2 * (2 / 5) / (2 / 5 + 1), "pope_yes_ratio": 1.0})
    all_no = _pope(["no"] * 5, targets)
    # no "yes" predicted: precision and recall 0 (not nan), F1 0
    assert all_no == pytest.approx({"pope_accuracy": 3 / 5, "pope_precision": 0.0, "pope_recall": 0.0,
                                    "pope_f1": 0.0, "pope_yes_ratio": 0.0})


def test_pope_of_one_answer_and_of_low_precision_and_recall():
    # one sample: every denominator is exactly 1
    assert _pope(["yes"], ["yes"]) == pytest.approx({"pope_accuracy": 1.0, "pope_precision": 1.0, "pope_recall": 1.0,
                                                     "pope_f1": 1.0, "pope_yes_ratio": 1.0})
    # tp 1, fp 3, fn 3, tn 1: precision = recall = 1/4, their sum below 1
    scores = _pope(["yes"] * 4 + ["no"] * 4, ["yes"] + ["no"] * 3 + ["yes"] * 3 + ["no"])
    assert scores == pytest.approx({"pope_accuracy": 2 / 8, "pope_precision": 1 / 4, "pope_recall": 1 / 4,
                                    "pope_f1": 1 / 4, "pope_yes_ratio": 4 / 8})


def test_pope_of_nothing_is_zero_and_mismatched_lengths_are_an_error():
    assert all(v == 0.0 for v in _pope([], []).values())
    with pytest.raises(ValueError):
        POPEMetrics().update(["yes"], ["yes", "no"])


# ---------------------------------------------------------------------------- distributed reduction
PREDICTIONS = ["yes", "no", "Yes.", "no", "yes", "No, not.", "yes", "yes"]
TARGETS = ["yes", "yes", "no", "no", "yes", "no", "no", "yes"]


@pytest.mark.parametrize("make", [ExactMatch, POPEMetrics])
def test_two_processes_states_merged_equal_one_process_over_all_samples(make):
    """Each rank updates on its shard; `merge_state` applies the states' `dist_reduce_fx` (sum) as the
    all-gather of `sync_dist` does. The shards are uneven (3 and 5 samples)."""
    whole, rank0, rank1 = make(), make(), make()
    whole.update(PREDICTIONS, TARGETS)
    rank0.update(PREDICTIONS[:3], TARGETS[:3])
    rank1.update(PREDICTIONS[3:], TARGETS[3:])
    merged = make()
    for rank in (rank0, rank1):
        merged.merge_state(rank)
    expected, actual = whole.compute(), merged.compute()
    if isinstance(expected, dict):
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], msg=key)
    else:
        torch.testing.assert_close(actual, expected)
    # and the mean of the two ranks' scores is not the answer (the shards differ in size and score)
    if make is ExactMatch:
        assert (rank0.compute() + rank1.compute()).item() / 2 != pytest.approx(expected.item())


# ---------------------------------------------------------------------------- per-domain evaluation
def test_shared_evaluation_keeps_each_domain_and_weighs_domains_equally(monkeypatch, tokenizer):
    """`MultimodalMethod`'s per-domain metrics on scripted answers: exact match per domain, POPE only on
    its domains, the overall exact match the mean over domains (not over samples), a domain with no
    answers left out."""
    from lightning_moe.methods import BackboneConfig, MoETuning
    from lightning_moe.methods.base import StepOutput
    from tests.conftest import TINY_LLM, TOKENIZER, tiny_encoders

    method = MoETuning(stage="instruct", tokenizer=TOKENIZER, pope_domains=["pope"],
                       backbone=BackboneConfig(llm="tiny-llama", llm_overrides=TINY_LLM, encoders=tiny_encoders()))
    scripted: list[list[str]] = []
    losses: list[torch.Tensor] = []

    def compute_loss(batch):
        n = len(batch["domain"])
        return StepOutput(torch.tensor(0.0), {}, torch.ones(n, 1), [], losses.pop(0), torch.ones(n))

    monkeypatch.setattr(method, "compute_loss", compute_loss)
    monkeypatch.setattr(method, "generate_answers", lambda batch: scripted.pop(0))
    logged: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(method, "log_dict", lambda values, **kwargs: logged.update(values))

    # count: 3 of 4 right over two batches; pope: 1 of 2 right (one true yes, one false yes)
    batches = [
        ({"domain": ["count", "count", "pope"], "answers": ["2", "3", "yes"]}, ["2", "4", "Yes."], [1.0, 2.0, 3.0]),
        ({"domain": ["pope", "count", "count"], "answers": ["no", "1", "five"]}, ["yes", "1", "Five."], [5.0, 4.0, 6.0]),
    ]
    for batch, answers, loss in batches:
        scripted.append(answers)
        losses.append(torch.tensor(loss))
        method.eval_step(batch, "val")
    method.log_eval_epoch("val")

    values = {k: round(v.item(), 6) for k, v in logged.items()}
    assert values["val/count/exact_match"] == 0.75 and values["val/pope/exact_match"] == 0.5
    assert values["val/exact_match"] == (0.75 + 0.5) / 2  # per-sample mean would be 4 / 6
    assert values["val/count/lm_loss"] == (1 + 2 + 4 + 6) / 4 and values["val/pope/lm_loss"] == (3 + 5) / 2
    assert values["val/pope/pope_precision"] == 0.5 and values["val/pope/pope_recall"] == 1.0
    assert values["val/pope/pope_yes_ratio"] == 1.0 and values["val/pope/pope_accuracy"] == 0.5
    assert not any(k.startswith("val/count/pope") for k in values)  # POPE only where asked

    # the states were reset for the next epoch: a domain seen only in the first epoch has no exact match now
    logged.clear()
    scripted.append(["yes"])
    losses.append(torch.tensor([1.0]))
    method.eval_step({"domain": ["pope"], "answers": ["yes"]}, "val")
    method.log_eval_epoch("val")
    assert "val/count/exact_match" not in logged and logged["val/exact_match"].item() == 1.0
