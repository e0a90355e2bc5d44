"""Adapter kinds are plug-ins: a kind that exists nowhere in the package (IA3-style per-channel
scaling, Liu et al. 2022), defined and registered here, trains through the CLI with a config that
names it, and saves / reloads through `save_adapters` / `load_adapters` bit-identically."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from lightning_moe.cli import main
from lightning_moe.layers.adapters import AdapterKind, kind_of, register_adapter_kind
from lightning_moe.models import adapter_modules, load_adapters, save_adapters
from lightning_moe.models.checkpoint import adapter_ops
from tests.conftest import ROOT
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
