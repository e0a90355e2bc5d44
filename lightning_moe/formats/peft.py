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
what the project's model does. A sparse LLM's base is the transformers MoE model `to_hf_causal_lm` builds
(`hf_causal_lm.causal_lm_layout` names its tensors without building it): LoRA outside the sparse layers and
on a shared expert keeps its name; each expert's LoRA (`moe_lora`) becomes peft's LoRA on the stacked
experts' parameters (`target_parameters`, peft's `ParamWrapper` layout). Refused with the reason: MoLE
and MoRA (they route each token to its own experts or ranks, which peft has no way to express), LoRA on
a router (the project's router computes from the weight under it, never through the LoRA), and a base
that no transformers model represents.

In (`load_peft_lora`, which `formats.load_adapters` calls for a peft directory): a peft LoRA trained
on the LLM alone or on a llava-hf model becomes `lora` adapter rules naming the exact modules (logged as surgery, so `save_pretrained` and checkpoints replay it) and loads its
tensors. rsLoRA's scale (alpha/sqrt(r)) is kept exactly as an equivalent alpha. What LoRA variants
the project's layer does not compute (DoRA, biases, modules_to_save, LoRA on embeddings, on the
vision tower or on bare parameters) is refused by name, never a KeyError.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
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
from .hf_causal_lm import CausalLMLayout, causal_lm_layout

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
    """A name in the LLM's transformers export -> its name in the exported base."""
    if base == "causal_lm":
        return llm_name
    if not llm_name.startswith(prefix + "."):
        raise PeftFormatError(f"{llm_name} is outside the LLM's decoder stack ({prefix}); llava-hf has no place for it")
    return LLAVA_LM_PREFIXES[0] + llm_name[len(prefix) + 1:]


@dataclass
class _Target:
    """One peft LoRA: a module (`target_modules`) or a bare parameter (`target_parameters`) of the base."""

    name: str  # its full name in the exported base
    r: int
    alpha: float
    lora_A: torch.Tensor  # peft's layout: (r, in) for a module, (E * r, in) for stacked experts
    lora_B: torch.Tensor  # (out, r); (out, r * E) for stacked experts
    parameter: bool = False
    nesting: int = 0  # how many peft ParamWrappers of later parameters of the same module wrap this one


