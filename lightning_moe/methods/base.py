"""`MultimodalMethod`: what every method shares, once.

A method subclass says only what is specific to it: its stages as data (`STAGES`: which parameter
groups train in each, whether entering it upcycles the dense MLPs), any other rewriting of the
backbone (`configure_backbone`, e.g. adapters), parameter groups of its own (`parameter_groups`),
loss terms it adds (`extra_losses`) and, if it differs, its whole loss (`compute_loss`). This base
owns `stage` and the `trainable` override, builds or loads the `MultimodalLM`, upcycles it when the
stage says so, computes the LM loss plus the routing losses of every sparse layer, evaluates per
domain (LM loss, exact match from greedy generation, POPE metrics) with public hooks around it for
what a method adds (docs/adding_a_method.md), and sets up the optimizer.

Validation/test batches come from one dataloader per domain; each sample also carries its
`domain`, so metrics are kept per domain and overall.
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, InitVar, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from ..layers import RouterOutput, load_balancing_loss, router_z_loss
from ..metrics import ExactMatch, POPEMetrics
from ..formats import CHECKPOINT_CONFIG_KEY, load_backbone
from ..models import (MoEConfig, MultimodalLM, ParameterGroup, build_multimodal, is_sparse, routed_layers,
                      set_trainable, upcycle)
from ..models.encoders import (FLAT_KEYS, EncoderConfig, default_encoders, describe_encoders, encoder_configs,
                               encoders_from_flat)
from ..models.multimodal import batch_inputs
from ..safe_load import checkpoint_safe, load_torch_file, without_loading_opt_ins
from ..strategies import ExpertParallelStrategy, shard_blocks, shard_experts
from ..tokens import DEFAULT_TOKENIZER
from .from_checkpoint import TOKENIZER_FILES_KEY, method_tokenizer, rebuilding_from, recorded_model_config, tokenizer_files
from ..tokens import IGNORE_INDEX


checkpoint_safe(MoEConfig)  # models/' config that MoETuning and MoDDistillation take (models/ keeps no torch.load policy)


checkpoint_safe(EncoderConfig)  # a BackboneConfig's encoders, pickled with it
FLAT_NOT_GIVEN = "(unset; deprecated, see encoders)"  # the default of BackboneConfig.vision_tower


@checkpoint_safe
@dataclass
class BackboneConfig:
    """Which model to build (tiny presets or Hugging Face names/paths), or which stage output to load.

    `encoders` maps each modality the model reads (`lightning_moe/modalities/`) to its `EncoderConfig`; a
    modality read through another's encoder (video: the image tower) names only its pooling:

        encoders:
          image: {tower: tiny-clip, feature_layer: -1, connector: mlp2x_gelu}
          audio: {tower: tiny-whisper, connector: query, connector_options: {num_queries: 8}}
          video: {pooling: concat}

    The flat keys of older configs (`vision_tower`, `vision_overrides`, `vision_feature_layer`, `connector`,
    `audio_tower`, `audio_overrides`, `audio_connector`, `audio_connector_options`, `video_pooling`) are still
    read, with a deprecation warning: each sets its field of `encoders` (`models.encoders.encoders_from_flat`),
    and `vision_tower: null` (`audio_tower`, `video_pooling`) removes its modality.
    """

    llm: str = "tiny-llama"  # preset name, or a Hugging Face causal-LM name/path
    llm_overrides: dict[str, Any] = field(default_factory=dict)  # config fields for presets, kwargs for from_pretrained
    # modality -> its encoder and connector; {} = text only. Default: the tiny CLIP tower, LLaVA's feature layer
    # and projector
    encoders: dict[str, EncoderConfig] = field(
        default_factory=lambda: {m: asdict(e) for m, e in default_encoders().items()})
    # a previous stage's save_pretrained directory or .ckpt, or a llava-hf / original-LLaVA directory or Hub id
    # (docs/hf_interop.md); replaces the above
    pretrained: str | None = None
    torch_dtype: str | None = None  # e.g. "bfloat16" for real checkpoints
    # Loading never runs code from a file (lightning_moe/safe_load.py, docs/security.md). These opt-ins are for
    # files you trust: full pickle for .ckpt files (backbone and teacher) and pickle-only model directories ...
    allow_unsafe_checkpoint: bool = False
    trust_remote_code: bool = False  # ... and a Hugging Face model's own Python code
    # an LLM directory whose weights lack some of the model's tensors is an error; true starts those from random
    allow_missing_weights: bool = False
    # the flat form (deprecated; see the class docstring): read into `encoders`, not kept. None = not given, but
    # for vision_tower, whose None was the text-only model
    vision_tower: InitVar[str | None] = FLAT_NOT_GIVEN
    vision_overrides: InitVar[dict[str, Any] | None] = None
    vision_feature_layer: InitVar[int | None] = None
    connector: InitVar[str | None] = None
    audio_tower: InitVar[str | None] = None
    audio_overrides: InitVar[dict[str, Any] | None] = None
    audio_connector: InitVar[str | None] = None
    audio_connector_options: InitVar[dict[str, Any] | None] = None
    video_pooling: InitVar[Literal["mean", "concat"] | None] = None

    def __post_init__(self, *flat_values: Any) -> None:
        flat = dict(zip(FLAT_KEYS, flat_values, strict=True))  # the InitVars above, in FLAT_KEYS' order
        flat = {k: v for k, v in flat.items() if (v != FLAT_NOT_GIVEN if k == "vision_tower" else v is not None)}
        self.encoders = encoder_configs(encoders_from_flat(flat, self.encoders) if flat else self.encoders)
        if flat:
            rank_zero_warn(f"backbone: {', '.join(flat)} {'is' if len(flat) == 1 else 'are'} deprecated; write "
                           f"`encoders: {describe_encoders(self.encoders)}` instead (docs/configs.md)",
                           category=FutureWarning)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a checkpoint written before a field existed holds no value for it: its default; one written before
        # `encoders` holds the flat keys, which gave exactly these encoders
        flat = {k: state.pop(k) for k in list(state) if k in FLAT_KEYS}
        defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                    for f in fields(self) if f.default is not MISSING or f.default_factory is not MISSING}
        self.__dict__.update({**defaults, **state})
        if flat:
            self.encoders = encoders_from_flat(flat)
        self.encoders = encoder_configs(self.encoders)


@checkpoint_safe
@dataclass
class AuxLossConfig:
    """Routing losses, summed over every sparse layer (see README: what a healthy value is)."""

    # a registered balance form (layers/routing.py): gshard (MoE-LLaVA, balanced = 1 per layer) | switch (Mixtral,
    # balanced = top_k) | mole (LLaVA-MoLE, registered by its adapter kind)
    form: str = "gshard"
    coef: float = 0.01
    z_coef: float = 0.0  # router z-loss (ST-MoE uses 1e-3)
    layers: str = "sum"  # sum of per-layer losses | mean | concat (pooled over layers: the LLaVA-MoLE reference)


@dataclass
class GenerationSettings:
    """How `predict` generates answers. Validation and test always decode greedily (`max_new_tokens`
    of the method), so their exact match stays comparable across runs; these settings are for the
    answers `main.py predict` writes."""

    do_sample: bool = False  # False: greedy (argmax), the default
    temperature: float = 1.0  # sampling: logits / temperature
    top_k: int | None = None  # sampling: keep the k likeliest tokens; None = no limit
    top_p: float | None = None  # sampling: keep the smallest set reaching probability p; None = no limit
    # sampling: batch b of dataloader d draws from torch's RNG seeded with seed + 100003 * d + b, so a
    # run is reproducible and a batch's answers do not depend on the batches before it; None = unseeded
    seed: int | None = 0
    max_new_tokens: int | None = None  # None: the method's max_new_tokens

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for Hugging Face `generate` (whose defaults, e.g. top_k=50, must not leak in)."""
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.do_sample:
            return {"do_sample": False}
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"generation.top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        return {"do_sample": True, "temperature": self.temperature,
                "top_k": self.top_k if self.top_k is not None else 0,  # 0 disables Hugging Face's top-k filter
                "top_p": self.top_p if self.top_p is not None else 1.0}


