"""Continual-learning scores on a hand-written accuracy matrix (values worked out by hand below)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lightning_moe.metrics import AccuracyMatrix, accuracy_table, continual_scores

# acc[i, j]: accuracy on task j after training task i (3 tasks)
ACC = torch.tensor([
    [0.90, 0.30, 0.20],
    [0.60, 0.80, 0.40],
    [0.50, 0.70, 0.95],
])


def test_scores_of_a_hand_written_matrix():
    s = continual_scores(ACC)
    assert s.last == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert s.avg == pytest.approx((0.90 + 0.30 + 0.20 + 0.60 + 0.80 + 0.40 + 0.50 + 0.70 + 0.95) / 9)
    assert s.transfer == pytest.approx((0.30 + 0.20 + 0.40) / 3)  # strict upper triangle
    assert s.bwt == pytest.approx(((0.50 - 0.90) + (0.70 - 0.80)) / 2)  # = -0.25
    assert s.forgetting == pytest.approx(((0.90 - 0.50) + (0.80 - 0.70)) / 2)  # max over earlier rows
    # forgetting measures from the best earlier value, BWT from the value right after training
    s2 = continual_scores(torch.tensor([[0.5, 0.0], [0.9, 0.9]]))
    assert s2.bwt == pytest.approx(0.4) and s2.forgetting == pytest.approx(-0.4)


def test_forgetting_takes_each_task_best_over_earlier_rows():
    # columns' best earlier values (0.9, 0.8) differ from the rows' (0.9, 0.2): forgetting is per task (column)
    s = continual_scores(torch.tensor([[0.9, 0.8, 0.0], [0.1, 0.2, 0.0], [0.5, 0.5, 0.5]]))
    assert s.forgetting == pytest.approx(((0.9 - 0.5) + (0.8 - 0.5)) / 2)


def test_partial_matrix_scores_use_only_the_rows_filled_so_far():
    metric = AccuracyMatrix(num_tasks=3)
    metric.update(0, ACC[0])
    first = metric.compute()
    assert first["last"].item() == pytest.approx(0.90 / 3 + 0.30 / 3 + 0.20 / 3)
    assert math.isnan(first["bwt"].item())
    metric.update(1, ACC[1])
    second = metric.compute()
    assert second["bwt"].item() == pytest.approx(0.60 - 0.90)
    assert second["transfer"].item() == pytest.approx((0.30 + 0.20 + 0.40) / 3)
    metric.update(2, ACC[2])
    assert torch.equal(metric.matrix(), ACC)
    assert metric.compute()["bwt"].item() == pytest.approx(-0.25)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="one accuracy per task"):
        AccuracyMatrix(3).update(0, torch.ones(2))
    with pytest.raises(ValueError, match="out of range"):
        AccuracyMatrix(3).update(3, torch.ones(3))
    with pytest.raises(ValueError, match="^no row of the accuracy matrix is filled yet$"):
        AccuracyMatrix(3).compute()
    with pytest.raises(ValueError, match="^num_tasks must be positive, got 0$"):
        AccuracyMatrix(0)
    assert AccuracyMatrix(1).matrix().shape == (0, 1)  # one task is fine
    for shape in [(3,), (0, 3), (3, 2)]:  # not a matrix, no rows, more rows than tasks
        with pytest.raises(ValueError, match=rf"^expected a \(rows, tasks\) accuracy matrix .* got shape {re.escape(str(shape))}$"):
            continual_scores(torch.zeros(shape))
    with pytest.raises(ValueError, match="missing entries"):
        continual_scores(torch.tensor([[0.5, float("nan")]]))


def test_accuracy_table_of_a_hand_written_matrix():
    expected = "\n".join(["| after \\ on | a | b |", "|---|---|---|", "| a | 1.000 | 0.250 |", "| b | 0.500 | 0.750 |"])
    assert accuracy_table([[1.0, 0.25], [0.5, 0.75]], ["a", "b"]) == expected
    assert accuracy_table(torch.tensor([[1.0, 0.25], [0.5, 0.75]]), ["a", "b"]) == expected