def _linear_target(layout: CausalLMLayout, llm_name: str, module: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A `lora` adapter's module name in the transformers export, and its factors."""
    # (no LoRA on a router: `plan_adapters` refuses it, the router reads its weight itself)
    return layout.key(llm_name + ".weight").removesuffix(".weight"), module.lora_A.weight, module.lora_B.weight


def _stacked_factors(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert LoRA factors of the row blocks of one stacked tensor (gate and up of gate_up_proj: A (E, r, in),
    B (E, out, r) each) -> one rank-sum(r) LoRA per expert, B block-diagonal, in peft's ParamWrapper layout:
    lora_A (E * R, in) expert-major, lora_B (out, R * E) rank-major (`ParamWrapper.get_delta_weight`)."""
    A = torch.cat(a, dim=1)  # (E, R, in)
    E, R, _ = A.shape
    B = A.new_zeros(E, sum(x.shape[1] for x in b), R)
    row = col = 0
    for block in b:
        B[:, row:row + block.shape[1], col:col + block.shape[2]] = block
        row, col = row + block.shape[1], col + block.shape[2]
    return A.reshape(E * R, -1), B.permute(1, 2, 0).reshape(B.shape[1], R * E)


def _expert_targets(layout: CausalLMLayout, llm_name: str, module: nn.Module) -> list[_Target]:
    """A `moe_lora` adapter (each expert's gate / up / down its own LoRA) as peft LoRAs on the transformers experts'
    stacked parameters: gate and up side by side on gate_up_proj (rank 2r, alpha 2·alpha: the same alpha / r),
    down on down_proj. The experts module registers gate_up_proj before down_proj, so peft's wrapper of
    down_proj wraps the one of gate_up_proj (whose keys gain one `base_layer.`)."""
    gate_up_A, gate_up_B = _stacked_factors([module.lora_A["gate"], module.lora_A["up"]],
                                            [module.lora_B["gate"], module.lora_B["up"]])
    down_A, down_B = _stacked_factors([module.lora_A["down"]], [module.lora_B["down"]])
    r, alpha = module.r, float(module.alpha)
    return [_Target(layout.key(f"{llm_name}.gate_up_proj"), 2 * r, 2 * alpha, gate_up_A, gate_up_B, True, 1),
            _Target(layout.key(f"{llm_name}.down_proj"), r, alpha, down_A, down_B, True, 0)]


def export_peft(model: MultimodalLM, out: str | Path, base: PeftBase | None = None) -> Path:
    """Write the model's LoRA adapters as a peft LoRA adapter for the exported base (module docstring).

    `base`: "llava" for `export_multimodal`'s LlavaForConditionalGeneration, "causal_lm" for the text-only
    export; default llava when the model has an image encoder.
    """
    base = base or ("llava" if "image" in model.encoders else "causal_lm")
    adapters = [(n, m) for n, m in adapter_modules(model.llm)]
    if not adapters:
        raise PeftFormatError("the model has no adapters to export")
    others = sorted({kind_of(m).name for _, m in adapters} - {"lora", "moe_lora"})
    if others:
        raise PeftFormatError(
            f"peft cannot represent {', '.join(others)} adapters: they route each token to its own experts / ranks, "
            "and a peft LoRA is one fixed update per module. Keep them in the project's format (models.save_adapters), "
            "or train plain LoRA for a peft export"
        )
    merged = [n for n, m in adapters if getattr(m, "merged", False)]
    if merged:
        raise PeftFormatError(f"the adapters {merged[:3]} are merged into their base weights already: unmerge them, "
                              "or export the merged model (--format hf --merge-lora)")
    try:
        layout = causal_lm_layout(without_adapters(model))
    except ValueError as err:
        raise PeftFormatError(f"the base under the adapters has no transformers form, so no peft adapter can name "
                              f"its modules: {err}") from None
    prefix = model.llm.base_model_prefix
    targets: list[_Target] = []
    for llm_name, module in adapters:
        if kind_of(module).name == "moe_lora":
            targets += _expert_targets(layout, llm_name, module)
        else:
            name, lora_A, lora_B = _linear_target(layout, llm_name, module)
            targets.append(_Target(name, module.r, float(module.alpha), lora_A, lora_B))
    for target in targets:
        target.name = _base_name(target.name, prefix, base)
    (r, alpha), _ = Counter((t.r, t.alpha) for t in targets).most_common(1)[0]
    dropouts = {float(getattr(m.lora_dropout, "p", 0.0)) for _, m in adapters if hasattr(m, "lora_dropout")}
    parameters = sorted(t.name for t in targets if t.parameter)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
        # peft has one dropout (training only), which its LoRA on bare parameters refuses
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0 if parameters else max(dropouts, default=0.0),
        "target_modules": sorted(t.name for t in targets if not t.parameter), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None,
        "rank_pattern": {t.name: t.r for t in targets if t.r != r},
        "alpha_pattern": {t.name: t.alpha for t in targets if t.alpha != alpha},
    }
    if parameters:  # a field of peft 0.17 on: written only where it is needed
        config["target_parameters"] = parameters
    tensors = {}
    for t in targets:
        # a LoRA on a parameter is keyed by the module holding it, under one `base_layer.` per wrapper around it
        key = PEFT_PREFIX + (t.name.rpartition(".")[0] + ".base_layer" * t.nesting if t.parameter else t.name)
        tensors[f"{key}.lora_A.weight"] = t.lora_A.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = t.lora_B.detach().contiguous().cpu()
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
    if config.get("target_parameters"):
        raise PeftFormatError(
            f"{config_file}: target_parameters {config['target_parameters']} (LoRA on bare parameters, such as the "
            "experts' stacked gate_up_proj / down_proj) does not load: the project's LoRA wraps nn.Linear modules, "
            "and its experts' LoRA (moe_lora) gives the gate and up projections factors of their own, where peft's "
            "LoRA on gate_up_proj shares one A between them")
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
