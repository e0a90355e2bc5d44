"""What a language model still knows: greedy answers and answer log-probabilities on a small text set.

    python -m lightning_moe.retention --model MODEL [--tokenizer NAME] [--data data/retention/smollm2_facts.jsonl]

MODEL is anything `load_backbone` reads (a stage's output, a checkpoint, a GGUF file or packaged name such
as `smollm2-135m-instruct`) or a transformers causal-LM directory (an export). Each record of the set
(JSONL: `id`, `question`, `answers`, the first the reference) is asked as one user turn after
`SYSTEM_PROMPT` and three worked examples (`EXAMPLES`), through the tokenizer's chat template; the greedy answer is correct when it matches
one of `answers` (`tokens.normalize_answer`). The log-probability is that of the reference answer's
tokens right after the generation prompt; their mean negative log-likelihood per token and its
perplexity summarise a set. `RetentionScores.retained(reference)` counts the questions answered exactly as a
reference model answered them (a quantised model against its float32 self: `benchmarks/edge_offload.py
--quality-set`). `conversation_ids` writes records as one chat in the same format, each question answered
with its reference: text to calibrate on that is not the scored set. Training on images should leave the
scores where they were: data/retention/README.md says how the set was checked against the untrained model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .models import MultimodalLM
from .paths import resolve_data_path
from .tokens import load_tokenizer, normalize_answer

__all__ = ["SYSTEM_PROMPT", "RETENTION_SET", "CALIBRATION_SET", "RetentionScores", "read_retention_set",
           "evaluate_retention", "conversation_ids", "main"]

SYSTEM_PROMPT = "Answer with one word."
# worked examples before each question (none of them in the set): an instruct model of this size answers in
# sentences after the system prompt alone, and in one word after these
EXAMPLES = (("What colour is a lemon?", "Yellow"), ("What is 3 + 3?", "6"), ("What is the capital of Poland?", "Warsaw"))
RETENTION_SET = "data/retention/smollm2_facts.jsonl"
CALIBRATION_SET = "data/retention/smollm2_calibration.jsonl"  # other questions of the same kinds, never scored
MAX_NEW_TOKENS = 4


@dataclass
class RetentionScores:
    ids: list[str]
    answers: list[str]  # greedy, decoded, stripped
    correct: list[bool]
    answer_logprobs: torch.Tensor  # (N,) float64: log p(reference answer tokens | prompt)
    next_token_logits: torch.Tensor  # (N, V) float32: the distribution of each answer's first token
    answer_tokens: torch.Tensor  # (N,) int64: how many tokens each reference answer has

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def answer_nll(self) -> float:
        """Mean negative log-likelihood (nats) per reference-answer token, over the whole set."""
        return -self.answer_logprobs.sum().item() / self.answer_tokens.sum().item()

    @property
    def answer_perplexity(self) -> float:
        return math.exp(self.answer_nll)

    def retained(self, reference: "RetentionScores") -> int:
        """How many questions get exactly the greedy answer `reference` gave (the same questions, in order)."""
        if self.ids != reference.ids:
            raise ValueError(f"the scores cover other questions than the reference's ({len(self.ids)} against "
                             f"{len(reference.ids)}; first ids {self.ids[:3]} and {reference.ids[:3]})")
        return sum(mine == theirs for mine, theirs in zip(self.answers, reference.answers))

    def summary(self) -> str:
        return (f"retention: {sum(self.correct)}/{len(self.correct)} correct ({self.accuracy:.1%}), mean answer "
                f"log-prob {self.answer_logprobs.mean().item():.4f}, answer perplexity {self.answer_perplexity:.3f}")


def read_retention_set(path: str | Path = RETENTION_SET) -> list[dict]:
    """The records of a retention set; a record without a question or answers is an error naming its line."""
    path = resolve_data_path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if not (isinstance(record, dict) and isinstance(record.get("question"), str)
                and isinstance(record.get("answers"), list) and record["answers"]
                and all(isinstance(a, str) for a in record["answers"])):
            raise ValueError(f"{path}:{number}: a record needs a `question` string and a non-empty `answers` list")
        records.append({"id": str(record.get("id", number)), **record})
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def _few_shot_chat(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The system prompt, the worked examples, then `turns` (question, answer) as user / assistant turns."""
    chat = [{"role": "system", "content": SYSTEM_PROMPT}]
    for question, answer in (*EXAMPLES, *turns):
        chat += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return chat


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    chat = _few_shot_chat([]) + [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation_ids(tokenizer: PreTrainedTokenizerBase, records: list[dict]) -> list[int]:
    """Every record asked and answered with its reference, in turn, after the prompt's worked examples: one chat."""
    chat = _few_shot_chat([(r["question"], r["answers"][0]) for r in records])
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def evaluate_retention(model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                       max_new_tokens: int = MAX_NEW_TOKENS) -> RetentionScores:
    """Greedy answers and reference log-probabilities of `model` (a `MultimodalLM`, whose LLM reads the text, or a
    transformers causal LM), one question at a time (no padding: nothing depends on a padding side)."""
    llm = model.llm if isinstance(model, MultimodalLM) else model
    answers, correct, logprobs, first_logits, lengths = [], [], [], [], []
    for record in records:
        prompt = prompt_ids(tokenizer, record["question"])
        reference = tokenizer(record["answers"][0], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + reference])
        logits = llm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        steps = torch.log_softmax(logits[len(prompt) - 1:-1].double(), dim=-1)
        logprobs.append(steps.gather(1, torch.tensor(reference)[:, None]).sum())
        lengths.append(len(reference))
        first_logits.append(logits[len(prompt) - 1])
        generated = llm.generate(input_ids=ids[:, :len(prompt)], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(generated[0, len(prompt):], skip_special_tokens=True).strip()
        answers.append(answer)
        correct.append(normalize_answer(answer) in {normalize_answer(a) for a in record["answers"]})
    return RetentionScores([r["id"] for r in records], answers, correct, torch.stack(logprobs),
                           torch.stack(first_logits), torch.tensor(lengths))


def load_model(name: str) -> nn.Module:
    """A transformers causal-LM directory (an export) as transformers loads it; anything else as `load_backbone`."""
    from .formats import detect_format, load_backbone
    from .formats.hf_causal_lm import HF_CAUSAL_LM

    if Path(name).is_dir() and detect_format(name) is HF_CAUSAL_LM:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(name, use_safetensors=True).eval()
    return load_backbone(name).eval()


def main(argv: list[str] | None = None) -> RetentionScores:
    parser = argparse.ArgumentParser(prog="python -m lightning_moe.retention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model load_backbone reads, or a transformers directory")
    parser.add_argument("--tokenizer", default=None, help="default: the model's own (its directory or GGUF file)")
    parser.add_argument("--data", default=RETENTION_SET, help="the retention set (JSONL)")
    parser.add_argument("--show", action="store_true", help="print every question with its answer")
    args = parser.parse_args(argv)
    scores = evaluate_retention(load_model(args.model), load_tokenizer(args.tokenizer or args.model),
                                records := read_retention_set(args.data))
    if args.show:
        for record, answer, ok, logprob in zip(records, scores.answers, scores.correct, scores.answer_logprobs):
            print(f"{'ok ' if ok else 'BAD'} {record['id']}: {record['question']!r} -> {answer!r} "
                  f"(reference {record['answers'][0]!r}, log-prob {logprob.item():.3f})")
    print(scores.summary())
    return scores


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
