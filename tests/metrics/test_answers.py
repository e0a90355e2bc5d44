"""Answer metrics on hand-written answers."""

from __future__ import annotations

import pytest

from lightning_moe.metrics import majority_answer_score


def test_majority_answer_score_counts_normalised_answers():
    # "Yes." and "yes" are one answer after normalisation: 3 of 5
    assert majority_answer_score(["yes", "Yes.", "no", " YES ", "no"]) == pytest.approx(3 / 5)
    assert majority_answer_score(["left"]) == 1.0


def test_majority_answer_score_refuses_no_answers():
    with pytest.raises(ValueError, match="no reference answers"):
        majority_answer_score([])
