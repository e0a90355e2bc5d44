"""Adapter kinds are plug-ins: a kind that exists nowhere in the package (IA3-style per-channel
scaling, Liu et al. 2022), defined and registered here, trains through the CLI with a config that
names it, and saves / reloads through `save_adapters` / `load_adapters` bit-identically; a kind with
continual tasks (`AdapterKind.add_task`) grows through `add_adapter_task` and replays from the log."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import lightning as L
import pytest
import torch
from torch import nn

from lightning_moe.cli import main
from lightning_moe.layers.adapters import AdapterKind, kind_of, register_adapter_kind
from lightning_moe.layers.adapters import registry as adapter_registry
from lightning_moe.models import (MultimodalLM, adapter_modules, add_adapter_task, add_adapters, build_multimodal,
                                  load_adapters, save_adapters, set_trainable)
from lightning_moe.models.checkpoint import adapter_ops
from tests.conftest import ROOT, TINY_LLM, tiny_encoders
from tests.test_cli import FAST


# ------------------------------------------------------------------ the new kind: all a contributor writes
@dataclass
class IA3Config:
    init: float = 1.0  # starting scale of every output channel (1 = the base unchanged)


class IA3Linear(nn.Module):
    """`base(x) * l`, a learned scale per output channel around a frozen `nn.Linear`."""

    def __init__(self, base: nn.Linear, init: float = 1.0) -> None:
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.ia3_l = nn.Parameter(torch.full((base.out_features,), init, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * self.ia3_l.to(x.dtype)


register_adapter_kind(AdapterKind(name="ia3", config=IA3Config, layer=IA3Linear, target="linear", wrapped="base_layer"))
# ------------------------------------------------------------------


class Snapshot(L.Callback):
    """The model's tensors when training starts (after the adapter surgery)."""

    state: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        Snapshot.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


IA3_CONFIG = """\
model:
  class_path: lightning_moe.methods.LoRATuning
  init_args:
    trainable: [adapters]
    train_vision_tower: false
    adapters:
      - kind: ia3
        targets: [k_proj, v_proj, down_proj]
        init: 1.0
"""


def test_a_kind_defined_outside_the_package_trains_saves_and_reloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "ia3.yaml"
    config.write_text(IA3_CONFIG)
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(config), *FAST,
                "--trainer.callbacks+=tests.models.test_adapter_plugin.Snapshot"])
    model = cli.model.model.eval()
    adapters = adapter_modules(model)
    assert len(adapters) == 3 * 2 and all(isinstance(m, IA3Linear) for _, m in adapters)  # 3 targets x 2 layers
    assert model.surgery[-1]["configs"] == [{"kind": "ia3", "targets": ["k_proj", "v_proj", "down_proj"],
                                             "layers": "all", "init": 1.0}]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.ia3_l" for n, _ in adapters}
    after = model.state_dict()
    changed = {k for k, v in Snapshot.state.items() if not torch.equal(v, after[k])}
    assert changed == trainable  # the scales trained, and nothing else moved

    # save the adapters alone, then load them onto the same base without them
    save_adapters(model, tmp_path / "adapters")
    base = copy.deepcopy(model)
    for name, module in adapter_modules(base):
        parent, _, attr = name.rpartition(".")
        setattr(base.get_submodule(parent), attr, getattr(module, kind_of(module).wrapped))
    base.surgery[:] = [e for e in base.surgery if e["op"] not in adapter_ops()]
    assert not adapter_modules(base)
    load_adapters(base, tmp_path / "adapters")
    ids = torch.randint(10, 50, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = base.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        untrained = copy.deepcopy(base)
        for _, m in adapter_modules(untrained):
            m.ia3_l.fill_(1.0)
        plain = untrained(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(got, expected)
    assert not torch.equal(plain, expected)  # the loaded scales are what makes them equal


# ------------------------------------------------------------------ a kind with tasks: a LoRA that grows per task
@dataclass
class GrowingLoRAConfig:
    r: int = 2  # the first task's rank


class GrowingLoRA(nn.Module):
    """`base(x) + sum_t B_t A_t x`, one low-rank update per task; only the newest trains."""

    def __init__(self, base: nn.Linear, r: int = 2) -> None:
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
        self.add_task(r)

    def add_task(self, r: int) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.lora_A.append(nn.Parameter(torch.randn(r, self.base_layer.in_features) * 0.1))
        self.lora_B.append(nn.Parameter(torch.randn(self.base_layer.out_features, r) * 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + sum(x @ a.T @ b.T for a, b in zip(self.lora_A, self.lora_B))


def _newest(layer: GrowingLoRA):
    t = len(layer.lora_A) - 1
    yield f"lora_A.{t}", layer.lora_A[t]
    yield f"lora_B.{t}", layer.lora_B[t]


@pytest.fixture
def growing_lora(monkeypatch):
    """The kind registered for this test only (the registry is restored after it)."""
    monkeypatch.setattr(adapter_registry, "_KINDS", dict(adapter_registry._KINDS))
    register_adapter_kind(AdapterKind(name="growing_lora", config=GrowingLoRAConfig, layer=GrowingLoRA,
                                      target="linear", wrapped="base_layer", trainable=_newest,
                                      add_task=GrowingLoRA.add_task))


def test_a_kind_with_tasks_grows_through_add_adapter_task_and_replays(tmp_path, tokenizer, growing_lora):
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders()).eval()
    add_adapters(model, [{"kind": "growing_lora", "targets": ["q_proj"], "r": 2}])
    assert add_adapter_task(model, 3) == 2  # one adapter per decoder layer grew
    layers = [m for _, m in adapter_modules(model)]
    assert all([a.shape[0] for a in m.lora_A] == [2, 3] for m in layers)
    assert model.surgery[-1] == {"op": "add_adapter_task", "r": 3}
    assert set_trainable(model, ["adapters"]) == {f"llm.model.layers.{i}.self_attn.q_proj.lora_{ab}.1"
                                                   for i in range(2) for ab in "AB"}
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.surgery == model.surgery
    ids = torch.randint(10, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids, torch.ones_like(ids)).logits, model(ids, torch.ones_like(ids)).logits)