@dataclass
class StepOutput:
    """What one forward pass of `compute_loss` gives the training step and the evaluation hooks."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor]  # named loss terms, logged under the stage prefix
    token_mask: torch.Tensor  # (B, T') real tokens of the spliced sequence
    routing: list[RouterOutput]  # one per sparse layer, captured right after the forward
    per_sample_loss: torch.Tensor | None = None  # (B,) mean LM loss per sample, for per-domain metrics
    per_sample_tokens: torch.Tensor | None = None  # (B,) trained tokens per sample
    # a method's own statistics of this forward pass (e.g. MoRA's rank usage), read by its `on_eval_batch`;
    # not logged by the base (what should be logged goes into `logs`)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One stage of a method: the parameter groups that train (models' `set_trainable` groups: vision,
    connector, llm, moe, adapters, and the method's own `parameter_groups`), and whether entering it
    upcycles a dense backbone's MLPs into sparse MoE layers (with the method's `moe_config`; a backbone
    that is already sparse keeps its experts)."""

    train: tuple[str, ...]
    upcycle: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", tuple(self.train))  # lists are welcome; the table stays immutable


def check_stage_parameter(cls: type) -> None:
    """A method class's `STAGES` and the `stage` parameter jsonargparse reads must agree.

    The CLI lists and checks a method's stages from the `Literal` annotation of a `stage` parameter of
    `__init__` (jsonargparse reads signatures, not class attributes): a class that declares `STAGES`
    gives its own `__init__` that parameter, typed `Literal[<the table's names>]`, with a default from
    the table. Raises TypeError at class creation when they disagree, so they cannot drift apart.
    """
    stages = getattr(cls, "STAGES", None)
    if not isinstance(stages, dict) or not stages or not all(
            isinstance(k, str) and isinstance(v, Stage) for k, v in stages.items()):
        raise TypeError(f"{cls.__qualname__}.STAGES must map stage names to Stage(...), got {stages!r}")
    init = cls.__dict__.get("__init__")
    has_parameter = init is not None and "stage" in inspect.signature(init).parameters
    example = (f"def __init__(self, stage: Literal[{', '.join(map(repr, stages))}] = {next(iter(stages))!r}, "
               "**kwargs): super().__init__(stage=stage, **kwargs)")
    if "STAGES" in cls.__dict__ and not has_parameter:
        raise TypeError(f"{cls.__qualname__} declares STAGES, so its __init__ needs the `stage` parameter the CLI "
                        f"reads, e.g. `{example}`")
    if not has_parameter:
        return
    hint = init.__annotations__.get("stage")
    if isinstance(hint, str):  # postponed annotation (`from __future__ import annotations`): only this one is needed
        hint = eval(hint, init.__globals__)  # noqa: S307  (what typing.get_type_hints does, for one name)
    default = inspect.signature(init).parameters["stage"].default
    if get_origin(hint) is not Literal or set(get_args(hint)) != set(stages) or default not in stages:
        raise TypeError(f"{cls.__qualname__}.__init__'s `stage` is {hint} = {default!r}, but its STAGES are "
                        f"{list(stages)}: annotate it Literal[...] of exactly those names, default one of them "
                        f"(`{example}`)")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: the logits at each position predict the next position's label. Returns (batch
    mean over trained tokens, per-sample sum, per-sample count).

    Computed in float32 over the logits' rows as they lie (B * T rows of V, no copy of float32 logits), the
    last position predicting nothing: the softmax runs along contiguous memory, which is faster and rounds
    less than over the class dimension of a transposed (B, V, T) view."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    token_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(targets.shape)
    trained = targets != IGNORE_INDEX
    per_sample, counts = token_loss.sum(1), trained.sum(1)
    return per_sample.sum() / counts.sum().clamp(min=1), per_sample, counts


