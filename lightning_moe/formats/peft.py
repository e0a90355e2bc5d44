"""peft's LoRA adapter directories in and out: plain LoRA adapters as a peft adapter directory, and a
peft LoRA directory as the project's adapter surgery.

Detected (`is_peft_directory`) by its `adapter_config.json`, which names a `peft_type`; the project's
own adapter directories (`models.save_adapters`) carry `base_surgery` instead.

Out (`export_peft`): `adapter_config.json` (`peft_type: LORA`, the adapted modules by their full
names in the exported base, r / lora_alpha with `rank_pattern` / `alpha_pattern` for modules that
differ) and `adapter_model.safetensors` with peft's key names
(`base_model.model.<module in the base>.lora_A.weight`), for the base that `export_multimodal`
(`LlavaForConditionalGeneration`: the LLM under `model.language_model.`) or the text-only export
(`AutoModelForCausalLM`: the LLM's own names) writes, so `PeftModel.from_pretrained(base, dir)` computes
what the project's model does. Only plain LoRA: MoLE and MoRA route each token to its own experts or
ranks, which peft has no way to express (an error saying so).

In (`load_peft_lora`, which `formats.load_adapters` calls for a peft directory): a peft LoRA trained
on the LLM alone or on a llava-hf model becomes `lora` adapter rules naming the exact modules (logged as surgery, so `save_pretrained` and checkpoints replay it) and loads its
tensors. rsLoRA's scale (alpha/sqrt(r)) is kept exactly as an equivalent alpha. What LoRA variants
the project's layer does not compute (DoRA, biases, modules_to_save, LoRA on embeddings or on the
vision tower) is refused by name, never a KeyError.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..layers.adapters import kind_of
from ..models.adapters import ADAPTER_CONFIG_NAME, AdapterRule, add_adapters
from ..models.architecture import adapter_modules
from ..models.checkpoint import adapter_ops
from ..models.multimodal import MultimodalLM
from .base import read_json_config

__all__ = ["PeftBase", "PeftFormatError", "export_peft", "load_peft_lora", "without_adapters", "is_peft_directory",
           "PEFT_WEIGHTS_NAME", "PEFT_PREFIX"]

PeftBase = Literal["llava", "causal_lm"]
PEFT_PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (LoraModel).model
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# where llava-hf's LlavaForConditionalGeneration keeps the language model's decoder stack, newest layout first
LLAVA_LM_PREFIXES = ("model.language_model.", "language_model.model.")
LLAVA_OTHER_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")
# LoraConfig options whose non-default values the project's LoRALinear does not compute
_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "fan_in_fan_out": False,
                "layer_replication": None, "lora_bias": False}


def is_peft_directory(path: Path) -> bool:
    """An adapter_config.json naming a `peft_type` (the project's own carries `base_surgery`, and a `peft_type`
    only to explain itself to peft)."""
    config = read_json_config(path / ADAPTER_CONFIG_NAME)
    return config is not None and "base_surgery" not in config and "peft_type" in config


class PeftFormatError(ValueError):
    """The adapters (or the peft directory) have no counterpart in the other format; the message says which."""


# ---------------------------------------------------------------------------- out
def _base_name(llm_name: str, prefix: str, base: PeftBase) -> str:
    """A module's name relative to the LLM -> its name in the exported transformers base."""
    if base == "causal_lm":
        return llm_name
    if not llm_name.startswith(prefix + "."):
        raise PeftFormatError(f"{llm_name} is outside the LLM's decoder stack ({prefix}); llava-hf has no place for it")
    return LLAVA_LM_PREFIXES[0] + llm_name[len(prefix) + 1:]


def export_peft(model: MultimodalLM, out: str | Path, base: PeftBase | None = None) -> Path:
    """Write the model's plain LoRA adapters as a peft LoRA adapter for the exported base (module docstring).

    `base`: "llava" for `export_multimodal`'s LlavaForConditionalGeneration, "causal_lm" for the text-only
    export; default llava when the model has an image encoder.
    """
    base = base or ("llava" if "image" in model.encoders else "causal_lm")
    adapters = [(n, m) for n, m in adapter_modules(model.llm)]
    if not adapters:
        raise PeftFormatError("the model has no adapters to export")
    others = sorted({kind_of(m).name for _, m in adapters} - {"lora"})
    if others:
        raise PeftFormatError(
            f"peft cannot represent {', '.join(others)} adapters: they route each token to its own experts / ranks, "
            "and a peft LoRA is one fixed update per module. Keep them in the project's format (models.save_adapters), "
            "or train plain LoRA for a peft export"
        )
    base_ops = [e["op"] for e in model.surgery if e["op"] not in ("adapters",)]
    if base_ops:
        raise PeftFormatError(f"the base under the LoRA has surgery {base_ops}; a peft adapter goes on a plain "
                              "transformers base (export it and the adapters from a model without that surgery)")
    prefix = model.llm.base_model_prefix
    names = {llm_name: _base_name(llm_name, prefix, base) for llm_name, _ in adapters}
    modules = dict(adapters)
    shape = Counter((m.r, float(m.alpha)) for m in modules.values())
    (r, alpha), _ = shape.most_common(1)[0]
    dropouts = {float(getattr(m.lora_dropout, "p", 0.0)) for m in modules.values()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": max(dropouts),  # peft has one dropout (training only)
        "target_modules": sorted(names.values()), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "rank_pattern": {names[n]: m.r for n, m in modules.items() if m.r != r},
        "alpha_pattern": {names[n]: float(m.alpha) for n, m in modules.items() if float(m.alpha) != alpha},
    }
    tensors = {}
    for llm_name, module in modules.items():
        key = PEFT_PREFIX + names[llm_name]
        tensors[f"{key}.lora_A.weight"] = module.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = module.lora_B.weight.detach().contiguous().cpu()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------- in
