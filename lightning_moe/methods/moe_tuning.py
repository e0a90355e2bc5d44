"""MoE-tuning (MoE-LLaVA): align the connector, tune the dense LLM, then upcycle MLPs into sparse
MoE layers and tune only those (docs/moe_llava.md).

Each stage starts from the previous stage's output (`backbone.pretrained`). Entering `moe` upcycles
the MLPs of the chosen decoder layers into `SparseMoE`s whose experts are exact copies of the dense
MLP (the base's `enter_stage`), so right after upcycling the model computes exactly what the dense
model did. Loss, evaluation and optimizer are the base's. Beside the models' parameter groups, `trainable`
may name `mlp` (every decoder layer's feed-forward block): the dense control of stage 3 trains those instead
of the MoE layers (`lightning_moe.experiments.moe_llava`).
"""

from __future__ import annotations

from typing import Any, Literal

from ..models import MoEConfig, ParameterGroup, mlp_parameters
from .base import MultimodalMethod, Stage


class MoETuning(MultimodalMethod):
    # the vision tower stays frozen throughout (MoE-LLaVA); the reference leaves the projector trainable in stage 3
    STAGES = {
        "align": Stage(train=["connector"]),
        "instruct": Stage(train=["connector", "llm"]),
        "moe": Stage(train=["moe", "connector"], upcycle=True),
    }

    def __init__(self, stage: Literal["align", "instruct", "moe"] = "instruct", moe: MoEConfig | None = None,
                 **kwargs: Any):
        """
        Args:
            stage: align (connector), instruct (LLM + connector), moe (upcycle, then MoE layers + connector).
            moe: experts, top-k, which layers, capacity; used when stage is moe.
            **kwargs: MultimodalMethod's arguments (backbone, trainable, optimizer, aux_loss, ...).
        """
        self.moe_config = moe or MoEConfig()
        super().__init__(stage=stage, **kwargs)

    def parameter_groups(self) -> dict[str, ParameterGroup]:
        return {"mlp": mlp_parameters}
