"""MoE-tuning (MoE-LLaVA): align the connector, tune the dense LLM, then upcycle MLPs into sparse
MoE layers and tune only those (METHODS.md, MoE-tuning).

Each stage starts from the previous stage's output (`backbone.pretrained`). In `moe`, the MLPs of
the chosen decoder layers become `SparseMoE`s whose experts are exact copies of the dense MLP,
so right after upcycling the model computes exactly what the dense model did.
"""

from __future__ import annotations

from typing import Any

from ..models import MoEConfig, MultimodalLM, is_sparse, upcycle
from .base import MultimodalMethod

# stage -> parameter groups that train (METHODS.md); the vision tower stays frozen throughout
STAGE_GROUPS = {
    "align": ["connector"],
    "instruct": ["connector", "llm"],
    "moe": ["moe", "connector"],  # the reference leaves the projector trainable in stage 3
}


class MoETuning(MultimodalMethod):
    def __init__(
        self,
        stage: str = "instruct",
        moe: MoEConfig | None = None,
        trainable: list[str] | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            stage: align | instruct | moe.
            moe: experts, top-k, which layers, capacity; used when stage is moe.
            trainable: parameter groups that train instead of the stage's plan (e.g. the quickstart
                trains a sparse model from scratch with ["llm", "connector"]).
            **kwargs: MultimodalMethod's arguments (backbone, optimizer, aux_loss, ...).
        """
        if stage not in STAGE_GROUPS:
            raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGE_GROUPS)}")
        self.stage, self.moe_config, self.trainable_override = stage, moe or MoEConfig(), trainable
        super().__init__(**kwargs)

    def configure_backbone(self, model: MultimodalLM) -> None:
        # a backbone that is already sparse (fine-tuning an MoE-tuned model) keeps its experts
        if self.stage == "moe" and not is_sparse(model):
            upcycle(model, self.moe_config)

    def trainable_groups(self) -> list[str]:
        return list(self.trainable_override if self.trainable_override is not None else STAGE_GROUPS[self.stage])
