"""Adapter surgery: which module gets which adapter, the `adapters` freeze group, persistence
(with the model, and on their own), and merging LoRA for export. Oracle for LoRA: peft."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lightning_moe.layers import LoRALinear, MoLEMLP, MoRALinear
from lightning_moe.models import (
    AdapterRule,
    MultimodalLM,
    add_adapters,
    add_adapter_task,
    build_multimodal,
    decoder_layers,
    load_adapters,
    merge_lora,
    plan_adapters,
    save_adapters,
    set_trainable,
    upcycle,
    MoEConfig,
)
from tests.conftest import TINY_LLM, tiny_encoders

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny(tokenizer, llm: str = "tiny-llama") -> MultimodalLM:
    return build_multimodal(tokenizer, llm, TINY_LLM, tiny_encoders()).eval()


def inputs(tokenizer, batch: int = 2, length: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(10, len(tokenizer) - 5, (batch, length))
    return ids, torch.ones_like(ids)


@torch.no_grad()
def perturb_adapters(model: MultimodalLM) -> None:
    """LoRA B starts at zero (no visible update): give every adapter parameter random values."""
    for name in set_trainable(model, ["adapters"]):
        p = model.get_parameter(name)
        p.copy_(0.2 * torch.randn_like(p))


MIXED = [AdapterRule(kind="lora", targets=ATTN, r=4, alpha=8),
         AdapterRule(kind="mole", targets=["mlp"], r=2, alpha=4, num_experts=3)]


def test_first_matching_rule_wins_and_layers_are_respected(tokenizer):
    model = build_multimodal(tokenizer, "tiny-llama", {**TINY_LLM, "num_hidden_layers": 3}, tiny_encoders())
    rules = [AdapterRule(kind="mora", targets=["q_proj"], layers=[0], r=2),
             AdapterRule(kind="lora", targets=[r".*\.(q|v)_proj"], r=2),
             AdapterRule(kind="mole", targets=["mlp"], layers="1:", r=2, num_experts=2),
             AdapterRule(kind="lora", targets=["gate_proj"], r=2)]  # layer 0 only: 1 and 2 are MoLE's
    kinds = add_adapters(model, rules)
    assert kinds == {
        "model.layers.0.self_attn.q_proj": "mora", "model.layers.0.self_attn.v_proj": "lora",
        "model.layers.0.mlp.gate_proj": "lora",
        "model.layers.1.self_attn.q_proj": "lora", "model.layers.1.self_attn.v_proj": "lora", "model.layers.1.mlp": "mole",
        "model.layers.2.self_attn.q_proj": "lora", "model.layers.2.self_attn.v_proj": "lora", "model.layers.2.mlp": "mole",
    }
    layers = decoder_layers(model.llm)
    assert isinstance(layers[0].self_attn.q_proj, MoRALinear) and isinstance(layers[0].mlp.gate_proj, LoRALinear)
    assert isinstance(layers[2].mlp, MoLEMLP) and isinstance(layers[2].self_attn.k_proj, torch.nn.Linear)
    assert model.surgery[-1]["op"] == "adapters" and len(model.surgery[-1]["configs"]) == 4


def test_bad_rules_are_clear_errors(tokenizer):
    model = tiny(tokenizer)
    with pytest.raises(ValueError, match="matched no module"):
        plan_adapters(model, [AdapterRule(kind="lora", targets=["query"])])
    with pytest.raises(ValueError, match="matched no module.*MLP"):
        plan_adapters(model, [AdapterRule(kind="mole", targets=["q_proj"])])
    with pytest.raises(ValueError, match="kind 'prefix' unknown"):
        AdapterRule(kind="prefix")
    add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj"])])
    with pytest.raises(ValueError, match="already has an adapter"):
        add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj"])])
    with pytest.raises(ValueError, match=r"no adapter whose kind has tasks \(kinds with tasks: \['mora'\]; "):
        add_adapter_task(model, 2)


def test_adapters_group_is_exactly_the_adapter_parameters(tokenizer):
    model = tiny(tokenizer)
    add_adapters(model, MIXED)
    trainable = set_trainable(model, ["adapters"])
    expected = set()
    for i in range(TINY_LLM["num_hidden_layers"]):
        for proj in ATTN:
            expected |= {f"llm.model.layers.{i}.self_attn.{proj}.lora_{ab}.weight" for ab in "AB"}
        expected |= {f"llm.model.layers.{i}.mlp.lora_{ab}.{role}" for ab in "AB" for role in ("gate", "up", "down")}
        expected |= {f"llm.model.layers.{i}.mlp.router.proj.{w}" for w in ("weight", "bias")}
    assert trainable == expected


def test_mora_group_names_only_the_current_task_ranks(tokenizer):
    model = tiny(tokenizer)
    add_adapters(model, [AdapterRule(kind="mora", targets=["q_proj", "v_proj"], r=3, top_k=2)])
    add_adapter_task(model, 2)
    trainable = set_trainable(model, ["adapters"])
    assert trainable == {f"llm.model.layers.{i}.self_attn.{p}.lora_{ab}.1" for i in range(2)
                         for p in ("q_proj", "v_proj") for ab in "AB"}
    layer = decoder_layers(model.llm)[0].self_attn.q_proj
    assert layer.r == 5 and layer.top_k == 2
    assert model.surgery[-1] == {"op": "add_adapter_task", "r": 2}


def test_lora_surgery_matches_peft(tokenizer):
    """Our surgery + LoRALinear against peft's get_peft_model on the same LLM and LoRA weights."""
    model = tiny(tokenizer)
    reference = tiny(tokenizer)
    reference.load_state_dict(model.state_dict())
    add_adapters(model, [AdapterRule(kind="lora", targets=ATTN + ["down_proj"], r=4, alpha=8)])
    perturb_adapters(model)
    peft_llm = get_peft_model(reference.llm, LoraConfig(r=4, lora_alpha=8, target_modules=ATTN + ["down_proj"],
                                                        lora_dropout=0.0))
    ours = dict(model.llm.named_parameters())
    for name, p in peft_llm.named_parameters():
        if "lora_" in name:  # base_model.model.<name>.lora_A.default.weight -> <name>.lora_A.weight
            key = name.removeprefix("base_model.model.").replace(".default", "")
            p.data.copy_(ours[key])
    ids, mask = inputs(tokenizer)
    torch.testing.assert_close(model.llm(input_ids=ids, attention_mask=mask).logits,
                               peft_llm(input_ids=ids, attention_mask=mask).logits)


