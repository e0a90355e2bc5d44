"""`LoRATuning`: plain LoRA on chosen projections, base frozen. The base of the adapter methods
(`MoLE` in mole.py, the continual methods in continual.py / mora.py), which swap or add rules.

A method here only says which adapters go where (`adapter_rules`, consumed by the adapter surgery
in `models/adapters.py`) and that only the `adapters` group trains; everything else (the loss,
per-domain evaluation, routing statistics) is the base class's. `adapter_names` and
`adapter_parameter_counts` report the adapters a run holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..formats import load_adapters
from ..models import AdapterRule, MultimodalLM, add_adapters
from ..safe_load import checkpoint_safe
from .base import MultimodalMethod, Stage

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]


@checkpoint_safe
@dataclass
class LoRAOptions:
    """Plain LoRA on the named linear projections (peft-style names) of the chosen decoder layers."""

    r: int = 32  # rank (reference MoLE: 32)
    alpha: float = 64.0  # scaling = alpha / r (reference: 64)
    dropout: float = 0.05  # on the adapter input (reference: 0.05)
    targets: list[str] = field(default_factory=lambda: ATTENTION + MLP_PROJECTIONS)
    layers: str | list[int] = "all"  # "all", a slice string like "::2", or layer indices


class LoRATuning(MultimodalMethod):
    STAGES = {"adapters": Stage(train=["adapters"])}  # one stage: the adapters train, the base stays frozen

    def __init__(
        self,
        lora: LoRAOptions | None = None,
        adapters: list[dict[str, Any]] | None = None,
        adapters_path: str | None = None,
        stage: Literal["adapters"] = "adapters",
        **kwargs: Any,
    ):
        """
        Args:
            lora: rank, alpha, dropout, target projections and layers of the plain LoRA.
            adapters: adapter rules that replace the method's built-in ones (`adapter_rules`), each
                `{kind: <a registered adapter kind>, targets: [...], layers: all, <that kind's options>}`,
                first matching rule wins; any kind registered with `register_adapter_kind` works.
            adapters_path: a `save_adapters` directory to start from (e.g. to evaluate trained
                adapters with `validate`/`test`); its adapter surgery replaces the one above.
            stage: adapters (the only one: train the adapters, base frozen).
            **kwargs: MultimodalMethod's arguments (backbone, trainable, optimizer, aux_loss, ...).
        """
        self.lora = lora or LoRAOptions()
        # parsed now so that an unknown kind or option fails before the model is built
        self.adapters = None if adapters is None else [AdapterRule.from_dict(rule) for rule in adapters]
        self.adapters_path = adapters_path
        super().__init__(stage=stage, **kwargs)

    def adapter_rules(self) -> list[AdapterRule]:
        """Which modules get which adapter; the surgery applies the first rule matching a module."""
        o = self.lora
        return [AdapterRule(kind="lora", targets=list(o.targets), layers=o.layers, r=o.r, alpha=o.alpha,
                            dropout=o.dropout)]

    def configured_rules(self) -> list[AdapterRule]:
        """The rules the surgery applies: the `adapters` option if given, else `adapter_rules()`."""
        if self.adapters is not None:
            return list(self.adapters)
        return [AdapterRule.from_dict(rule) for rule in self.adapter_rules()]

    def configure_backbone(self, model: MultimodalLM) -> None:
        if self.adapters_path:
            load_adapters(model, Path(self.adapters_path))
            return
        loaded = [entry["configs"] for entry in model.surgery if entry["op"] == "adapters"]
        if not loaded:
            add_adapters(model, self.configured_rules())
            return
        # a loaded adapted model keeps its adapters, but only if they are the ones this method asks for:
        # MoLE on a LoRA run's output would otherwise train plain LoRA without a word
        wanted = [rule.to_dict() for rule in self.configured_rules()]
        if loaded != [wanted]:
            raise ValueError(
                f"{type(self).__name__}: the backbone already carries adapters {loaded}, not the ones this method "
                f"configures {wanted}; start from the base model (and `adapters_path` to load trained adapters)"
            )

    def adapter_names(self) -> list[str]:
        """Names of the adapter parameters (trainable, or frozen by a finished task)."""
        return [n for n, _ in self.model.named_parameters() if ".lora_" in n]

    def adapter_parameter_counts(self) -> dict[str, int]:
        """`total`: adapter parameters the method holds now; `per_task`: those that train (in a continual
        run, one task's)."""
        total = sum(self.model.get_parameter(n).numel() for n in self.adapter_names())
        return {"total": total, "per_task": sum(p.numel() for p in self.parameters() if p.requires_grad)}
