"""Native Hugging Face MoE LLMs as sparse models here: the `native_moe` surgery.

`convert_native_moe` replaces every MoE block of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE LLM by a
`SparseMoE` holding the same tensors (routers, stacked experts, Qwen2-MoE's gated shared expert), so
routing losses, routing statistics, `stage: moe`, adapters and the EdgeMoE store see them. It is
logged, so `from_pretrained` rebuilds the Hugging Face model from its config and replays it; and
`build_multimodal` runs it whenever the LLM is a native MoE family. (The way back to transformers is
an export: `formats/hf_causal_lm.py`.)

`multimodal.py` calls this module, so this module does not import it: the model is typed as the
`nn.Module` it is (a `MultimodalLM`: its `llm` and its `surgery` log), as in `checkpoint.py`.
"""

from __future__ import annotations

from torch import nn

from ..layers import SparseMoE
from .architecture import MOE_FAMILIES, decoder_layers, moe_family, native_moe_block
from .checkpoint import register_surgery

__all__ = ["convert_native_moe"]


def convert_native_moe(model: nn.Module, layers: list[int] | None = None) -> list[int]:
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


def _replay(model: nn.Module, family: str, layers: list[int]) -> None:
    found = moe_family(model.llm)
    if found is None or found.model_type != family:
        raise ValueError(f"the log converts {family} MoE blocks but the LLM is {type(model.llm).__name__}")
    convert_native_moe(model, layers)


register_surgery("native_moe", _replay)
