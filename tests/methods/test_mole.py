"""LoRATuning and MoLE: what trains, one-expert MoLE equals plain LoRA, routing reaches the base
class's losses and statistics, adapters written by a run load back through `adapters_path`."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.data import DomainMixtureDataModule
from lightning_moe.layers import LoRALinear, MoLEMLP
from lightning_moe.methods import AuxLossConfig, BackboneConfig, ExpertOptions, LoRAOptions, LoRATuning, MoLE
from lightning_moe.methods.base import causal_lm_loss
from lightning_moe.models import decoder_layers, save_adapters
from tests.conftest import ROOT, TINY_LLM, TOKENIZER, tiny_encoders

BACKBONE = BackboneConfig(llm_overrides=TINY_LLM, encoders=tiny_encoders(-1))


def make(cls, **kwargs):
    torch.manual_seed(0)  # same backbone weights for every method built here
    return cls(tokenizer=TOKENIZER, backbone=BACKBONE, **kwargs)


@pytest.fixture(scope="module")
def batch():
    data = DomainMixtureDataModule({d: {"train": f"{d}/train.jsonl"} for d in ("position_lr", "count")},
                                   root=str(ROOT / "data/shapes"), tokenizer=TOKENIZER, batch_size=6)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_lora_tuning_trains_exactly_the_lora_matrices():
    method = make(LoRATuning, lora=LoRAOptions(r=4, alpha=8))
    lora_params = {f"{name}.{ab}.weight" for name, m in method.model.named_modules() if isinstance(m, LoRALinear)
                   for ab in ("lora_A", "lora_B")}
    assert len(lora_params) == 2 * 7 * TINY_LLM["num_hidden_layers"]  # q k v o gate up down per layer
    assert method.trainable_names == lora_params
    optimizer = method.configure_optimizers()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(lora_params)


def test_mole_trains_exactly_attention_lora_experts_and_routers():
    method = make(MoLE, lora=LoRAOptions(r=4, alpha=8), experts=ExpertOptions(num_experts=3, layers=[1]))
    layers = decoder_layers(method.model.llm)
    assert isinstance(layers[1].mlp, MoLEMLP) and isinstance(layers[0].mlp.gate_proj, LoRALinear)  # layer 0: plain
    expected = set()
    for name, p in method.model.named_parameters():
        adapter = ".lora_A" in name or ".lora_B" in name or ".mlp.router." in name
        expected |= {name} if adapter else set()
    assert any(".mlp.router.proj.bias" in n for n in expected)
    assert method.trainable_names == expected
    assert [type(m) for m in method._routed] == [MoLEMLP]  # the base class collects MoLE's router


@pytest.mark.parametrize("scale_by_prob", [True, False])
def test_one_expert_mole_equals_plain_lora(batch, scale_by_prob):
    lora = make(LoRATuning, lora=LoRAOptions(r=4, alpha=8, dropout=0.0))
    mole = make(MoLE, lora=LoRAOptions(r=4, alpha=8, dropout=0.0),
                experts=ExpertOptions(num_experts=1, scale_by_prob=scale_by_prob))
    with torch.no_grad():
        for name, p in lora.model.named_parameters():  # B = 0 at init: make the adapters do something
            if ".lora_" in name:
                p.normal_(0, 0.1)
        mole_params = dict(mole.model.named_parameters())
        for name, p in lora.model.named_parameters():  # base weights are equal already (same seed)
            if ".mlp." in name and ".lora_" in name:  # ...mlp.gate_proj.lora_A.weight -> ...mlp.lora_A.gate[0]
                prefix, proj, ab, _ = name.rsplit(".", 3)
                mole_params[f"{prefix}.{ab}.{proj.removesuffix('_proj')}"][0].copy_(p)
            elif ".lora_" in name:
                mole_params[name].copy_(p)
            else:
                if ".mlp." in name and name.startswith("llm."):  # ...mlp.gate_proj.base_layer.weight -> ...mlp.mlp.gate_proj.weight
                    name = name.replace(".base_layer.", ".").replace(".mlp.", ".mlp.mlp.")
                assert torch.equal(mole_params[name], p)
    outs = []
    for method in (lora, mole):
        method.train()
        out = method.model(**method.model_inputs(batch), labels=batch["labels"])
        loss = causal_lm_loss(out.logits, out.labels)[0]
        loss.backward()
        outs.append((out.logits, loss))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])
    grads = {n: p.grad for n, p in mole.model.named_parameters() if p.requires_grad}
    for name, p in lora.model.named_parameters():
        if ".mlp.gate_proj.lora_B" in name:
            prefix = name.rsplit(".", 3)[0]
            torch.testing.assert_close(grads[f"{prefix}.lora_B.gate"][0], p.grad)
        elif ".self_attn." in name and p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad)


@pytest.mark.parametrize("form", ["mole", "switch"])
def test_mole_balance_loss_forms_and_coefficient(batch, form):
    aux = AuxLossConfig(form=form, coef=0.5, layers="concat" if form == "mole" else "sum")
    method = make(MoLE, lora=LoRAOptions(r=2), experts=ExpertOptions(num_experts=4), aux_loss=aux)
    step = method.compute_loss(batch)
    balanced = {"mole": 1 / 4, "switch": 1.0 * TINY_LLM["num_hidden_layers"]}[form]
    # a fresh router is near uniform: close to the balanced value, never below (Cauchy-Schwarz)
    assert balanced - 1e-4 <= step.logs["aux_loss"].item() < 2 * balanced
    torch.testing.assert_close(step.loss, step.logs["lm_loss"] + 0.5 * step.logs["aux_loss"])
    step.loss.backward()
    router = decoder_layers(method.model.llm)[0].mlp.router.proj.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_mole_defaults_follow_the_reference_except_scaling():
    method = make(MoLE)
    assert (method.aux.form, method.aux.layers, method.aux.coef) == ("mole", "concat", 0.01)
    mlp = decoder_layers(method.model.llm)[0].mlp
    assert (mlp.num_experts, mlp.r, mlp.alpha, mlp.scale_by_prob) == (3, 32, 64.0, True)
    assert mlp.router.proj.bias is not None


def test_adapters_path_loads_what_a_run_saved(tmp_path, batch):
    trained = make(MoLE, lora=LoRAOptions(r=2), experts=ExpertOptions(num_experts=2))
    with torch.no_grad():
        for name in trained.trainable_names:
            trained.model.get_parameter(name).normal_(0, 0.1)
    save_adapters(trained.model, tmp_path / "adapters")
    # a different rule set in the config is overridden by the saved adapter surgery
    loaded = make(LoRATuning, lora=LoRAOptions(r=8), adapters_path=str(tmp_path / "adapters"))
    trained.eval(), loaded.eval()
    inputs = trained.model_inputs(batch)
    torch.testing.assert_close(loaded.model(**inputs).logits, trained.model(**inputs).logits, rtol=0, atol=0)
    assert loaded.trainable_names == trained.trainable_names