def _llm_name(peft_name: str, prefix: str, config_file: Path) -> str:
    """A module name in peft's base (a causal LM or a llava-hf model) -> its name relative to our LLM."""
    for llava in LLAVA_LM_PREFIXES:
        if peft_name.startswith(llava):
            return f"{prefix}.{peft_name[len(llava):]}"
    if peft_name.startswith(LLAVA_OTHER_PREFIXES):
        raise PeftFormatError(f"{config_file}: LoRA on {peft_name} (the vision tower or projector) is not supported; "
                              "only the language model's linear layers take LoRA here")
    return peft_name


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's `get_pattern_key`: a pattern key applies to a module whose name ends with it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_peft_lora(model: MultimodalLM, directory: str | Path) -> MultimodalLM:
    """Add a peft LoRA adapter's modules to `model` as `lora` adapter surgery and load its weights (in place)."""
    directory = Path(directory)
    config_file = directory / ADAPTER_CONFIG_NAME
    config = read_json_config(config_file)
    if config is None:
        raise FileNotFoundError(f"{config_file} not found: not a peft adapter directory")
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"{config_file}: peft adapter type {config.get('peft_type')!r}; only LORA loads into "
                              "the project (its `lora` adapter kind)")
    for option, default in _UNSUPPORTED.items():
        if config.get(option, default) not in (default, None, False, "none", []):
            raise PeftFormatError(f"{config_file}: {option}={config[option]!r} is a LoRA variant the project's LoRA "
                                  "layer does not compute; only plain LoRA loads")
    weights_file = directory / PEFT_WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} not found (peft adapters saved as adapter_model.bin: load them with "
                                "peft and save_pretrained again, which writes safetensors)")
    if any(e["op"] in adapter_ops() for e in model.surgery):
        raise PeftFormatError(f"{config_file}: the model already has adapters; load a peft LoRA onto a base model")
    tensors = load_file(str(weights_file))
    prefix = model.llm.base_model_prefix
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        found = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.\w+)?\.weight", key)
        if found is None:
            raise PeftFormatError(f"{weights_file}: tensor {key!r} is not a LoRA A/B weight of a linear layer "
                                  "(embeddings, DoRA magnitudes and biases are not supported)")
        modules.setdefault(found.group(1), {})[found.group(2)] = value
    rsl = bool(config.get("use_rslora"))
    groups: dict[tuple[int, float], list[str]] = {}
    for peft_name, pair in modules.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise PeftFormatError(f"{weights_file}: {peft_name} has {sorted(pair)}, not both lora_A and lora_B")
        r = pair["lora_A"].shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, peft_name, config.get("lora_alpha", 8)))
        # rsLoRA scales by alpha / sqrt(r): the same as alpha * sqrt(r) / r, the project's alpha / r
        groups.setdefault((r, alpha * math.sqrt(r) if rsl else alpha), []).append(_llm_name(peft_name, prefix,
                                                                                          config_file))
    dropout = float(config.get("lora_dropout", 0.0))
    rules = [AdapterRule(kind="lora", targets=sorted(names), layers="all", r=r, alpha=alpha, dropout=dropout)
             for (r, alpha), names in sorted(groups.items())]
    add_adapters(model, rules)
    by_llm_name = {_llm_name(n, prefix, config_file): pair for n, pair in modules.items()}
    with torch.no_grad():
        for name, module in adapter_modules(model.llm):
            pair = by_llm_name[name]
            for part in ("lora_A", "lora_B"):
                target = getattr(module, part).weight
                if target.shape != pair[part].shape:
                    raise PeftFormatError(f"{weights_file}: {name}.{part} has shape {tuple(pair[part].shape)}, the "
                                          f"model's layer needs {tuple(target.shape)}: not this base's adapter")
                target.copy_(pair[part])
    return model


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of `module` sharing its parameters and children, whose own child table can change alone."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    return twin


def without_adapters(model: MultimodalLM) -> MultimodalLM:
    """The base under the adapters (what a peft adapter goes on): a new `MultimodalLM` sharing every base
    module (no copy of a weight), each adapter replaced by the module it wraps, and the adapter ops dropped
    from its log. `model` is left as it was."""
    ops = adapter_ops()
    llm = _shallow(model.llm)
    for name, adapter in adapter_modules(model.llm):
        parent, parts = llm, name.split(".")
        for part in parts[:-1]:  # copy the path down to the adapter, so `model` keeps its own
            child = _shallow(parent._modules[part])
            parent._modules[part] = child
            parent = child
        parent._modules[parts[-1]] = getattr(adapter, kind_of(adapter).wrapped)
    base = MultimodalLM(llm, dict(model.encoders), dict(model.connectors), model.connector_kinds,
                        model.placeholder_ids, connector_options=model.connector_options,
                        pooling=model.pooling)
    base.surgery = [e for e in model.surgery if e["op"] not in ops]
    return base
