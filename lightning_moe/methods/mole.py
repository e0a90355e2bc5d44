"""LLaVA-MoLE against its baseline `LoRATuning` (plain LoRA, base frozen; lora.py): `MoLE`, a sparse
top-1 mixture of LoRA experts on each decoder layer's MLP, plain LoRA on attention (docs/mole.md).

Both methods only say which adapters go where (`adapter_rules`, consumed by the adapter surgery
in `models/adapters.py`) and that only the `adapters` group trains; everything else (the loss with
the routers' balance loss, per-domain evaluation, routing statistics for TensorBoard) is the
base class's. `MoLE` is `LoRATuning` plus one rule that claims the MLPs of the chosen layers
before the LoRA rule sees them, so in layers without experts the MLP keeps plain LoRA. Its
`experts` options are the "mole" adapter kind's (`MoLEConfig`, layers/adapters/mole.py) plus where
the experts go.

`experts.oracle_domains` turns MoLE into its routing oracle (experiments/conflict.py): each sample's
tokens go to its domain's expert, through the layers' `forced_expert`, set before every training and
evaluation forward by `route_batch`; the experts and everything else stay MoLE's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from ..layers import MoLEConfig, MoLEMLP
from ..models import AdapterRule
from ..safe_load import checkpoint_safe
from .base import AuxLossConfig, StepOutput
from .lora import LoRAOptions, LoRATuning


@checkpoint_safe
@dataclass
class ExpertOptions(MoLEConfig):
    """The MoLE experts on the MLPs: the "mole" adapter kind's options (E LoRA experts per projection, one
    top-1 router per layer), with rank, alpha and dropout defaulting to the LoRA's, and which layers get them."""

    r: int | None = None  # rank of each expert; None = the LoRA rank
    alpha: float | None = None  # None = the LoRA alpha
    dropout: float | None = None  # None = the LoRA dropout
    layers: str | list[int] = "all"  # which decoder layers get experts; the others keep plain LoRA on their MLP
    # an oracle, for experiments: domain names in expert order; every token of a sample of domain
    # oracle_domains[i] goes to expert i % num_experts (weight 1), whatever the router says. None = the router
    oracle_domains: list[str] | None = None

    def kind_config(self, lora: LoRAOptions) -> MoLEConfig:
        """The adapter kind's config: these options, the LoRA's where they are None."""
        return MoLEConfig(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                             else getattr(lora, f.name) for f in fields(MoLEConfig)})


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

    def adapter_rules(self) -> list[AdapterRule]:
        experts = AdapterRule(kind="mole", targets=["mlp"], layers=self.experts.layers,
                              **vars(self.experts.kind_config(self.lora)))
        return [experts, *super().adapter_rules()]  # experts first: they claim the MLPs of their layers

    def route_batch(self, batch: dict[str, Any]) -> None:
        """With `experts.oracle_domains`: force every MoLE layer's experts from the batch's domains."""
        domains = self.experts.oracle_domains
        if not domains:
            return
        unknown = sorted(set(batch["domain"]) - set(domains))
        if unknown:
            raise ValueError(f"MoLE oracle routing: domains {unknown} of the batch are not in "
                             f"experts.oracle_domains {domains}")
        forced = torch.tensor([domains.index(d) % self.experts.num_experts for d in batch["domain"]],
                              device=self.device)
        for layer in self.model.modules():
            if isinstance(layer, MoLEMLP):
                layer.forced_expert = forced

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        self.route_batch(batch)  # evaluation's generation, which follows, keeps the batch's routing
        return super().compute_loss(batch)

    def predict_answers(self, batch: dict[str, Any], batch_idx: int = 0, dataloader_idx: int = 0) -> list[str]:
        self.route_batch(batch)  # predict generates without a `compute_loss` first
        return super().predict_answers(batch, batch_idx, dataloader_idx)
