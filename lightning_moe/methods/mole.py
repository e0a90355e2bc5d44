"""LLaVA-MoLE and its baseline: `LoRATuning` (plain LoRA, base frozen) and `MoLE` (a sparse
top-1 mixture of LoRA experts on each decoder layer's MLP, plain LoRA on attention).
METHODS.md, section MoLE.

Both methods only say which adapters go where (`adapter_rules`, consumed by the adapter surgery
in `models/surgery.py`) and that only the `adapters` group trains; everything else (the loss with
the routers' balance loss, per-domain evaluation, routing statistics for TensorBoard) is the
base class's. `MoLE` is `LoRATuning` plus one rule that claims the MLPs of the chosen layers
before the LoRA rule sees them, so in layers without experts the MLP keeps plain LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import AdapterConfig, MultimodalLM, add_adapters, load_adapters
from ..models.surgery import ADAPTER_OPS
from .base import AuxLossConfig, MultimodalMethod

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAOptions:
    """Plain LoRA on the named linear projections (peft-style names) of the chosen decoder layers."""

    r: int = 32  # rank (reference MoLE: 32)
    alpha: float = 64.0  # scaling = alpha / r (reference: 64)
    dropout: float = 0.05  # on the adapter input (reference: 0.05)
    targets: list[str] = field(default_factory=lambda: ATTENTION + MLP_PROJECTIONS)
    layers: str | list[int] = "all"  # "all", a slice string like "::2", or layer indices


@dataclass
class ExpertOptions:
    """The MoLE experts on the MLPs: E LoRA experts per projection, one top-1 router per layer."""

    num_experts: int = 3  # reference: 3
    r: int | None = None  # rank of each expert; None = the LoRA rank
    alpha: float | None = None  # None = the LoRA alpha
    dropout: float | None = None  # None = the LoRA dropout
    scale_by_prob: bool = True  # scale the expert update by its router probability (Switch); False = reference
    layers: str | list[int] = "all"  # which decoder layers get experts; the others keep plain LoRA on their MLP
    router_bias: bool = True  # reference router: Linear(d, E) with bias


class LoRATuning(MultimodalMethod):
    def __init__(
        self,
        lora: LoRAOptions | None = None,
        adapters_path: str | None = None,
        trainable: list[str] | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            lora: rank, alpha, dropout, target projections and layers of the plain LoRA.
            adapters_path: a `save_adapters` directory to start from (e.g. to evaluate trained
                adapters with `validate`/`test`); its adapter surgery replaces the one above.
            trainable: parameter groups that train; default ["adapters"] (base frozen).
            **kwargs: MultimodalMethod's arguments (backbone, optimizer, aux_loss, ...).
        """
        self.lora = lora or LoRAOptions()
        self.adapters_path, self.trainable_override = adapters_path, trainable
        super().__init__(**kwargs)

    def adapter_rules(self) -> list[AdapterConfig]:
        """Which modules get which adapter; the surgery applies the first rule matching a module."""
        o = self.lora
        return [AdapterConfig(kind="lora", targets=list(o.targets), layers=o.layers, r=o.r, alpha=o.alpha,
                              dropout=o.dropout)]

    def configure_backbone(self, model: MultimodalLM) -> None:
        if self.adapters_path:
            load_adapters(model, Path(self.adapters_path))
        elif not any(entry["op"] in ADAPTER_OPS for entry in model.surgery):  # a loaded adapted model keeps its own
            add_adapters(model, self.adapter_rules())

    def trainable_groups(self) -> list[str]:
        return list(self.trainable_override if self.trainable_override is not None else ["adapters"])


class MoLE(LoRATuning):
    def __init__(self, experts: ExpertOptions | None = None, aux_loss: AuxLossConfig | None = None, **kwargs: Any):
        """
        Args:
            experts: number of experts, their rank/alpha/dropout (default: the LoRA's), scaling by
                the router probability, which layers get experts.
            aux_loss: balance loss; default the reference's form `mole` (sum_j mean(p_j) mean(c_j),
                pooled over layers), coefficient 0.01; `switch` is the Switch/Mixtral form.
            **kwargs: LoRATuning's arguments (lora: the plain LoRA on attention and on the MLPs of
                layers without experts), then MultimodalMethod's.
        """
        self.experts = experts or ExpertOptions()
        super().__init__(aux_loss=aux_loss or AuxLossConfig(form="mole", coef=0.01, layers="concat"), **kwargs)

    def adapter_rules(self) -> list[AdapterConfig]:
        o, e = self.lora, self.experts
        experts = AdapterConfig(
            kind="mole", targets=["mlp"], layers=e.layers, r=o.r if e.r is None else e.r,
            alpha=o.alpha if e.alpha is None else e.alpha,
            dropout=o.dropout if e.dropout is None else e.dropout, num_experts=e.num_experts,
            scale_by_prob=e.scale_by_prob, router_bias=e.router_bias,
        )
        return [experts, *super().adapter_rules()]  # experts first: they claim the MLPs of their layers
