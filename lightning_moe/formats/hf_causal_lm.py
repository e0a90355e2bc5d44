"""A transformers `AutoModelForCausalLM` directory: the export of an LLM, dense or sparse.

Out (`to_hf_causal_lm`, `export_llm`): the LLM as a plain transformers causal LM with the same
weights, in the family `architecture.sparse_export_config` picks: a dense LLM stays its own
family, a converted native MoE goes back to its family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), an
upcycled Llama becomes Mixtral or Qwen2-MoE; a model no family represents is refused with the
reason (a ValueError). `causal_lm_layout` makes the same checks and says where each tensor goes without
building the model (the peft export names the adapted modules by it).

In: such a directory is a language model, not a multimodal one. It is detected (its `config.json`
names a transformers causal-LM `model_type`) so that naming it as a backbone gets an error that
says where it goes instead: `backbone.llm`, where `build_llm` loads it, converting a native MoE
family to `SparseMoE` (`models/native_moe.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..models.architecture import (MoEFamily, adapter_modules, decoder_layers, expert_layers, hf_moe_keys,
                                   sparse_export_config)
from ..models.checkpoint import adapter_ops
from ..models.meta import materialize, parameters_on_meta
from ..models.multimodal import MultimodalLM
from .base import ORIGINAL_LLAVA_KEYS, ModelFormat, read_json_config

__all__ = ["HF_CAUSAL_LM", "is_hf_causal_lm", "to_hf_causal_lm", "export_llm", "EXPORTABLE_OPS", "CausalLMLayout",
           "causal_lm_layout"]

# surgery ops whose result a transformers model represents (after sparse_export_config's checks)
EXPORTABLE_OPS = ("upcycle", "native_moe")


def is_hf_causal_lm(path: Path) -> bool:
    config = read_json_config(path / "config.json")
    return (config is not None and config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and not any(k in config for k in ORIGINAL_LLAVA_KEYS))


def refuse_as_backbone(path: Path, **_: Any) -> NoReturn:
    """The format's loader: a causal LM is no backbone; the error says where it goes."""
    model_type = read_json_config(path / "config.json").get("model_type")
    raise ValueError(f"{path} is a transformers causal LM (model_type {model_type!r}), not a multimodal model: name "
                     "it as backbone.llm (with backbone.encoders.image.tower for the encoder). backbone.pretrained "
                     "takes a lightning-moe directory or checkpoint, or a llava-hf / original-LLaVA directory")


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


@dataclass(frozen=True)
class CausalLMLayout:
    """Where `to_hf_causal_lm` puts the LLM's tensors: `config` and `family` of the transformers MoE model
    (both None: a dense LLM, exported as itself) and each `SparseMoE`'s name -> its block's name there."""

    config: PretrainedConfig | None
    family: MoEFamily | None
    blocks: dict[str, str]

    def key(self, llm_key: str) -> str:
        """A tensor's name in the LLM -> its name in the exported model (the same outside the sparse layers)."""
        owner = next((name for name in self.blocks if llm_key.startswith(name + ".")), None)
        if owner is None:
            return llm_key
        relative = llm_key[len(owner) + 1:]
        return f"{self.blocks[owner]}.{hf_moe_keys(self.family, [relative])[relative]}"


def causal_lm_layout(model: MultimodalLM) -> CausalLMLayout:
    """The transformers model that `to_hf_causal_lm` would build for `model`'s LLM without its adapters, without
    building it: a ValueError says why none represents it (surgery without a transformers counterpart, sparse
    layers no family describes)."""
    other = sorted({e["op"] for e in model.surgery} - set(EXPORTABLE_OPS) - set(adapter_ops()))
    if other:
        raise ValueError(f"surgery {other} has no transformers counterpart; exportable ops: {EXPORTABLE_OPS}")
    moes = _sparse_layer_indices(model.llm)
    if not moes:
        return CausalLMLayout(None, None, {})
    native = next((e["layers"] for e in model.surgery if e["op"] == "native_moe"), None)
    modules = dict(expert_layers(model.llm))
    config, family = sparse_export_config(model.llm.config, sorted(moes.values()), list(modules.values()), native)
    return CausalLMLayout(config, family, {name: name.rpartition(".")[0] + "." + family.block for name in moes})


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
    layout = causal_lm_layout(model)
    if layout.config is None:
        return llm
    dtype = next(p.dtype for n, p in llm.named_parameters() if ".router." not in n)
    with parameters_on_meta():  # every weight is loaded next (strictly)
        hf = AutoModelForCausalLM.from_config(layout.config, dtype=dtype)
    materialize(hf)
    state = {layout.key(key): value for key, value in llm.state_dict().items()}
    expected = hf.state_dict()
    family = layout.family
    for key in set(expected) - set(state):
        # Qwen2-MoE's zero-width shared expert (no shared expert here): its output is gate * 0 = 0
        if family.shared_expert and f".{family.block}.{family.shared_expert}" in key and not any(
                m.shared_expert for _, m in expert_layers(llm)):
            state[key] = torch.zeros_like(expected[key])
    hf.load_state_dict(state, strict=True)
    hf.generation_config = llm.generation_config
    return hf


def export_llm(model: MultimodalLM, out: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """The LLM alone as a transformers `AutoModelForCausalLM` directory (weights, config, tokenizer files)."""
    out = Path(out)
    hf = to_hf_causal_lm(model)
    hf.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


HF_CAUSAL_LM = ModelFormat("hf-causal-lm", "a transformers directory of a causal LM (config.json)", is_hf_causal_lm,
                           refuse_as_backbone)
