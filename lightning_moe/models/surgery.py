"""Model surgery: in-place rewrites of a built `MultimodalLM`, and freeze plans.

This is the only module that knows where LLM families keep their decoder layers and MLPs.
Every rewrite appends `{"op": name, **args}` to `model.surgery`, and `replay_surgery` re-applies
the log on a freshly built model, which is how `from_pretrained` restores sparse/adapted models.

Rewrites: `upcycle` (dense MLPs -> `SparseMoE`), `add_adapters` (LoRA / MoLE / MoRA adapters,
peft-style target rules, first match wins), `add_mora_task` (MoRA continual learning). Adapters
also live on their own: `save_adapters` / `load_adapters` (a small safetensors file + the adapter
surgery as JSON) and `merge_lora` (fold plain LoRA into the base weights for export).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..layers import LoRALinear, MoLEMLP, MoRALinear, RoutedLayer, SparseMoE
from .multimodal import MultimodalLM

# Attribute paths of the decoder-layer list, first match wins (Llama/Mistral/Qwen/Phi/Mixtral,
# GPT-2/GPT-J, OPT, GPT-NeoX).
DECODER_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")
# Attribute name of the feed-forward block inside a decoder layer.
MLP_ATTRIBUTES = ("mlp", "feed_forward", "block_sparse_moe")


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    for path in DECODER_LAYER_PATHS:
        layers = _get_path(llm, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(llm).__name__}; known paths: {DECODER_LAYER_PATHS}")


def mlp_attribute(layer: nn.Module) -> str:
    for name in MLP_ATTRIBUTES:
        if isinstance(getattr(layer, name, None), nn.Module):
            return name
    raise ValueError(f"cannot find the MLP of {type(layer).__name__}; known attributes: {MLP_ATTRIBUTES}")


def resolve_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """`"::2"` (a Python slice over layer indices; MoE-LLaVA's every other layer), `"all"`, or a list."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(p.strip().lstrip("-").isdigit() for p in parts if p.strip()):
            raise ValueError(f"layer spec {spec!r} is neither 'all', a slice like '::2', nor a list of indices")
        parts = [int(p) if p.strip() else None for p in parts]
        return list(range(num_layers))[slice(*parts)]
    bad = [i for i in spec if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for {num_layers} decoder layers")
    return sorted(i % num_layers for i in spec)


@dataclass
class MoEConfig:
    """How dense MLPs become sparse MoE layers (defaults: MoE-LLaVA, except dropless dispatch)."""

    num_experts: int = 4
    top_k: int = 2
    layers: str | list[int] = "::2"  # which decoder layers: a slice string, "all", or indices
    capacity_factor: float | None = None  # None = dropless; MoE-LLaVA used 1.5 (train) / 2.0 (eval)
    eval_capacity_factor: float | None = None
    normalize_weights: bool = True  # renormalise the top-k gate weights to sum to 1
    router_jitter: float = 0.0
    noisy_second_choice: bool = False  # GShard/DeepSpeed: second expert drawn with Gumbel noise


def upcycle(model: MultimodalLM, config: MoEConfig) -> list[int]:
    """Replace the chosen layers' MLPs by `SparseMoE` whose experts are copies of that MLP."""
    layers = decoder_layers(model.llm)
    chosen = resolve_layers(config.layers, len(layers))
    args = asdict(config)
    for i in chosen:
        attr = mlp_attribute(layers[i])
        mlp = getattr(layers[i], attr)
        if isinstance(mlp, SparseMoE):
            raise ValueError(f"decoder layer {i} is already sparse; upcycle once")
        moe = SparseMoE.from_dense(
            mlp, config.num_experts, config.top_k, capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor, normalize_weights=config.normalize_weights,
            router_jitter=config.router_jitter, noisy_second_choice=config.noisy_second_choice,
        )
        setattr(layers[i], attr, moe.to(next(mlp.parameters()).device))
    model.surgery.append({"op": "upcycle", **args, "layers": chosen})
    return chosen


def is_sparse(model: MultimodalLM) -> bool:
    return any(entry["op"] == "upcycle" for entry in model.surgery)


def routed_layers(model: nn.Module) -> list[tuple[str, RoutedLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedLayer)]


@dataclass
class ParameterCounts:
    total: int  # every parameter of the model (vision tower included)
    activated: int  # parameters one token uses: a top-k of E experts counts k/E of each MoE layer's experts


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total and per-token activated parameters (sparse layers count only their top-k experts)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, SparseMoE):
            experts = sum(p.numel() for name, p in module.named_parameters() if not name.startswith("router."))
            inactive += experts * (module.num_experts - module.top_k) // module.num_experts
    return ParameterCounts(total, total - inactive)


# ---------------------------------------------------------------------------- adapters
ADAPTER_KINDS = ("lora", "mole", "mora")
ADAPTER_TYPES = (LoRALinear, MoLEMLP, MoRALinear)


@dataclass
class AdapterConfig:
    """One adapter rule: which modules of which decoder layers get which adapter.

    A module matches a target when its name (relative to the LLM, e.g.
    `model.layers.0.self_attn.q_proj`) equals it, ends with `.<target>`, or fully matches it as a
    regular expression (peft's rule). `lora` and `mora` rules match `nn.Linear`s; a `mole` rule
    matches a decoder layer's MLP (target "mlp" for Llama/Phi). With several rules, the first rule
    that matches a module wins, and a module inside an adapted one is never adapted again.
    """

    kind: str = "lora"  # lora | mole | mora
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    layers: str | list[int] = "all"  # which decoder layers: "all", a slice string like "::2", or indices
    r: int = 8  # LoRA rank (MoLE: per expert; MoRA: rank-1 experts of the first task)
    alpha: float = 16.0  # scaling = alpha / r
    dropout: float = 0.0  # dropout on the adapter input (the reference MoLE uses 0.05)
    num_experts: int = 3  # mole: LoRA experts per MLP projection (reference E=3)
    scale_by_prob: bool = True  # mole: scale the expert update by its router probability; False = reference
    router_bias: bool = True  # mole: Linear(d, E) router with bias, as the reference
    temperature: float = 1.0  # mora: softmax temperature of the self-activation
    top_k: int | None = None  # mora: activation budget (ranks kept per token); None = all
    threshold: float | None = None  # mora: prune ranks whose normalised activation is below it

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind {self.kind!r} unknown; choose one of {ADAPTER_KINDS}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if not self.targets:
            raise ValueError(f"{self.kind} adapter rule has no targets")

    def matches(self, name: str) -> bool:
        return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in self.targets)

    def build(self, module: nn.Module) -> nn.Module:
        if self.kind == "lora":
            return LoRALinear(module, self.r, self.alpha, self.dropout)
        if self.kind == "mole":
            return MoLEMLP(module, self.num_experts, self.r, self.alpha, self.dropout,
                           scale_by_prob=self.scale_by_prob, router_bias=self.router_bias)
        return MoRALinear(module, self.r, self.alpha, temperature=self.temperature, top_k=self.top_k,
                          threshold=self.threshold, dropout=self.dropout)


