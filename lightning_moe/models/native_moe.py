"""Native Hugging Face MoE LLMs as sparse models here, and sparse/dense LLMs back to transformers.

`convert_native_moe` replaces every MoE block of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE LLM by a
`SparseMoE` holding the same tensors (routers, stacked experts, Qwen2-MoE's gated shared expert), so
routing losses, routing statistics, `stage: moe`, adapters and the EdgeMoE store see them. It is the
`native_moe` surgery: `from_pretrained` rebuilds the Hugging Face model from its config and replays it.
`build_multimodal` runs it whenever the LLM is a native MoE family.

`to_hf_causal_lm` is the way back: a plain transformers `AutoModelForCausalLM` with the LLM's weights,
in the family `architecture.sparse_export_config` picks (or a ValueError saying why none fits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..layers import SparseMoE
from .architecture import (MOE_FAMILIES, adapter_modules, decoder_layers, expert_layers, hf_moe_keys, moe_family,
                           native_moe_block, sparse_export_config)
from .checkpoint import adapter_ops, register_surgery

if TYPE_CHECKING:
    from .multimodal import MultimodalLM

__all__ = ["convert_native_moe", "to_hf_causal_lm", "EXPORTABLE_OPS"]

# surgery ops whose result a transformers model represents (after sparse_export_config's checks)
EXPORTABLE_OPS = ("upcycle", "native_moe")


def convert_native_moe(model: MultimodalLM, layers: list[int] | None = None) -> list[int]:
    """Every Hugging Face MoE block of `model.llm` -> `SparseMoE` with the same tensors; logs `native_moe`.

    layers: the decoder layers expected to hold MoE blocks (a replayed log), checked; None = all found.
    """
    llm = model.llm
    family = moe_family(llm)
    if family is None:
        raise ValueError(f"{type(llm).__name__} (model_type {getattr(llm.config, 'model_type', None)!r}) is not a "
                         f"native MoE family known here: {sorted(MOE_FAMILIES)}")
    config = llm.config
    top_k = getattr(config, family.top_k)
    normalize = True if family.norm_topk_prob is None else bool(getattr(config, family.norm_topk_prob))
    converted = []
    for i, layer in enumerate(decoder_layers(llm)):
        block = native_moe_block(layer, family)
        if block is None:
            continue  # a dense layer (Qwen's mlp_only_layers / decoder_sparse_step)
        experts = getattr(block, family.experts)
        shared = getattr(block, family.shared_expert) if family.shared_expert else None
        shared_gate = getattr(block, family.shared_expert_gate).weight if family.shared_expert_gate else None
        moe = SparseMoE.from_experts(
            getattr(block, family.router).weight, experts.gate_up_proj, experts.down_proj, top_k,
            activation=experts.act_fn, normalize_weights=normalize, shared_expert=shared,
            shared_expert_gate=shared_gate,
            # HF jitters the experts' input too; here only the router's (TopKRouter), in training only
            router_jitter=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
        )
        setattr(layer, family.block, moe)
        converted.append(i)
    if not converted:
        raise ValueError(f"{type(llm).__name__} has no {family.model_type} MoE block left to convert "
                         "(converted already?)")
    if layers is not None and converted != list(layers):
        raise ValueError(f"the log converted MoE blocks at layers {list(layers)}, this {family.model_type} model has "
                         f"them at {converted}")
    model.surgery.append({"op": "native_moe", "family": family.model_type, "layers": converted})
    return converted


def _replay(model: MultimodalLM, family: str, layers: list[int]) -> None:
    found = moe_family(model.llm)
    if found is None or found.model_type != family:
        raise ValueError(f"the log converts {family} MoE blocks but the LLM is {type(model.llm).__name__}")
    convert_native_moe(model, layers)


register_surgery("native_moe", _replay)


def _sparse_layer_indices(llm: nn.Module) -> dict[str, int]:
    """SparseMoE module name -> its decoder layer's index."""
    by_layer = {id(m): i for i, layer in enumerate(decoder_layers(llm)) for m in layer.children()}
    out = {}
    for name, moe in expert_layers(llm):
        if id(moe) not in by_layer:
            raise ValueError(f"the SparseMoE {name} is not a direct child of a decoder layer; "
                             "no family places it there")
        out[name] = by_layer[id(moe)]
    return out


def to_hf_causal_lm(model: MultimodalLM) -> PreTrainedModel:
    """The LLM as a plain transformers causal LM with the same weights (the LLM itself when it is dense).

    Adapters must be merged (`merge_lora`) or exported apart (peft) first: a ValueError says so.
    """
    llm = model.llm
    adapter_log = sorted({e["op"] for e in model.surgery if e["op"] in adapter_ops()})
    adapters = adapter_modules(llm)
    if adapters or adapter_log:
        names = [n for n, _ in adapters[:3]]
        raise ValueError(f"the LLM carries adapters ({adapter_log or names}): a transformers model has no place for "
                         "them. Fold plain LoRA in first (--merge-lora / merge_lora), or export it as a peft adapter "
                         "(--format peft); MoLE and MoRA route per token and have no transformers form")
    other = sorted({e["op"] for e in model.surgery} - set(EXPORTABLE_OPS))
    if other:
        raise ValueError(f"surgery {other} has no transformers counterpart; exportable ops: {EXPORTABLE_OPS}")
    moes = _sparse_layer_indices(llm)
    if not moes:
        return llm
    native = next((e["layers"] for e in model.surgery if e["op"] == "native_moe"), None)
    modules = dict(expert_layers(llm))
    config, family = sparse_export_config(llm.config, sorted(moes.values()), list(modules.values()), native)
    dtype = next(p.dtype for n, p in llm.named_parameters() if ".router." not in n)
    hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {}
    for key, value in llm.state_dict().items():
        owner = next((name for name in moes if key.startswith(name + ".")), None)
        if owner is None:
            state[key] = value
            continue
        relative = key[len(owner) + 1:]
        block = owner.rpartition(".")[0] + "." + family.block
        state[f"{block}.{hf_moe_keys(family, [relative])[relative]}"] = value
    expected = hf.state_dict()
    for key in set(expected) - set(state):
        # Qwen2-MoE's zero-width shared expert (no shared expert here): its output is gate * 0 = 0
        if family.shared_expert and f".{family.block}.{family.shared_expert}" in key and not any(
                m.shared_expert for m in modules.values()):
            state[key] = torch.zeros_like(expected[key])
    hf.load_state_dict(state, strict=True)
    hf.generation_config = llm.generation_config
    return hf
