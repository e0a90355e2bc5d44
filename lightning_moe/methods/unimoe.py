"""Uni-MoE: several modality encoders and connectors, modality-specific experts, progressive training
(docs/unimoe.md).

Stages, each from the previous one's output (`backbone.pretrained`):
1. `align`: the connectors train (audio's query connector, the image/video MLP); LLM and encoders frozen.
2. `experts`: one CLI run per modality (`modality: image | audio | video`, or any modality registered
   in `lightning_moe.modalities`), each from stage 1's output
   on that modality's data only: the decoder layers' MLPs train (the method's `mlp` group), nothing
   else, so the runs differ from stage 1 (and from each other) only in their FFNs. A batch with another
   modality's inputs is an error.
3. `moe`: every chosen layer's MLP becomes a `SparseMoE` with one expert per slot of `moe.experts` (the
   base's upcycling, logged as `upcycle`, so loading the result needs only models/); expert j is then
   filled with the FFN of `moe.experts[j]`'s stage-2 run (`experts: {modality: path}`), or keeps the
   stage-1 FFN for a "dense" slot. The router is new and trains fully (the method's `router` group),
   LoRA (r=8, alpha=16) adapts q/k/v/o and every expert's projections (adapter kinds "lora" and
   "moe_lora"), everything else is frozen; aux loss 0.01 (the base's). Optional modality-affinity
   loss (off by default, an `extra_losses` term): an L1 pull of each modality token's router
   probabilities toward its configured expert set.

Evaluation outputs also carry each token's modality, so `RoutingStatistics` draws a modality × expert
heat map beside the domain × expert one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import SumMetric

from ..formats import load_backbone
from ..layers import SparseMoE
from ..models import (AdapterRule, MoEConfig, MultimodalLM, ParameterGroup, add_adapters, decoder_layers,
                      expert_layers, is_sparse, mlp_attribute, mlp_parameters)
from ..modalities import modalities, modality_names
from ..safe_load import checkpoint_safe
from .base import MultimodalMethod, Stage, StepOutput

__all__ = ["UniMoE", "UniMoELoRA", "AffinityLoss", "ModalityExpertsConfig", "fill_modality_experts",
           "non_mlp_differences"]

DENSE = "dense"  # an expert slot that keeps the model's own FFN (stage 1's)


@checkpoint_safe
@dataclass
class ModalityExpertsConfig:
    """Which FFN fills each expert slot, and the MoE layers (defaults: Uni-MoE's reference)."""

    # slot -> a registered modality or "dense" (`UniMoE` checks the names against the registry)
    experts: list[str] = field(default_factory=lambda: ["image", "audio", "video"])
    top_k: int = 2
    layers: str | list[int] = "all"  # Uni-MoE: every decoder layer
    normalize_weights: bool = True  # renormalise the top-k gate weights to sum to 1
    capacity_factor: float | None = None  # None = dropless (the reference drops no token)


def _mlp(model: MultimodalLM, index: int) -> nn.Module:
    layer = decoder_layers(model.llm)[index]
    return getattr(layer, mlp_attribute(layer))


def fill_modality_experts(model: MultimodalLM, slots: list[str], sources: dict[str, MultimodalLM]) -> None:
    """Expert slot j of every `SparseMoE` decoder layer i <- layer i's MLP of the stage-2 model `sources[slots[j]]`;
    a "dense" slot keeps what it holds (the upcycled copy of the model's own MLP). So a token routed entirely
    to slot j computes what the source model of slot j computes."""
    for i, layer in enumerate(decoder_layers(model.llm)):
        moe = getattr(layer, mlp_attribute(layer))
        if not isinstance(moe, SparseMoE):
            continue
        for slot, name in enumerate(slots):
            if name == DENSE:
                continue
            source_mlp = _mlp(sources[name], i)
            if isinstance(source_mlp, SparseMoE):
                raise ValueError(f"the {name} stage-2 model's layer {i} is sparse; a dense FFN is needed")
            single = SparseMoE.from_dense(source_mlp, 1, 1)  # its weights in the stacked layout
            with torch.no_grad():
                for own, theirs in ((moe.w_in, single.w_in), (moe.down_proj, single.down_proj),
                                    (moe.b_in, single.b_in), (moe.down_bias, single.down_bias)):
                    if own is not None:
                        own[slot].copy_(theirs[0])


def non_mlp_differences(model: MultimodalLM, other: MultimodalLM, atol: float = 0.0) -> list[str]:
    """Parameters outside the decoder MLPs that differ between two models of one architecture (stage 2
    trains only the MLPs, so the stage-2 models must agree with the base everywhere else)."""
    layers = decoder_layers(model.llm)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    mlp_prefixes = [f"{prefix}.{i}.{mlp_attribute(layer)}." for i, layer in enumerate(layers)]
    theirs = dict(other.named_parameters())
    differ = []
    for name, p in model.named_parameters():
        if any(name.startswith(m) for m in mlp_prefixes):
            continue
        q = theirs.get(name)
        if q is None or q.shape != p.shape or not torch.allclose(p.detach().float(), q.detach().float(), atol=atol, rtol=0):
            differ.append(name)
    return differ


def _router_parameters(model: MultimodalLM) -> Iterator[nn.Parameter]:
    for _, layer in expert_layers(model.llm):
        yield from layer.router.parameters()


@checkpoint_safe
@dataclass
class UniMoELoRA:
    """Stage 3's LoRA (Uni-MoE: r=8, alpha=16 on attention and the experts)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the attention LoRA's input (the experts' update lives in their weights)
    attention: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    experts: bool = True  # LoRA on every expert's gate/up/down projections ("moe_lora")


@checkpoint_safe
@dataclass
class AffinityLoss:
    """Modality affinity (the reference's optional L1 toward expert sets): for each token that comes from a
    modality's features, `mean_layers |p - u|_1`, with p its router probabilities and u uniform over the
    modality's expert set; added as `coef` × the mean over such tokens. Off (coef 0) by default."""

    coef: float = 0.0
    # modality -> expert slots its tokens should use; a modality not named here uses the slot(s) `moe.experts`
    # gives it; one with no slot is not pulled
    experts: dict[str, list[int]] = field(default_factory=dict)


class UniMoE(MultimodalMethod):
    STAGES = {
        "align": Stage(train=["connector"]),
        "experts": Stage(train=["mlp"]),
        "moe": Stage(train=["router", "adapters"], upcycle=True),
    }

    def __init__(
        self,
        stage: Literal["align", "experts", "moe"] = "align",
        modality: str | None = None,
        experts: dict[str, str] | None = None,
        moe: ModalityExpertsConfig | None = None,
        lora: UniMoELoRA | None = None,
        affinity: AffinityLoss | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            stage: align (connectors), experts (one modality's FFNs), moe (modality experts + router + LoRA).
            modality: the experts stage's modality, any registered one (`lightning_moe.modalities`: image,
                audio, video, and those registered beside them): its batches must carry no other modality's
                inputs.
            experts: moe stage: modality -> its stage-2 output (save_pretrained directory or .ckpt).
            moe: expert slots (a modality or "dense" each), top-k, layers of the moe stage.
            lora: the moe stage's LoRA on attention and experts.
            affinity: optional modality-affinity loss (off by default).
            **kwargs: MultimodalMethod's arguments (backbone, trainable, optimizer, aux_loss, ...).
        """
        if stage == "experts" and modality is None:
            raise ValueError("UniMoE stage 'experts' trains one modality's FFNs per run: set `modality`")
        names = modality_names()
        if modality is not None and modality not in names:
            raise ValueError(f"UniMoE: modality {modality!r} is not registered; registered modalities: {list(names)}")
        self.modality = modality
        self.expert_paths = dict(experts or {})
        self.moe_options = moe or ModalityExpertsConfig()
        self.lora = lora or UniMoELoRA()
        self.affinity = affinity or AffinityLoss()
        unknown = sorted(set(self.moe_options.experts) - {DENSE, *names})
        if unknown:
            raise ValueError(f"UniMoE: expert slots {unknown} are neither a registered modality {list(names)} nor "
                             f"{DENSE!r}")
        unknown = sorted(set(self.affinity.experts) - set(names))
        if unknown:
            raise ValueError(f"UniMoE: affinity.experts names {unknown}, which are not registered modalities "
                             f"{list(names)}")
        super().__init__(stage=stage, **kwargs)
        # per modality with an expert slot: routed slots of its tokens that went to its own slot(s), and all of them
        self.own_expert = nn.ModuleDict({f"{m}_{part}": SumMetric() for m in self.moe_options.experts if m != DENSE
                                         for part in ("own", "all")})
        self._eval_token_modality: torch.Tensor | None = None

    # ------------------------------------------------------------------ surgery and parameter groups
    @property
    def moe_config(self) -> MoEConfig:
        """The moe stage's MoE layers: one expert per slot of `moe.experts`."""
        o = self.moe_options
        return MoEConfig(num_experts=len(o.experts), top_k=o.top_k, layers=o.layers, capacity_factor=o.capacity_factor,
                         normalize_weights=o.normalize_weights)

    def parameter_groups(self) -> dict[str, ParameterGroup]:
        # stage 2 trains every decoder layer's feed-forward block; stage 3 only the sparse layers' routers
        # (their experts take LoRA)
        return {"router": _router_parameters, "mlp": mlp_parameters}

    def enter_stage(self, model: MultimodalLM) -> None:
        """moe: the base's upcycling into one expert per slot, each slot then filled with its modality's stage-2
        FFN (`fill_modality_experts`); a loaded stage-3 model keeps its experts."""
        if not self.stage_plan.upcycle or is_sparse(model):
            return
        wanted = sorted({e for e in self.moe_options.experts if e != DENSE})
        missing = [m for m in wanted if m not in self.expert_paths]
        if missing:
            raise ValueError(f"UniMoE stage 'moe': expert slots {self.moe_options.experts} need the stage-2 output of "
                             f"{missing}; name them in `experts: {{modality: path}}`")
        sources = {}
        for m in wanted:
            source = load_backbone(self.expert_paths[m], allow_unsafe=self.backbone.allow_unsafe_checkpoint)
            differ = non_mlp_differences(model, source)
            if differ:
                raise ValueError(
                    f"UniMoE stage 'moe': the {m} stage-2 model {self.expert_paths[m]} differs from the backbone "
                    f"outside the MLPs ({len(differ)} tensors, e.g. {differ[:3]}): stage 2 must start from the same "
                    "stage-1 output as stage 3 and train only the MLPs")
            sources[m] = source
        super().enter_stage(model)
        fill_modality_experts(model, self.moe_options.experts, sources)

    def configure_backbone(self, model: MultimodalLM) -> None:
        if self.stage != "moe" or any(e["op"] == "adapters" for e in model.surgery):
            return
        o = self.lora
        rules = [AdapterRule(kind="lora", targets=list(o.attention), r=o.r, alpha=o.alpha, dropout=o.dropout)]
        if o.experts:
            rules.append(AdapterRule(kind="moe_lora", targets=["mlp", "feed_forward", "block_sparse_moe"],
                                     layers=self.moe_options.layers, r=o.r, alpha=o.alpha))
        add_adapters(model, rules)

    # ------------------------------------------------------------------ loss
    def affinity_targets(self) -> dict[int, list[int]]:
        """Modality index (into the registry's order, `modality_names()`) -> expert slots its tokens are pulled toward."""
        targets = {}
        for index, m in enumerate(modality_names()):
            slots = self.affinity.experts.get(m, [j for j, e in enumerate(self.moe_options.experts) if e == m])
            if slots:
                targets[index] = list(slots)
        return targets

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        if self.stage == "experts":
            others = [s.name for s in modalities() if s.name != self.modality and s.values_key in batch]
            if others:
                raise ValueError(f"UniMoE stage 'experts' trains the {self.modality} FFNs on {self.modality} data only, "
                                 f"but a batch carries {others} inputs (domains {sorted(set(batch['domain']))})")
        step = super().compute_loss(batch)
        step.extras["token_modality"] = self.model.last_token_modality
        return step

    def extra_losses(self, step: StepOutput, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, float]]:
        if not self.affinity.coef or not step.routing:
            return {}
        affinity = self.affinity_loss(step.routing, self.model.last_token_modality, step.token_mask)
        return {"affinity_loss": (affinity, self.affinity.coef)}

    def affinity_loss(self, routing: list, token_modality: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Mean over modality tokens and layers of the L1 distance of router probabilities to the target set."""
        modality = token_modality.reshape(-1)
        real = token_mask.reshape(-1).bool()
        num_experts = routing[0].probs.shape[-1]
        target = torch.zeros(modality.shape[0], num_experts, device=modality.device)
        pulled = torch.zeros_like(real)
        for index, slots in self.affinity_targets().items():
            rows = (modality == index) & real
            target[rows.nonzero()[:, 0][:, None], torch.tensor(slots, device=modality.device)] = 1.0 / len(slots)
            pulled |= rows
        if not pulled.any():
            return routing[0].probs.new_zeros(())
        losses = [(r.probs[pulled] - target[pulled]).abs().sum(-1).mean() for r in routing]
        return torch.stack(losses).mean()

    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        out = super().eval_step(batch, stage)
        # the teacher-forced pass's token modalities (generation ran after it and replaced the model's attribute)
        out["token_modality"] = self._eval_token_modality
        return out

    def on_eval_batch(self, step: StepOutput, batch: dict[str, Any], stage: str) -> None:
        modality = self._eval_token_modality = step.extras.get("token_modality")
        if not step.routing or modality is None:
            return
        real = step.token_mask.reshape(-1).bool()
        flat = modality.reshape(-1)
        names = modality_names()
        for name in {m for m in self.moe_options.experts if m != DENSE}:
            rows = real & (flat == names.index(name))
            if not rows.any():
                continue
            slots = torch.tensor([j for j, e in enumerate(self.moe_options.experts) if e == name], device=flat.device)
            chosen = torch.cat([r.indices[rows] for r in step.routing])  # (tokens × layers, k)
            self.own_expert[f"{name}_own"].update(torch.isin(chosen, slots).sum().float())
            self.own_expert[f"{name}_all"].update(torch.tensor(float(chosen.numel()), device=flat.device))

    def eval_epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """`<stage>/routing/<modality>_own_expert_share`: the share of a modality's routed token slots (over all
        MoE layers) that went to its own expert slot(s); routing blind to modality gives (its slots) / E."""
        values = {}
        for name in sorted({m for m in self.moe_options.experts if m != DENSE}):
            own, total = self.own_expert[f"{name}_own"], self.own_expert[f"{name}_all"]
            if total.update_called:
                count = total.compute()
                if count > 0:
                    values[f"{stage}/routing/{name}_own_expert_share"] = own.compute() / count
            own.reset()
            total.reset()
        return values
