"""The retention scorer (`lightning_moe.retention`) on a small model built here, against oracles computed in the
test: the reference answers' negative log-likelihood per token from a plain forward pass, the count of answers kept
against a reference counted by hand, and the calibration chat that holds every record."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_moe.retention import RetentionScores, conversation_ids, evaluate_retention, prompt_ids
from tests.inference.conftest import make_sparse_model

# two-word references: a per-answer mean and a per-token mean differ
RECORDS = [
    {"id": "a", "question": "what colour is the circle?", "answers": ["red circle"]},
    {"id": "b", "question": "how many shapes are there?", "answers": ["two"]},
    {"id": "c", "question": "where is the square?", "answers": ["top left square"]},
]


def scores(answers: list[str], ids: list[str] | None = None) -> RetentionScores:
    n = len(answers)
    return RetentionScores(ids or [str(i) for i in range(n)], answers, [True] * n, torch.zeros(n, dtype=torch.float64),
                           torch.zeros(n, 3), torch.ones(n, dtype=torch.long))


def test_answer_nll_is_the_mean_over_reference_tokens(tokenizer):
    model = make_sparse_model(tokenizer)
    result = evaluate_retention(model, tokenizer, RECORDS)
    # oracle: one forward pass over prompt + reference, cross-entropy summed over the reference's positions
    nll, tokens = 0.0, 0
    for record in RECORDS:
        prompt = prompt_ids(tokenizer, record["question"])
        reference = tokenizer(record["answers"][0], add_special_tokens=False)["input_ids"]
        logits = model.llm(input_ids=torch.tensor([prompt + reference])).logits[0, len(prompt) - 1:-1]
        nll += torch.nn.functional.cross_entropy(logits.double(), torch.tensor(reference), reduction="sum").item()
        tokens += len(reference)
    assert result.answer_tokens.tolist() == [2, 1, 3] and tokens == 6
    # the same float32 logits, the log-softmax in float64 both ways: agreement to float64 rounding
    assert result.answer_nll == pytest.approx(nll / tokens, rel=1e-9)
    assert result.answer_perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-9)


def test_retained_counts_the_answers_identical_to_the_reference():
    reference = scores(["Paris", "Berlin", "Rome", "Madrid"])
    assert scores(["Paris", "Bonn", "Rome", "madrid"]).retained(reference) == 2  # identical, not "correct"
    assert reference.retained(reference) == 4
    with pytest.raises(ValueError, match="other questions"):
        scores(["Paris", "Berlin", "Rome", "Madrid"], ids=["0", "1", "2", "x"]).retained(reference)


def test_conversation_ids_asks_and_answers_every_record(tokenizer):
    """After the system prompt and the worked examples, each record's turn pair, in order (the word-level
    tokenizer decodes to its words joined by spaces)."""
    text = tokenizer.decode(conversation_ids(tokenizer, RECORDS))
    turns = ["<|user|> what colour is the circle ? <|end|> <|assistant|> red circle <|end|>",
             "<|user|> how many shapes are there ? <|end|> <|assistant|> two <|end|>",
             "<|user|> where is the square ? <|end|> <|assistant|> top left square <|end|>"]
    assert text.startswith("<s> <|system|> answer with one word . <|end|>")
    assert text.endswith(" " + " ".join(turns))
