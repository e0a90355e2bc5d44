"""Adapter surgery through the adapter-kind registry (`layers/adapters/`): plan, add, save, load,
merge, and the tensors that train. No branch here names a kind; a new kind is one registered file.

A rule (`AdapterRule`) names a registered kind, the modules it targets and the decoder layers, and
carries that kind's own config. A module matches a target when its name (relative to the LLM,
e.g. `model.layers.0.self_attn.q_proj`) equals it, ends with `.<target>`, or fully matches it as a
regular expression (peft's rule); a kind with target "linear" wraps `nn.Linear`s, one with target
"mlp" a decoder layer's MLP ("mlp" for Llama/Phi). With several rules, the first rule that matches
a module wins, and a module inside an adapted one is never adapted again.

Surgery log entries: `{"op": "adapters", "configs": [{"kind", "targets", "layers", <the kind's fields>}]}`,
and `{"op": "add_adapter_task", "r": r}` for a continual task added to every adapter whose kind has tasks.
Records older code wrote are read as these (the last section of this file).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..layers.adapters import adapter_kind, adapter_kinds, adapter_tensors, kind_of, trainable_adapter_tensors
from ..layers.routing import TopKRouter
from .architecture import adapter_modules, decoder_layers, mlp_attribute, resolve_layers
from .checkpoint import adapter_ops, canonical_log, register_old_op, register_surgery, replay_surgery
from .multimodal import MultimodalLM

__all__ = ["AdapterRule", "plan_adapters", "add_adapters", "add_adapter_task", "adapter_parameters",
           "save_adapters", "load_adapters", "merge_lora", "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class AdapterRule:
    """Which modules of which decoder layers get which kind of adapter, with that kind's options.

    `AdapterRule(kind="lora", targets=["q_proj"], layers="all", r=4, alpha=8)`: the keyword
    arguments after `layers` are the fields of the kind's config dataclass (unknown ones are an error).
    """

    def __init__(self, kind: str = "lora", targets: list[str] | str | None = None,
                 layers: str | list[int] = "all", **options: Any) -> None:
        self.kind = kind
        spec = adapter_kind(kind)
        self.targets = [targets] if isinstance(targets, str) else list(DEFAULT_TARGETS if targets is None else targets)
        if not self.targets:
            raise ValueError(f"{kind} adapter rule has no targets")
        self.layers = layers
        fields = {f.name for f in dataclasses.fields(spec.config)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"{kind} adapter rule: unknown options {unknown}; the {kind} kind takes "
                             f"{sorted(fields)} (besides kind, targets, layers)")
        self.config = spec.config(**options)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> AdapterRule:
        """A rule from its logged / configured form."""
        if isinstance(record, AdapterRule):
            return record
        return cls(**record)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "targets": list(self.targets), "layers": self.layers,
                **dataclasses.asdict(self.config)}

    def matches(self, name: str) -> bool:
        return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in self.targets)

    def build(self, module: nn.Module) -> nn.Module:
        return adapter_kind(self.kind).build(module, self.config)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AdapterRule) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"AdapterRule({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def plan_adapters(model: MultimodalLM, rules: list[AdapterRule | dict[str, Any]]) -> dict[str, AdapterRule]:
    """Module name (relative to the LLM) -> the rule that adapts it. The one place that decides."""
    rules = [AdapterRule.from_dict(r) for r in rules]
    targets = [adapter_kind(r.kind).target for r in rules]
    layers = decoder_layers(model.llm)
    prefix = next(n for n, m in model.llm.named_modules() if m is layers)
    chosen = [set(resolve_layers(r.layers, len(layers))) for r in rules]
    plan: dict[str, AdapterRule] = {}
    for i, layer in enumerate(layers):
        wants_mlp = any(t == "mlp" and i in in_layers for t, in_layers in zip(targets, chosen))
        mlp = getattr(layer, mlp_attribute(layer)) if wants_mlp else None
        claimed: list[str] = []  # adapted (or already adapter) modules: their insides are skipped
        # a router reads its projection's weight itself (float32 routing), so an adapter there would be bypassed
        routers = {f"{sub}.proj" if sub else "proj" for sub, m in layer.named_modules() if isinstance(m, TopKRouter)}
        for sub, module in layer.named_modules():
            name = f"{prefix}.{i}.{sub}" if sub else f"{prefix}.{i}"
            if any(name.startswith(c + ".") for c in claimed):
                continue
            is_adapter = kind_of(module) is not None
            for rule, target, in_layers in zip(rules, targets, chosen):
                if i not in in_layers or not rule.matches(name):
                    continue
                if is_adapter:
                    raise ValueError(f"{name} already has an adapter ({type(module).__name__}); adapt it once")
                if sub in routers:
                    raise ValueError(f"{name} is a MoE router's projection: the router computes its logits from "
                                     f"the weight directly and takes no adapter ({rule.kind} targets {rule.targets}); "
                                     "train the router itself instead (its weights are in the `moe` trainable group)")
                if (module is mlp) if target == "mlp" else isinstance(module, nn.Linear):
                    plan[name] = rule
                    break
            if name in plan or is_adapter:
                claimed.append(name)
    for rule, target, in_layers in zip(rules, targets, chosen):
        if in_layers and not any(r is rule for r in plan.values()):
            what = "a decoder layer's MLP" if target == "mlp" else "an nn.Linear"
            raise ValueError(
                f"{rule.kind} adapter rule with targets {rule.targets} matched no module (it needs {what} "
                f"in decoder layers {sorted(in_layers)} not claimed by an earlier rule); module names look like "
                f"{[n for n, _ in layers[0].named_modules() if n][:6]} under {prefix}.<i>"
            )
    return plan


def add_adapters(model: MultimodalLM, rules: list[AdapterRule | dict[str, Any]]) -> dict[str, str]:
    """Wrap the planned modules with their adapters in place. Returns module name -> adapter kind."""
    rules = [AdapterRule.from_dict(r) for r in rules]
    plan = plan_adapters(model, rules)
    for name, rule in plan.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.llm.get_submodule(parent_name)
        setattr(parent, attr, rule.build(getattr(parent, attr)))
    model.surgery.append({"op": "adapters", "configs": [r.to_dict() for r in rules]})
    return {name: rule.kind for name, rule in plan.items()}


def add_adapter_task(model: MultimodalLM, r: int) -> int:
    """Continual learning: every adapter whose kind has tasks (`AdapterKind.add_task`, e.g. MoRA) gets a
    new task of r ranks, the ones that train from now on. Returns the number of adapters grown."""
    grown = [(m, kind_of(m)) for _, m in adapter_modules(model) if kind_of(m).add_task is not None]
    if not grown:
        kinds = sorted(name for name, kind in adapter_kinds().items() if kind.add_task is not None)
        raise ValueError(f"the model has no adapter whose kind has tasks (kinds with tasks: {kinds}; add them with "
                         "add_adapters) to add a task to")
    for layer, kind in grown:
        kind.add_task(layer, r)
    model.surgery.append({"op": "add_adapter_task", "r": r})
    return len(grown)


def adapter_parameters(model: nn.Module, trainable_only: bool = False) -> Iterator[tuple[str, nn.Parameter]]:
    """Adapter tensors by full name: all of them, or only those their kind trains (MoRA: the newest task's)."""
    tensors = trainable_adapter_tensors if trainable_only else adapter_tensors
    for name, module in adapter_modules(model):
        for sub, p in tensors(module):
            yield f"{name}.{sub}", p


register_surgery("adapters", lambda model, configs: add_adapters(model, configs), adapter=True,
                 canonical=lambda args: {"configs": [_current_rule(c) for c in args["configs"]]})
register_surgery("add_adapter_task", lambda model, r: add_adapter_task(model, r), adapter=True)


# ---------------------------------------------------------------------------- adapters on their own
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
NOT_PEFT = ("NOT A PEFT ADAPTER: lightning-moe adapters (any kind, MoLE and MoRA included); peft cannot represent "
            "routed adapters. Load them with lightning_moe.models.load_adapters; plain LoRA exports to peft with "
            "python -m lightning_moe.export --format peft")


def save_adapters(model: MultimodalLM, directory: str | Path) -> Path:
    """Write only the adapters: their parameters (safetensors) and their surgery (JSON).

    The JSON also records the base model's own surgery (e.g. upcycling) that preceded the
    adapters, so `load_adapters` can refuse a base model of another shape.
    """
    log, ops = model.surgery, adapter_ops()
    first = next((i for i, e in enumerate(log) if e["op"] in ops), None)
    if first is None:
        raise ValueError("the model has no adapters to save (its surgery log has no adapter op)")
    if any(e["op"] not in ops for e in log[first:]):
        raise ValueError(f"surgery after the adapters ({[e['op'] for e in log[first:]]}) cannot be saved as adapters; "
                         "use save_pretrained")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # peft reads `peft_type` first and fails with a KeyError naming it: the value is the explanation it shows
    config = {"peft_type": NOT_PEFT, "base_surgery": log[:first], "adapter_surgery": log[first:]}
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tensors = {n: p.detach().contiguous().cpu() for n, p in adapter_parameters(model)}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME))
    return directory


