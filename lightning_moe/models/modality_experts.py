"""Uni-MoE's upcycling: dense MLPs -> `SparseMoE` whose experts are modality-specific FFNs. Registers the
`modality_experts` surgery.

Expert slot j of decoder layer i starts as layer i's MLP of the source `experts[j]` names: a modality
("image", "audio", "video") takes that modality's stage-2 model (`sources[modality]`, a `MultimodalLM`
whose MLPs were trained on that modality's data only), "dense" takes the model's own MLP (the FFN
before stage 2). The router is new (`SparseMoE.from_dense`'s small init). So right after the surgery,
a token routed entirely to slot j computes what the source model of slot j computes.

The log records the slot names, top-k and layers, not where the sources were read from: replay
(`from_pretrained`) rebuilds the layers with the right shapes, and the saved weights fill them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..layers import SparseMoE
from .architecture import decoder_layers, mlp_attribute, resolve_layers
from .checkpoint import register_surgery
from .multimodal import MultimodalLM

__all__ = ["ModalityExpertsConfig", "modality_experts", "non_mlp_differences"]

DENSE = "dense"


@dataclass
class ModalityExpertsConfig:
    """Which FFN fills each expert slot, and the MoE layers (defaults: Uni-MoE's reference)."""

    experts: list[str] = field(default_factory=lambda: ["image", "audio", "video"])  # slot -> modality or "dense"
    top_k: int = 2
    layers: str | list[int] = "all"  # Uni-MoE: every decoder layer
    normalize_weights: bool = True  # renormalise the top-k gate weights to sum to 1
    capacity_factor: float | None = None  # None = dropless (the reference drops no token)


def _mlp(model: MultimodalLM, index: int) -> nn.Module:
    layer = decoder_layers(model.llm)[index]
    return getattr(layer, mlp_attribute(layer))


def modality_experts(model: MultimodalLM, config: ModalityExpertsConfig,
                     sources: dict[str, MultimodalLM] | None = None) -> list[int]:
    """Replace the chosen layers' MLPs by `SparseMoE`s whose expert j is the MLP of `config.experts[j]`'s source.

    `sources` maps each modality in `config.experts` to its stage-2 model; None (replay) copies the
    model's own MLP into every slot, since the saved weights overwrite them.
    """
    if len(config.experts) < config.top_k:
        raise ValueError(f"modality experts: {len(config.experts)} slots {config.experts} but top_k={config.top_k}")
    if sources is not None:
        missing = sorted({e for e in config.experts if e != DENSE} - set(sources))
        if missing:
            raise ValueError(f"modality experts: no stage-2 model for {missing} (slots {config.experts}); "
                             f"given: {sorted(sources)}")
    layers = decoder_layers(model.llm)
    chosen = resolve_layers(config.layers, len(layers))
    for i in chosen:
        attr = mlp_attribute(layers[i])
        mlp = getattr(layers[i], attr)
        if isinstance(mlp, SparseMoE):
            raise ValueError(f"decoder layer {i} is already sparse; make the modality experts once")
        moe = SparseMoE.from_dense(mlp, len(config.experts), config.top_k, capacity_factor=config.capacity_factor,
                                   normalize_weights=config.normalize_weights)
        if sources is not None:
            with torch.no_grad():
                for slot, name in enumerate(config.experts):
                    if name == DENSE:
                        continue
                    source_mlp = _mlp(sources[name], i)
                    if isinstance(source_mlp, SparseMoE):
                        raise ValueError(f"the {name} stage-2 model's layer {i} is sparse; a dense FFN is needed")
                    single = SparseMoE.from_dense(source_mlp, 1, 1)  # its weights in the stacked layout
                    for own, theirs in ((moe.w_in, single.w_in), (moe.down_proj, single.down_proj),
                                        (moe.b_in, single.b_in), (moe.down_bias, single.down_bias)):
                        if own is not None:
                            own[slot].copy_(theirs[0])
        setattr(layers[i], attr, moe.to(next(mlp.parameters()).device))
    model.surgery.append({"op": "modality_experts", **asdict(config), "layers": chosen})
    return chosen


def non_mlp_differences(model: MultimodalLM, other: MultimodalLM, atol: float = 0.0) -> list[str]:
    """Parameters outside the decoder MLPs that differ between two models of one architecture (stage 2
    trains only the MLPs, so the stage-2 models must agree with the base everywhere else)."""
    layers = decoder_layers(model.llm)
    mlp_prefixes = []
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for i, layer in enumerate(layers):
        mlp_prefixes.append(f"{prefix}.{i}.{mlp_attribute(layer)}.")
    theirs = dict(other.named_parameters())
    differ = []
    for name, p in model.named_parameters():
        if any(name.startswith(m) for m in mlp_prefixes):
            continue
        q = theirs.get(name)
        if q is None or q.shape != p.shape or not torch.allclose(p.detach().float(), q.detach().float(), atol=atol, rtol=0):
            differ.append(name)
    return differ


def _replay(model: MultimodalLM, **args: Any) -> list[int]:
    return modality_experts(model, ModalityExpertsConfig(**args))


register_surgery("modality_experts", _replay)
