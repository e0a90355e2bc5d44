"""Where an LLM family keeps things: its decoder layers, each layer's MLP, and the module finders.

The only module that knows Hugging Face attribute paths (`DECODER_LAYER_PATHS`, `MLP_ATTRIBUTES`);
a new family with other names is taught here once. The finders (`routed_layers`, `expert_layers`,
`adapter_modules`) are the one way the package lists a model's sparse layers and adapters.
"""

from __future__ import annotations

from torch import nn

from ..layers import RoutedLayer, SparseMoE
from ..layers.adapters import kind_of

__all__ = ["DECODER_LAYER_PATHS", "MLP_ATTRIBUTES", "decoder_layers", "mlp_attribute", "resolve_layers",
           "routed_layers", "expert_layers", "adapter_modules"]

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


# ---------------------------------------------------------------------------- module finders
def routed_layers(model: nn.Module) -> list[tuple[str, RoutedLayer]]:
    """Every layer that routes tokens (SparseMoE, MoLE, ...), by name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedLayer)]


def expert_layers(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    """The SparseMoE layers, by name, in module order (index i is MoE layer i)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]


def adapter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer of a registered adapter kind, by name, in module order."""
    return [(name, m) for name, m in model.named_modules() if kind_of(m) is not None]
