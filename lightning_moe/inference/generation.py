"""Generation for `MultimodalLM` with a KV cache: greedy or sampled, resident or offloaded experts.

One prefill over the spliced prompt (modality features at their placeholders, LEFT-padded so
that every sample ends at the same position), then one token per step with the attention keys
and values of earlier positions kept in a Hugging Face `DynamicCache`. Positions come from the
attention mask (padding does not advance them), as Hugging Face's `generate` computes them, so
greedy decoding here returns the same tokens as `MultimodalLM.generate` (tested).

The decode loop is written out (rather than calling `llm.generate`) so that prefill and decode
are timed apart: `GenerationOutput.decode_tokens_per_second` is what the EdgeMoE benchmark reports.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from ..models import MultimodalLM

__all__ = ["GenerationConfig", "GenerationOutput", "generate", "sample_next"]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 16
    do_sample: bool = False  # False: greedy (argmax)
    temperature: float = 1.0
    top_k: int | None = None  # keep only the k likeliest tokens before sampling
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    eos_token_id: int | None = None  # stop a sequence after this token
    pad_token_id: int = 0  # written after a sequence has stopped


@dataclass
class GenerationOutput:
    tokens: Tensor  # (B, new) generated ids; pad_token_id after a sequence's eos
    prefill_seconds: float
    decode_seconds: float  # the steps after the first token
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Decoded tokens per second per sequence (batch size 1: the usual edge setting)."""
        return self.decode_steps / max(self.decode_seconds, 1e-12)


def sample_next(logits: Tensor, config: GenerationConfig, generator: torch.Generator | None = None) -> Tensor:
    """(B, V) last-position logits -> (B,) next tokens (argmax, or a draw after temperature/top-k/top-p)."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    if config.temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {config.temperature}")
    logits = logits.float() / config.temperature
    if config.top_k is not None:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly more likely already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= config.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model: MultimodalLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    **modality_inputs: Tensor,
) -> GenerationOutput:
    """Continue LEFT-padded prompts (B, T); modality inputs (e.g. pixel_values) as keyword arguments."""
    config = config or GenerationConfig()
    llm = model.llm
    start = time.perf_counter()
    embeds, mask, _ = model.embed(input_ids, attention_mask, padding_side="left", **modality_inputs)
    # transformers 5 renames `past_key_values` to `cache` family by family (the old name warns): the LLM's own name
    cache_argument = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"
    cache = {cache_argument: DynamicCache(config=llm.config)}
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T'): padding repeats position 0
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
    batch = input_ids.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens: list[Tensor] = []
    next_position = positions[:, -1:] + 1  # (B, 1)
    prefill_seconds = decode_start = 0.0
    for step in range(config.max_new_tokens):
        token = sample_next(out.logits[:, -1], config, generator)  # (B,)
        token = token.masked_fill(finished, config.pad_token_id)
        tokens.append(token)
        if config.eos_token_id is not None:
            finished |= token == config.eos_token_id
        if step == 0:
            prefill_seconds = time.perf_counter() - start
            decode_start = time.perf_counter()
        if finished.all() or step == config.max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        out = llm(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, use_cache=True, **cache)
        next_position = next_position + 1
    decode_seconds = time.perf_counter() - decode_start
    return GenerationOutput(torch.stack(tokens, dim=1), prefill_seconds, decode_seconds, len(tokens) - 1)