def _as_adapter_config(c: AdapterConfig | dict[str, Any]) -> AdapterConfig:
    return c if isinstance(c, AdapterConfig) else AdapterConfig(**c)


def plan_adapters(model: MultimodalLM, configs: list[AdapterConfig]) -> dict[str, AdapterConfig]:
    """Module name (relative to the LLM) -> the rule that adapts it. The one place that decides."""
    configs = [_as_adapter_config(c) for c in configs]
    layers = decoder_layers(model.llm)
    prefix = next(n for n, m in model.llm.named_modules() if m is layers)
    chosen = [set(resolve_layers(c.layers, len(layers))) for c in configs]
    plan: dict[str, AdapterConfig] = {}
    for i, layer in enumerate(layers):
        wants_mlp = any(c.kind == "mole" and i in in_layers for c, in_layers in zip(configs, chosen))
        mlp = getattr(layer, mlp_attribute(layer)) if wants_mlp else None
        claimed: list[str] = []  # adapted (or already adapter) modules: their insides are skipped
        for sub, module in layer.named_modules():
            name = f"{prefix}.{i}.{sub}" if sub else f"{prefix}.{i}"
            if any(name.startswith(c + ".") for c in claimed):
                continue
            for config, in_layers in zip(configs, chosen):
                if i not in in_layers or not config.matches(name):
                    continue
                if isinstance(module, ADAPTER_TYPES):
                    raise ValueError(f"{name} already has an adapter ({type(module).__name__}); adapt it once")
                fits = module is mlp if config.kind == "mole" else isinstance(module, nn.Linear)
                if fits:
                    plan[name] = config
                    break
            if name in plan or isinstance(module, ADAPTER_TYPES):
                claimed.append(name)
    for config, in_layers in zip(configs, chosen):
        if in_layers and not any(c is config for c in plan.values()):
            what = "a decoder layer's MLP" if config.kind == "mole" else "an nn.Linear"
            raise ValueError(
                f"{config.kind} adapter rule with targets {config.targets} matched no module (it needs {what} "
                f"in decoder layers {sorted(in_layers)} not claimed by an earlier rule); module names look like "
                f"{[n for n, _ in layers[0].named_modules() if n][:6]} under {prefix}.<i>"
            )
    return plan


