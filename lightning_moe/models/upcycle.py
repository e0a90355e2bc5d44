"""Upcycling: dense MLPs -> `SparseMoE` whose experts start as exact copies (MoE-LLaVA), and
parameter counts of a sparse model. Registers the `upcycle` surgery.

A method may fill the experts differently after the upcycling (Uni-MoE: each from its own modality's
trained FFN, `methods/unimoe.py`); the log records the structure, and the saved weights fill it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

from ..layers import SparseMoE
from .architecture import decoder_layers, expert_layers, mlp_attribute, resolve_layers
from .checkpoint import register_old_op, register_surgery
from .multimodal import MultimodalLM

__all__ = ["MoEConfig", "upcycle", "is_sparse", "ParameterCounts", "parameter_counts"]


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

    def __post_init__(self) -> None:
        """Refuse an impossible value, naming its field: the CLI builds this dataclass while it parses the config,
        so a bad `moe` stops the run before the model (or the data) is built."""
        for key in ("num_experts", "top_k"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"moe.{key} must be an integer >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k must be at most moe.num_experts ({self.num_experts}), got {self.top_k}")
        for key in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, key)
            if value is not None and not (_is_number(value) and 0 < value < math.inf):
                raise ValueError(f"moe.{key} must be a finite number > 0, or null (dropless), got {value!r}")
        if not (_is_number(self.router_jitter) and 0 <= self.router_jitter < 1):
            # the router's input is scaled by U(1 - jitter, 1 + jitter): from 1 on, by 0 or a negative factor
            raise ValueError(f"moe.router_jitter must be a number in [0, 1), got {self.router_jitter!r}")
        _check_layer_spec(self.layers)


# deeper than any model: a layer slice that selects none of this many layers selects none of any model's
_ANY_DEPTH = 100_000


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_layer_spec(spec: object) -> None:
    """A ValueError naming `moe.layers` unless it is "all", a slice that selects some layer of a deep enough model,
    or a non-empty list of distinct layer indices (whether they exist is known once the model is: `upcycle`)."""
    if isinstance(spec, str):
        try:
            selects = resolve_layers(spec, _ANY_DEPTH)
        except ValueError as err:  # not a slice, or a step of 0
            raise ValueError(f"moe.layers: {err}") from None
        if not selects:
            raise ValueError(f"moe.layers {spec!r} selects no decoder layer of any model")
        return
    if not isinstance(spec, (list, tuple)) or not spec or not all(_is_number(i) and int(i) == i for i in spec):
        raise ValueError(f"moe.layers must be 'all', a slice like '::2' or a non-empty list of layer indices, "
                         f"got {spec!r}")
    if len(set(spec)) != len(spec):
        raise ValueError(f"moe.layers lists a layer more than once: {spec!r}")


def upcycle(model: MultimodalLM, config: MoEConfig) -> list[int]:
    """Replace the chosen layers' MLPs by `SparseMoE` whose experts are copies of that MLP."""
    layers = decoder_layers(model.llm)
    chosen = resolve_layers(config.layers, len(layers))
    if not chosen:
        raise ValueError(f"moe.layers {config.layers!r} selects none of the model's {len(layers)} decoder layers")
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
    """Upcycled here, or a native Hugging Face MoE converted to SparseMoE (`stage: moe` fine-tunes it as is)."""
    return any(entry["op"] in ("upcycle", "native_moe") for entry in model.surgery)


@dataclass
class ParameterCounts:
    total: int  # every parameter of the model (vision tower included)
    activated: int  # parameters one token uses: a top-k of E routed experts counts k/E of each MoE layer's experts


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total and per-token activated parameters (sparse layers count only their top-k experts)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for _, module in expert_layers(model):
        # routed experts only: the router and a shared expert (with its gate) see every token
        experts = sum(p.numel() for name, p in module.named_parameters()
                      if not name.startswith(("router.", "shared_expert")))
        inactive += experts * (module.num_experts - module.top_k) // module.num_experts
    return ParameterCounts(total, total - inactive)


register_surgery("upcycle", lambda model, **args: upcycle(model, MoEConfig(**args)))


def _modality_experts_record(args: dict) -> dict:
    # Uni-MoE's upcycling, logged under its own op by older code: one expert per slot of `experts`, each slot
    # named by the modality whose FFN filled it; the structure is an upcycle's with those defaults
    config = MoEConfig(num_experts=len(args["experts"]), top_k=args["top_k"], layers=args["layers"],
                       capacity_factor=args["capacity_factor"], normalize_weights=args["normalize_weights"])
    return {"op": "upcycle", **asdict(config)}


register_old_op("modality_experts", _modality_experts_record)