class MultimodalMethod(L.LightningModule):
    """The shared LightningModule: build/load, stage plan, loss, per-domain evaluation, optimizer.

    A method declares its stages as data, a class attribute mapping each stage name to a `Stage`
    (which parameter groups train, whether entering it upcycles the dense MLPs), and gives its
    `__init__` the `stage` parameter typed `Literal[<those names>]` (checked against the table when
    the class is created), so `--help` lists the stages and the CLI rejects others:

        STAGES = {"align": Stage(train=["connector"]), "moe": Stage(train=["moe", "connector"], upcycle=True)}

    Public hooks, for what a method adds to the shared steps (none needs overriding the steps themselves):

    - `enter_stage(model)`: the surgery the stage itself asks for; the base upcycles when the stage says so
      (a method may fill the new experts afterwards: Uni-MoE's from its stage-2 models).
    - `configure_backbone(model)`: rewrite the model in place (e.g. adapters), after the stage's upcycling
      and before the freeze plan.
    - `parameter_groups() -> dict`: the method's own parameter groups (name -> model -> parameters), which
      its stages and `trainable` may name beside models' `PARAMETER_GROUPS` (Uni-MoE's `router`, `mlp`).
    - `extra_losses(step, batch) -> dict`: loss terms the method adds to the base's loss, name -> (value,
      coefficient); the value is logged under its name, coefficient × value joins the loss.
    - `compute_loss(batch) -> StepOutput`: the loss of one batch (training and evaluation). Extra per-step
      statistics travel in `StepOutput.logs` (logged in training) or `StepOutput.extras` (for the hooks).
    - `on_eval_batch_start(batch, stage)`: before an evaluation batch's forward pass (`stage` is "val" or
      "test"), e.g. select a task's adapters or start recording layer inputs.
    - `on_eval_batch(step, batch, stage)`: after the batch's teacher-forced pass, with its `StepOutput`,
      e.g. update a method's own metrics from `step.logs` / `step.extras`.
    - `eval_epoch_metrics(stage) -> dict`: at the end of an evaluation pass, before the per-domain metrics
      (`eval_metrics["<stage>/<domain>"]`) are logged and reset; the values returned are logged as given
      (reduce them across processes first, e.g. with a torchmetric).
    - `eval_step(batch, stage) -> dict`: the whole per-batch evaluation (calls the two batch hooks); its
      output (routing, token mask, domains, predictions) is what callbacks receive.

    Args:
        stage: the stage to run, one of the method's `STAGES`; it decides which groups train and whether
            the backbone is upcycled first.
        trainable: parameter groups that train instead of the stage's plan (e.g. the quickstart trains a
            sparse model from scratch with ["llm", "connector"]).
    """

    # stage name -> Stage; a subclass that declares its own also types its `stage` parameter (above)
    STAGES: ClassVar[dict[str, Stage]] = {"finetune": Stage(train=["connector", "llm"])}
    # the MoE layers an upcycling stage makes; a method with such a stage sets it (its `moe` option)
    moe_config: MoEConfig | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_stage_parameter(cls)

    def __init__(
        self,
        backbone: BackboneConfig | None = None,
        tokenizer: str = DEFAULT_TOKENIZER,
        train_vision_tower: bool = False,
        aux_loss: AuxLossConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        max_new_tokens: int = 8,
        pope_domains: list[str] | None = None,
        generate_in_eval: bool = True,
        generation: GenerationSettings | None = None,
        stage: str = "finetune",
        trainable: list[str] | None = None,
    ):
        """
        Args:
            backbone: the model to build or load.
            tokenizer: tokenizer name or path; must match the data module's.
            train_vision_tower: tiny presets have no pretrained tower, so the quickstart trains it;
                real checkpoints keep it frozen as the references do.
            aux_loss: load-balancing / z-loss settings for sparse layers.
            optimizer, scheduler: callables taking the trainable parameters / the optimizer.
            max_new_tokens: generation length for exact-match evaluation.
            pope_domains: domains with yes/no answers that also get POPE metrics.
            generate_in_eval: run greedy generation in validate/test (exact match); LM loss only if False.
            generation: how `predict` generates (greedy by default; sampling with a seed, length).
            stage: one of the method's `STAGES` (a subclass types it as their `Literal`).
            trainable: parameter groups that train instead of the stage's plan; None = the stage's.
        """
        if stage not in self.STAGES:
            raise ValueError(f"{type(self).__name__}: unknown stage {stage!r}; choose one of {list(self.STAGES)}")
        super().__init__()
        # `generation` is a setting of a prediction run, not of the trained model: kept out of the checkpoint's
        # hyperparameters, which LightningCLI would otherwise apply over `--model.init_args.generation...`
        # when `predict --ckpt_path` is given
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "generation"])
        self.stage, self.trainable = stage, trainable
        self.backbone = backbone or BackboneConfig()
        self.aux = aux_loss or AuxLossConfig()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.train_vision_tower = train_vision_tower
        self.max_new_tokens, self.generate_in_eval = max_new_tokens, generate_in_eval
        self.generation = generation or GenerationSettings()
        self.generation.generate_kwargs()  # a bad setting fails here, not after a model has loaded
        self.pope_domains = set(pope_domains or [])
        self.tokenizer = method_tokenizer(tokenizer)
        recorded = recorded_model_config()
        if recorded is not None:  # load_from_checkpoint / --ckpt_path: the record holds the model and its surgery
            self.model = MultimodalLM.from_config_dict(recorded)
        else:
            self.model = self.build_backbone()
            self.enter_stage(self.model)
            self.configure_backbone(self.model)
        groups = self.trainable_groups() + (["vision"] if train_vision_tower else [])
        self.trainable_names = set_trainable(self.model, groups, self.parameter_groups())
        self.refresh_routed_layers()
        self.eval_metrics = nn.ModuleDict()  # "<stage>/<domain>" -> per-domain metrics, made on first use

    # ------------------------------------------------------------------ what subclasses say
    def build_backbone(self) -> MultimodalLM:
        b = self.backbone
        if b.pretrained:  # a stage's output, or a llava-hf / original-LLaVA directory (lightning_moe.formats)
            return load_backbone(b.pretrained, allow_unsafe=b.allow_unsafe_checkpoint, tokenizer=self.tokenizer,
                                 torch_dtype=b.torch_dtype, trust_remote_code=b.trust_remote_code)
        return build_multimodal(self.tokenizer, b.llm, b.llm_overrides, torch_dtype=b.torch_dtype,
                                trust_remote_code=b.trust_remote_code, allow_unsafe=b.allow_unsafe_checkpoint,
                                allow_missing_weights=b.allow_missing_weights, encoders=b.encoders)

    @property
    def stage_plan(self) -> Stage:
        """The running stage's entry of `STAGES`."""
        return self.STAGES[self.stage]

    def enter_stage(self, model: MultimodalLM) -> None:
        """Surgery the stage itself asks for, before `configure_backbone`: an upcycling stage turns the
        MLPs named in `moe_config` into sparse MoE layers whose experts are copies of the dense MLP. A
        backbone that is already sparse (a previous sparse stage's output, an MoE-tuned model) keeps its experts."""
        if not self.stage_plan.upcycle or is_sparse(model):
            return
        if self.moe_config is None:
            raise ValueError(f"{type(self).__name__}: stage {self.stage!r} upcycles the backbone, but the method "
                             "sets no `moe_config` (the MoE layers to make)")
        upcycle(model, self.moe_config)

    def configure_backbone(self, model: MultimodalLM) -> None:
        """Rewrite the model in place (e.g. adapters); runs after the stage's upcycling, before the freeze plan."""

    def trainable_groups(self) -> list[str]:
        """Parameter groups (models' `set_trainable`) that train: `trainable` if given, else the stage's plan."""
        return list(self.trainable if self.trainable is not None else self.stage_plan.train)

    def parameter_groups(self) -> dict[str, ParameterGroup]:
        """The method's own parameter groups, beside models' `PARAMETER_GROUPS`: name -> function(model)
        yielding the group's parameters. Its stages and `trainable` may name them."""
        return {}

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        """LM cross-entropy on assistant tokens + coef × load balancing + z_coef × z-loss + `extra_losses`."""
        out = self.model(**self.model_inputs(batch), labels=batch["labels"], loss_logits_only=True)
        lm_loss, per_sample, counts = causal_lm_loss(out.logits, out.labels)
        logs = {"lm_loss": lm_loss}
        routing, routing_loss = self.routing_losses(out.attention_mask, logs)
        step = StepOutput(lm_loss + routing_loss, logs, out.attention_mask, routing, per_sample / counts.clamp(min=1),
                          counts)
        for name, (value, coef) in self.extra_losses(step, batch).items():
            logs[name] = value
            step.loss = step.loss + coef * value
        logs["loss"] = step.loss
        return step

    def extra_losses(self, step: StepOutput, batch: dict[str, Any]) -> dict[str, tuple[torch.Tensor, float]]:
        """Loss terms the method adds to `compute_loss`'s, computed from the batch's forward pass (`step`:
        its LM and routing losses so far, routing, token mask; the model's attributes of that pass):
        name -> (value, coefficient). The value is logged under its name; coefficient × value joins the loss."""
        return {}

    def routing_losses(self, attention_mask: torch.Tensor, logs: dict[str, torch.Tensor]) -> tuple[list[RouterOutput], Any]:
        """The last forward's routing and coef × load balancing + z_coef × z-loss (0 if dense); terms go into `logs`."""
        routing = self.collect_routing()
        loss: Any = 0.0
        if routing:
            mask = attention_mask.reshape(-1).bool()
            logs["aux_loss"] = load_balancing_loss(routing, mask, form=self.aux.form, layers=self.aux.layers)
            loss = self.aux.coef * logs["aux_loss"]
            if self.aux.z_coef:
                logs["z_loss"] = router_z_loss(routing, mask)
                loss = loss + self.aux.z_coef * logs["z_loss"]
        return routing, loss

    # ------------------------------------------------------------------ shared machinery
    @staticmethod
    def model_inputs(batch: dict[str, Any], prompt: bool = False) -> dict[str, Any]:
        """The tensors the model reads from a batch (training sequence, or the generation prompt)."""
        return batch_inputs(batch, prompt)

    def refresh_routed_layers(self) -> None:
        """Find the model's routed layers again, after something swapped them (e.g. `ExpertOffloading`)."""
        self._routed = [m for _, m in routed_layers(self.model)]

    def collect_routing(self) -> list[RouterOutput]:
        return [m.last_routing for m in self._routed if m.last_routing is not None]

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any], **generate_kwargs: Any) -> list[str]:
        """Answers to the batch's prompts: greedy with the method's `max_new_tokens` unless kwargs say otherwise."""
        inputs = self.model_inputs(batch, prompt=True)
        generate_kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        new_tokens = self.model.generate(
            inputs.pop("input_ids"), inputs.pop("attention_mask"),
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            **inputs, **generate_kwargs,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def predict_answers(self, batch: dict[str, Any], batch_idx: int = 0, dataloader_idx: int = 0) -> list[str]:
        """Answers as `generation` says: greedy, or sampled from an RNG seeded for this batch."""
        settings = self.generation
        kwargs = settings.generate_kwargs()
        if settings.max_new_tokens is not None:
            kwargs["max_new_tokens"] = settings.max_new_tokens
        if not settings.do_sample or settings.seed is None:
            return self.generate_answers(batch, **kwargs)
        # Hugging Face samples from torch's global RNG: seed it for this batch, and restore it afterwards
        # so that sampling leaves the run's other random streams as they were
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed + 100003 * dataloader_idx + batch_idx)
            return self.generate_answers(batch, **kwargs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        step = self.compute_loss(batch)
        self.log_dict({f"train/{k}": v for k, v in step.logs.items()}, prog_bar=False, batch_size=len(batch["domain"]))
        self.log("loss", step.logs["loss"], prog_bar=True, logger=False)
        return {"loss": step.loss, "routing": step.routing, "token_mask": step.token_mask}

    def metrics_for(self, stage: str, domain: str) -> nn.ModuleDict:
        """The per-domain metrics of an evaluation pass (`stage` "val" or "test"), made on first use."""
        key = f"{stage}/{domain}"
        if key not in self.eval_metrics:
            metrics = {"lm_loss": MeanMetric(), "exact_match": ExactMatch()}
            if domain in self.pope_domains:
                metrics["pope"] = POPEMetrics()
            self.eval_metrics[key] = nn.ModuleDict(metrics).to(self.device)
        return self.eval_metrics[key]

    # ------------------------------------------------------------------ evaluation hooks (class docstring)
    def on_eval_batch_start(self, batch: dict[str, Any], stage: str) -> None:
        """Before an evaluation batch's forward pass; `stage` is "val" or "test"."""

    def on_eval_batch(self, step: StepOutput, batch: dict[str, Any], stage: str) -> None:
        """After an evaluation batch's teacher-forced pass (and generation), with that pass's `StepOutput`."""

    def eval_epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """Extra values to log at the end of an evaluation pass, read before the per-domain metrics reset."""
        return {}

    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        """Evaluate one batch: LM loss per domain, greedy answers for exact match (and POPE)."""
        self.on_eval_batch_start(batch, stage)
        step = self.compute_loss(batch)
        predictions = self.generate_answers(batch) if self.generate_in_eval else None
        for i, domain in enumerate(batch["domain"]):
            metrics = self.metrics_for(stage, domain)
            metrics["lm_loss"].update(step.per_sample_loss[i], weight=step.per_sample_tokens[i])
        for domain in sorted(set(batch["domain"])):
            idx = [i for i, d in enumerate(batch["domain"]) if d == domain]
            metrics = self.metrics_for(stage, domain)
            if predictions is not None:
                preds, answers = [predictions[i] for i in idx], [batch["answers"][i] for i in idx]
                metrics["exact_match"].update(preds, answers)
                if "pope" in metrics:
                    metrics["pope"].update(preds, answers)
        self.on_eval_batch(step, batch, stage)
        return {"routing": step.routing, "token_mask": step.token_mask, "domain": batch["domain"],
                "predictions": predictions}

    def log_eval_epoch(self, stage: str) -> None:
        """Log the pass's per-domain metrics, their means over domains, and the method's `eval_epoch_metrics`."""
        extra = self.eval_epoch_metrics(stage)
        values: dict[str, torch.Tensor] = {}
        exact, counts, losses = [], [], []
        for key, metrics in self.eval_metrics.items():
            if not key.startswith(f"{stage}/"):
                continue
            values[f"{key}/lm_loss"] = metrics["lm_loss"].compute()
            losses.append(values[f"{key}/lm_loss"])
            if metrics["exact_match"].total > 0:
                values[f"{key}/exact_match"] = metrics["exact_match"].compute()
                exact.append(values[f"{key}/exact_match"])
                counts.append(metrics["exact_match"].total)
            if "pope" in metrics and (metrics["pope"].tp + metrics["pope"].fp + metrics["pope"].tn + metrics["pope"].fn) > 0:
                values.update({f"{key}/{k}": v for k, v in metrics["pope"].compute().items()})
            for metric in metrics.values():
                metric.reset()
        if losses:
            values[f"{stage}/lm_loss"] = torch.stack(losses).mean()
        if exact:
            # the mean over domains weighs every domain equally, whatever its size
            values[f"{stage}/exact_match"] = torch.stack(exact).mean()
        self.log_dict(values, sync_dist=True)
        if extra:
            self.log_dict(extra)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self.log_eval_epoch("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, str]]:
        predictions = self.predict_answers(batch, batch_idx, dataloader_idx)
        return [{"id": i, "domain": d, "prediction": p, "answer": a}
                for i, d, p, a in zip(batch["id"], batch["domain"], predictions, batch["answers"])]

    def configure_model(self) -> None:
        """Shard the model when the strategy gives a device mesh (Lightning's `ModelParallelStrategy`, FSDP2:
        configs/strategies/fsdp2.yaml): one unit per transformer block, so each `SparseMoE` stays whole with
        its layer (strategies.shard_blocks); with `ExpertParallelStrategy` (configs/strategies/ep.yaml) the experts
        are first split over the data-parallel ranks and left out of FSDP2 (strategies.shard_experts). Every other
        strategy has no mesh and keeps the model as built."""
        if self.device_mesh is not None:
            data_parallel = self.device_mesh["data_parallel"]
            expert_parallel = isinstance(self.trainer.strategy, ExpertParallelStrategy)
            experts = shard_experts(self.model, data_parallel) if expert_parallel else None
            shard_blocks(self.model, data_parallel, ignored_params=experts)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__}: the freeze plan leaves no trainable parameter")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # lets the next stage (or inference, or load_from_checkpoint anywhere) rebuild the model and its
        # tokenizer from the checkpoint alone (from_checkpoint.py)
        checkpoint[CHECKPOINT_CONFIG_KEY] = self.model.config_dict()
        checkpoint[TOKENIZER_FILES_KEY] = tokenizer_files(self.tokenizer)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "MultimodalMethod":
        """Lightning's `load_from_checkpoint`, with the model rebuilt from the checkpoint's own record, so it works
        from any working directory and without the stage directories, base model or teacher it was trained from. The
        checkpoint's hyperparameters give no loading opt-in (`safe_load.without_loading_opt_ins`)."""
        if not isinstance(checkpoint_path, (str, Path)):  # a file object: read once, by Lightning, as before
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        checkpoint = load_torch_file(checkpoint_path)
        if "backbone" not in kwargs:  # a backbone the caller passes is theirs; the checkpoint's gives no opt-in
            hparams = without_loading_opt_ins(checkpoint.get("hyper_parameters") or {}, checkpoint_path)
            if "backbone" in hparams:
                kwargs["backbone"] = hparams["backbone"]
        with rebuilding_from(checkpoint):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