def test_save_pretrained_replays_adapter_surgery(tmp_path, tokenizer):
    model = tiny(tokenizer)
    add_adapters(model, [AdapterRule(kind="mora", targets=["o_proj"], r=2)] + MIXED)
    perturb_adapters(model)
    add_adapter_task(model, 3)  # a second MoRA task: its ranks must come back too
    perturb_adapters(model)
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.surgery == model.surgery
    assert [e["op"] for e in loaded.surgery] == ["adapters", "add_adapter_task"]
    ids, mask = inputs(tokenizer)
    torch.testing.assert_close(loaded(ids, mask).logits, model(ids, mask).logits, rtol=0, atol=0)


@pytest.mark.parametrize("upcycled", [False, True])
def test_adapters_alone_round_trip_onto_a_fresh_base(tmp_path, tokenizer, upcycled):
    base = tiny(tokenizer)
    if upcycled:  # adapters on a sparse base: the base's own surgery is checked, not saved
        upcycle(base, MoEConfig(num_experts=2, top_k=1, layers=[0]))
    base.save_pretrained(tmp_path / "base")
    rules = [AdapterRule(kind="lora", targets=ATTN[:3], r=4), AdapterRule(kind="mora", targets=["o_proj"], r=2)]
    if not upcycled:
        rules.append(AdapterRule(kind="mole", targets=["mlp"], layers=[1], r=2, num_experts=2))
    tuned = MultimodalLM.from_pretrained(tmp_path / "base").eval()
    add_adapters(tuned, rules)
    perturb_adapters(tuned)
    save_adapters(tuned, tmp_path / "adapters")

    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert [e["op"] for e in config["adapter_surgery"]] == ["adapters"]
    adapter_bytes = (tmp_path / "adapters" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (tmp_path / "base" / "model.safetensors").stat().st_size / 4  # only the adapters

    fresh = load_adapters(MultimodalLM.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapters")
    assert fresh.surgery == tuned.surgery
    ids, mask = inputs(tokenizer)
    torch.testing.assert_close(fresh(ids, mask).logits, tuned(ids, mask).logits, rtol=0, atol=0)

    if not upcycled:
        sparse = tiny(tokenizer)
        upcycle(sparse, MoEConfig(num_experts=2, top_k=1, layers=[0]))
        with pytest.raises(ValueError, match="trained on a base with surgery"):
            load_adapters(sparse, tmp_path / "adapters")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapters(tiny(tokenizer), tmp_path)
    with pytest.raises(ValueError, match="no adapters"):
        save_adapters(tiny(tokenizer), tmp_path / "none")


def test_merged_lora_equals_unmerged_and_exports_a_plain_model(tmp_path, tokenizer):
    model = tiny(tokenizer)
    add_adapters(model, [AdapterRule(kind="lora", targets=ATTN + ["gate_proj", "up_proj", "down_proj"], r=4)])
    perturb_adapters(model)
    ids, mask = inputs(tokenizer)
    # in float64 the merge's own rounding (W + BA folded once) is far below what a wrong merge would change
    model.double()
    unmerged = model(ids, mask).logits
    assert merge_lora(model) == 14
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.surgery == []
    torch.testing.assert_close(model(ids, mask).logits, unmerged, rtol=0, atol=1e-10)
    model.float()
    merged = model(ids, mask).logits
    model.save_pretrained(tmp_path / "merged")  # a plain dense model: loads without any adapter code path
    loaded = MultimodalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(loaded(ids, mask).logits, merged)


def test_mole_cannot_be_merged(tokenizer):
    model = tiny(tokenizer)
    add_adapters(model, MIXED)
    perturb_adapters(model)  # non-zero B: a merge would change the base weights
    # clones: state_dict() tensors are views of the live parameters, an in-place merge would change both
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot merge routed adapters.*MoLEMLP"):
        merge_lora(model)
    # nothing was merged half-way
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def test_rank_one_mole_runs_forward_and_backward(tokenizer):
    """Rank 1 gives (tokens, 1) activations whose 4-byte strides grouped_mm rejects: the loop must take over."""
    model = tiny(tokenizer).train()
    add_adapters(model, [AdapterRule(kind="mole", targets=["mlp"], r=1, alpha=2, num_experts=2)])
    perturb_adapters(model)
    ids, mask = inputs(tokenizer)
    model(ids, mask).logits.sum().backward()
    router = decoder_layers(model.llm)[0].mlp.router.proj.weight
    assert router.grad is not None and torch.isfinite(router.grad).all()