def add_adapters(model: MultimodalLM, configs: list[AdapterConfig]) -> dict[str, str]:
    """Wrap the planned modules with their adapters in place. Returns module name -> adapter kind."""
    configs = [_as_adapter_config(c) for c in configs]
    plan = plan_adapters(model, configs)
    for name, config in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.llm.get_submodule(parent_name)
        setattr(parent, attr, config.build(getattr(parent, attr)))
    model.surgery.append({"op": "adapters", "configs": [asdict(c) for c in configs]})
    return {name: config.kind for name, config in plan.items()}


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTER_TYPES)]


def add_mora_task(model: MultimodalLM, r: int) -> int:
    """MoRA continual learning: every `MoRALinear` gets r new ranks; earlier ranks freeze."""
    layers = [m for _, m in adapter_modules(model) if isinstance(m, MoRALinear)]
    if not layers:
        raise ValueError("the model has no MoRA adapters (add them with add_adapters(kind='mora')) to add a task to")
    for layer in layers:
        layer.add_task(r)
    model.surgery.append({"op": "mora_add_task", "r": r})
    return len(layers)


def _adapter_parameters(model: nn.Module, trainable_only: bool) -> Iterator[tuple[str, nn.Parameter]]:
    """Adapter parameters by full name; `trainable_only` keeps only MoRA's newest task's ranks."""
    for name, module in adapter_modules(model):
        if isinstance(module, MoRALinear):
            tasks = [len(module.lora_A) - 1] if trainable_only else range(len(module.lora_A))
            for t in tasks:
                yield f"{name}.lora_A.{t}", module.lora_A[t]
                yield f"{name}.lora_B.{t}", module.lora_B[t]
            continue
        for sub, p in module.named_parameters():
            # the wrapped base (`base_layer` / `mlp`) is not adapter
            if not sub.startswith(("base_layer.", "mlp.")):
                yield f"{name}.{sub}", p


# op name -> function(model, **logged args); extended by later surgeries
SURGERIES: dict[str, Callable[..., Any]] = {
    "upcycle": lambda model, **args: upcycle(model, MoEConfig(**args)),
    "adapters": lambda model, configs: add_adapters(model, [AdapterConfig(**c) for c in configs]),
    "mora_add_task": lambda model, r: add_mora_task(model, r),
}
ADAPTER_OPS = ("adapters", "mora_add_task")


def replay_surgery(model: MultimodalLM, log: list[dict[str, Any]]) -> None:
    for entry in log:
        args = {k: v for k, v in entry.items() if k != "op"}
        if entry["op"] not in SURGERIES:
            raise ValueError(f"unknown surgery {entry['op']!r} in the model's log; known: {sorted(SURGERIES)}")
        SURGERIES[entry["op"]](model, **args)


