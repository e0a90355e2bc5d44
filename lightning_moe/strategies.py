"""Wrap policies for sharded training through Lightning's strategies (configs/strategies/).

`decoder_layer_policy` is an FSDP `auto_wrap_policy`: each transformer block (the LLM's decoder
layers, the vision tower's encoder layers) becomes one FSDP unit, so a `SparseMoE` inside a layer
is sharded and gathered whole with its router, never split between units; embeddings, norms and
the connector stay in the root unit. Blocks are recognised by their Hugging Face class names
(`...DecoderLayer`, `...EncoderLayer`), so the policy works for any LLM family transformers builds.
"""

from __future__ import annotations

from torch import nn

BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer")


def is_block(module: nn.Module) -> bool:
    """A transformer block: one FSDP unit."""
    return type(module).__name__.endswith(BLOCK_SUFFIXES)


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP's auto-wrap callable: descend everywhere, wrap every transformer block (module docstring)."""
    return True if recurse else is_block(module)