def load_adapters(model: MultimodalLM, directory: str | Path) -> MultimodalLM:
    """Replay the saved adapter surgery on `model` (the same base the adapters were trained on)
    and load the adapter weights. In place; returns the model. (A peft LoRA directory loads through
    `lightning_moe.formats.load_adapters`, which reads either.)"""
    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: not an adapter directory (write one with save_adapters)")
    config = json.loads(config_file.read_text())
    missing = [k for k in ("base_surgery", "adapter_surgery") if k not in config]
    if missing:
        raise ValueError(f"{config_file} is not a project adapter config (no {missing}); a peft adapter directory "
                         "loads through lightning_moe.formats.load_adapters")
    if canonical_log(config["base_surgery"]) != canonical_log(model.surgery):
        raise ValueError(f"{config_file}: the adapters were trained on a base with surgery {config['base_surgery']}, "
                         f"this model has {model.surgery}")
    replay_surgery(model, config["adapter_surgery"])
    tensors = load_file(str(weights_file))
    expected = dict(adapter_parameters(model))
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match the adapter surgery: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in expected.items():
            if p.shape != tensors[name].shape:
                raise ValueError(f"{weights_file}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[name])
    return model


def merge_lora(model: MultimodalLM) -> int:
    """Fold every mergeable adapter (plain LoRA) into its base weight and unwrap it (export as a plain model).

    Kinds that are not mergeable (MoLE, MoRA) make it an error: their update depends on each token
    (a router's or the self-activation's choice), so no single weight equals them. Returns the number merged.
    """
    adapters = [(n, m, kind_of(m)) for n, m in adapter_modules(model)]
    unmergeable = [f"{n} ({type(m).__name__})" for n, m, kind in adapters if not kind.mergeable]
    if unmergeable:
        raise ValueError(
            "cannot merge routed adapters into the base weights: each token uses its own expert/ranks, so no single "
            f"weight equals them: {unmergeable[:4]}. Export them with save_adapters, or keep the adapted model"
        )
    for name, module, kind in adapters:
        module.merge(exact=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, getattr(module, kind.wrapped))
    # the weights now hold the update: the rebuilt model must not wrap them again
    ops = adapter_ops()
    model.surgery[:] = [e for e in model.surgery if e["op"] not in ops]
    return len(adapters)


# ---------------------------------------------------------------------------- records older code wrote
# Every adapter option of every kind, the keys of each rule when one record held all kinds' options: a logged
# rule with exactly these keys is such a record. Its kind read only its own fields, so the others are dropped.
_ALL_KINDS_RULE = frozenset({"kind", "targets", "layers", "r", "alpha", "dropout", "num_experts", "scale_by_prob",
                             "router_bias", "temperature", "top_k", "threshold"})


def _current_rule(record: dict[str, Any]) -> dict[str, Any]:
    """A logged rule as the current code logs it."""
    if set(record) == _ALL_KINDS_RULE:
        fields = {f.name for f in dataclasses.fields(adapter_kind(record["kind"]).config)}
        record = {k: v for k, v in record.items() if k in ("kind", "targets", "layers") or k in fields}
    return AdapterRule.from_dict(record).to_dict()


# the task of the MoRA kind, the only kind with tasks then, was its own op
register_old_op("mora_add_task", lambda args: {"op": "add_adapter_task", **args})
