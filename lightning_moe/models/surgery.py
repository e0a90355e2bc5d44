"""Model surgery: in-place rewrites of a built `MultimodalLM`, and freeze plans.

This is the only module that knows where LLM families keep their decoder layers and MLPs.
Every rewrite appends `{"op": name, **args}` to `model.surgery`, and `replay_surgery` re-applies
the log on a freshly built model, which is how `from_pretrained` restores sparse/adapted models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from torch import nn

from ..layers import RoutedLayer, SparseMoE
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


# op name -> function(model, **logged args); extended by later surgeries (LoRA, MoLE, MoRA ...)
SURGERIES: dict[str, Callable[..., Any]] = {
    "upcycle": lambda model, **args: upcycle(model, MoEConfig(**args)),
}


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