# ---------------------------------------------------------------------------- freeze plans
def _modules_of_type(root: nn.Module, kind: type) -> Iterator[nn.Parameter]:
    for module in root.modules():
        if isinstance(module, kind):
            yield from module.parameters()


# group name -> the parameters it names. A stage's freeze plan is a list of group names.
PARAMETER_GROUPS: dict[str, Callable[[MultimodalLM], Iterator[nn.Parameter]]] = {
    "vision": lambda m: m.encoders.parameters(),
    "connector": lambda m: m.connectors.parameters(),
    "llm": lambda m: m.llm.parameters(),
    "moe": lambda m: _modules_of_type(m.llm, SparseMoE),
    # LoRA A/B, MoLE experts + routers, MoRA ranks of the current task (earlier tasks stay frozen)
    "adapters": lambda m: (p for _, p in _adapter_parameters(m, trainable_only=True)),
}


def set_trainable(model: MultimodalLM, groups: list[str]) -> set[str]:
    """Freeze everything, then unfreeze the named groups. Returns the trainable parameter names."""
    unknown = set(groups) - set(PARAMETER_GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; known: {sorted(PARAMETER_GROUPS)}")
    model.requires_grad_(False)
    for group in groups:
        for p in PARAMETER_GROUPS[group](model):
            p.requires_grad_(True)
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- adapters on their own
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapters(model: MultimodalLM, directory: str | Path) -> Path:
    """Write only the adapters: their parameters (safetensors) and their surgery (JSON).

    The JSON also records the base model's own surgery (e.g. upcycling) that preceded the
    adapters, so `load_adapters` can refuse a base model of another shape.
    """
    log = model.surgery
    first = next((i for i, e in enumerate(log) if e["op"] in ADAPTER_OPS), None)
    if first is None:
        raise ValueError("the model has no adapters to save (its surgery log has no adapter op)")
    if any(e["op"] not in ADAPTER_OPS for e in log[first:]):
        raise ValueError(f"surgery after the adapters ({[e['op'] for e in log[first:]]}) cannot be saved as adapters; "
                         "use save_pretrained")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"base_surgery": log[:first], "adapter_surgery": log[first:]}
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tensors = {n: p.detach().contiguous().cpu() for n, p in _adapter_parameters(model, trainable_only=False)}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME))
    return directory


def load_adapters(model: MultimodalLM, directory: str | Path) -> MultimodalLM:
    """Replay the saved adapter surgery on `model` (the same base the adapters were trained on)
    and load the adapter weights. In place; returns the model."""
    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: not an adapter directory (write one with save_adapters)")
    config = json.loads(config_file.read_text())
    if config["base_surgery"] != model.surgery:
        raise ValueError(f"{config_file}: the adapters were trained on a base with surgery {config['base_surgery']}, "
                         f"this model has {model.surgery}")
    replay_surgery(model, config["adapter_surgery"])
    tensors = load_file(str(weights_file))
    expected = dict(_adapter_parameters(model, trainable_only=False))
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match the adapter surgery: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in expected.items():
            if p.shape != tensors[name].shape:
                raise ValueError(f"{weights_file}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[name])
    return model


def merge_lora(model: MultimodalLM) -> int:
    """Fold every plain LoRA into its base weight and unwrap it (export as a plain model).

    MoLE and MoRA cannot be merged: their update depends on each token (a router's or the
    self-activation's choice), so no single weight equals them. Returns the number merged.
    """
    adapters = adapter_modules(model)
    unmergeable = [f"{n} ({type(m).__name__})" for n, m in adapters if not isinstance(m, LoRALinear)]
    if unmergeable:
        raise ValueError(
            "cannot merge routed adapters into the base weights: each token uses its own expert/ranks, so no single "
            f"weight equals them: {unmergeable[:4]}. Export them with save_adapters, or keep the adapted model"
        )
    for name, module in adapters:
        module.merge(exact=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module.base_layer)
    # the weights now hold the update: the rebuilt model must not wrap them again
    model.surgery[:] = [e for e in model.surgery if e["op"] not in ADAPTER_OPS]
    return len(adapters)
