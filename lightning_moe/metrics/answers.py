"""Answer metrics on generated text: exact match, and POPE's hallucination metrics.

Both are torchmetrics `Metric`s holding plain counts, so they sum correctly across batches,
dataloaders and processes. `majority_answer_score` is the exact match of the constant-answer
baseline: what a model that always gives one answer can reach at best.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torchmetrics import Metric

from ..tokens import normalize_answer  # one definition, shared with inference/ (which imports no metrics)


def majority_answer_score(answers: list[str]) -> float:
    """Exact match of always answering the most frequent (normalised) reference answer."""
    if not answers:
        raise ValueError("no reference answers: the majority-answer score is undefined")
    counts = Counter(normalize_answer(a) for a in answers)
    return max(counts.values()) / len(answers)


class ExactMatch(Metric):
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, predictions: list[str], targets: list[str]) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        self.correct += sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(predictions, targets))
        self.total += len(targets)

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


_NEGATION = re.compile(r"\b(no|not)\b")


def pope_says_yes(answer: str) -> bool:
    """The POPE reference rule: an answer is "no" if its first sentence contains "no" or "not"."""
    first_sentence = answer.strip().lower().split(".")[0]
    return _NEGATION.search(first_sentence) is None


class POPEMetrics(Metric):
    """Accuracy, precision, recall, F1 (positive class = "yes") and yes-ratio of yes/no answers."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, predictions: list[str], targets: list[str]) -> None:
        for p, t in zip(predictions, targets, strict=True):
            pred, true = pope_says_yes(p), pope_says_yes(t)
            if pred and true:
                self.tp += 1
            elif pred:
                self.fp += 1
            elif true:
                self.fn += 1
            else:
                self.tn += 1

    def compute(self) -> dict[str, torch.Tensor]:
        total = (self.tp + self.fp + self.tn + self.fn).clamp(min=1)
        precision = self.tp / (self.tp + self.fp).clamp(min=1)
        recall = self.tp / (self.tp + self.fn).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        return {
            "pope_accuracy": (self.tp + self.tn) / total,
            "pope_precision": precision,
            "pope_recall": recall,
            "pope_f1": f1,
            "pope_yes_ratio": (self.tp + self.fp) / total,
        }
