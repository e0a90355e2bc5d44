"""peft both ways (formats/peft.py), with peft itself as the oracle: the project's LoRA exported as a peft
adapter gives the project's logits on the exported base under `PeftModel.from_pretrained`; a peft-saved LoRA
loaded by the project gives peft's logits; on a sparse LLM (a converted native MoE, an upcycled Llama) too,
the experts' own LoRA included."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

from lightning_moe.formats import (PeftFormatError, export_multimodal, export_peft, load_adapters, to_hf_causal_lm,
                                   without_adapters)
from lightning_moe.models import AdapterRule, MoEConfig, add_adapters, build_multimodal, save_adapters, upcycle
from lightning_moe.modalities import IMAGE_TOKEN
from tests.conftest import TINY_LLM, tiny_encoders
from tests.models.test_native_moe import text_batch

PATCHES = 16


def randomize_b(model) -> None:
    """LoRA B starts at zero (the update is 0): give it values so that a wrong key or scale shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def inputs(tokenizer, n_image_tokens: int):
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids = torch.tensor([[11, 12, *[image] * n_image_tokens, 13, 14, 15]])
    return ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32)


def test_project_lora_exports_as_a_peft_adapter_on_the_exported_base(tmp_path, tokenizer):
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders()).eval()
    add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj", "v_proj"], r=4, alpha=8),
                         AdapterRule(kind="lora", targets=["down_proj"], layers=[1], r=2, alpha=6)])
    randomize_b(model)
    export_multimodal(without_adapters(model), tmp_path / "base", tokenizer)
    assert [e["op"] for e in model.surgery] == ["adapters"]  # the model keeps its adapters
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["rank_pattern"] == {"model.language_model.layers.1.mlp.down_proj": 2}
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    ids, mask, pixels = inputs(tokenizer, 1)
    hf_ids, _, _ = inputs(tokenizer, PATCHES)
    with torch.no_grad():  # before peft wraps the base's layers in place
        plain_logits = base(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels).logits
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        ours_logits = model(ids, mask, pixel_values=pixels).logits
        peft_logits = theirs(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels).logits
    assert (ours_logits - peft_logits).abs().max() <= 1e-5
    assert (ours_logits - plain_logits).abs().max() > 1e-2  # the adapters matter: the check above is not vacuous


def test_peft_saved_lora_loads_into_the_project_with_peft_logits(tmp_path, tokenizer):
    from lightning_moe.methods import LoRATuning
    from lightning_moe.methods.base import BackboneConfig

    base_model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders()).eval()
    export_multimodal(base_model, tmp_path / "base", tokenizer)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    # rsLoRA and a per-module alpha: the scale must come through exactly
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|o_proj|up_proj)", use_rslora=True,
                        alpha_pattern={"o_proj": 3.0}, lora_dropout=0.0)
    theirs = get_peft_model(hf, config)
    randomize_b(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    theirs.eval()
    method = LoRATuning(backbone=BackboneConfig(pretrained=str(tmp_path / "base")),
                        adapters_path=str(tmp_path / "peft")).eval()
    ids, mask, pixels = inputs(tokenizer, 1)
    hf_ids, _, _ = inputs(tokenizer, PATCHES)
    with torch.no_grad():
        ours = method.model(ids, mask, pixel_values=pixels).logits
        want = theirs(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels).logits
    assert (ours - want).abs().max() <= 1e-5
    # only the adapters train, and they save/load in the project's own format afterwards
    assert method.trainable_names and all("lora_" in n for n in method.trainable_names)
    save_adapters(method.model, tmp_path / "again")
    reloaded = load_adapters(without_adapters(method.model), tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask, pixel_values=pixels).logits, ours)


def test_text_only_peft_lora_round_trip(tmp_path, tokenizer):
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, encoders={}).eval()
    add_adapters(model, [AdapterRule(kind="lora", targets=["k_proj", "gate_proj"], r=3, alpha=5)])
    randomize_b(model)
    without_adapters(model).llm.save_pretrained(tmp_path / "base")
    export_peft(model, tmp_path / "peft")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    ids = torch.tensor([[11, 12, 13, 14]])
    with torch.no_grad():
        want = theirs.eval()(input_ids=ids).logits
        assert (model(ids, torch.ones_like(ids)).logits - want).abs().max() <= 1e-5
        fresh = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, encoders={})
        fresh.llm.load_state_dict(without_adapters(model).llm.state_dict())
        assert (load_adapters(fresh, tmp_path / "peft")(ids, torch.ones_like(ids)).logits - want).abs().max() <= 1e-5


def test_routed_adapters_say_peft_cannot_hold_them(tmp_path, tokenizer):
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders())
    add_adapters(model, [AdapterRule(kind="mole", targets=["mlp"], r=2, alpha=4, num_experts=2),
                         AdapterRule(kind="lora", targets=["q_proj"], r=2, alpha=4)])
    with pytest.raises(PeftFormatError, match="peft cannot represent mole"):
        export_peft(model, tmp_path / "x")
    # and peft, asked to read the project's own directory, shows why in its error
    save_adapters(model, tmp_path / "project")
    base = LlavaForConditionalGeneration.from_pretrained(
        export_multimodal(without_adapters(model), tmp_path / "base", tokenizer))
    with pytest.raises(KeyError, match="peft cannot represent routed adapters"):
        PeftModel.from_pretrained(base, tmp_path / "project")


def test_peft_directories_the_project_cannot_compute_are_named(tmp_path, tokenizer):
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, encoders={})
    hf = model.llm
    for name, config in {
        "dora": LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
        "ia3": None,
    }.items():
        out = tmp_path / name
        if config is None:
            from peft import IA3Config

            get_peft_model(AutoModelForCausalLM.from_config(hf.config), IA3Config(
                target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])).save_pretrained(out)
            match = "adapter type 'IA3'"
        else:
            get_peft_model(AutoModelForCausalLM.from_config(hf.config), config).save_pretrained(out)
            match = "use_dora=True"
        fresh = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, encoders={})
        with pytest.raises(PeftFormatError, match=match):
            load_adapters(fresh, out)


def test_export_command_writes_llava_hf_and_peft_directories(tmp_path, tokenizer):
    """`python -m lightning_moe.export` on a saved model: --format hf gives a LlavaForConditionalGeneration with
    the base's logits; --format peft gives the adapter and, under base/, what it goes on, with the model's logits."""
    from lightning_moe.export import main as export_main

    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders()).eval()
    add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj", "v_proj"], r=4, alpha=8)])
    randomize_b(model)
    model.save_pretrained(tmp_path / "model")
    ids, mask, pixels = inputs(tokenizer, 1)
    hf_ids, _, _ = inputs(tokenizer, PATCHES)
    hf_inputs = dict(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels)
    export_main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "peft"), "--format", "peft"])
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "peft" / "base").eval()
    with torch.no_grad():
        base_logits = base(**hf_inputs).logits
        ours = model(ids, mask, pixel_values=pixels).logits
        ours_base = without_adapters(model)(ids, mask, pixel_values=pixels).logits
        theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(**hf_inputs).logits
    assert (ours - theirs).abs().max() <= 1e-5 and (ours_base - base_logits).abs().max() <= 1e-5
    assert (ours - ours_base).abs().max() > 1e-2  # the adapters matter
    merged = tmp_path / "merged"
    export_main(["--model", str(tmp_path / "model"), "--out", str(merged), "--format", "hf", "--merge-lora"])
    with torch.no_grad():
        exported = LlavaForConditionalGeneration.from_pretrained(merged).eval()(**hf_inputs).logits
    assert (ours - exported).abs().max() <= 1e-4  # merged in float32: one rounding of W + BA


def test_the_base_under_the_adapters_keeps_every_record_but_the_adapters(tokenizer):
    """`without_adapters` of an image + audio + video model: the same config (connector options, video pooling)
    with the adapter op gone from the log, and the same logits as before the adapters were added."""
    from tests.models.test_audio_video import build

    model = build(tokenizer, video_pooling="mean")
    ids = torch.tensor([[11, 12, 13]])
    before = model(ids, torch.ones_like(ids)).logits
    add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj"], r=2)])
    randomize_b(model)
    base = without_adapters(model)
    assert base.config_dict() == {**model.config_dict(), "surgery": []}
    torch.testing.assert_close(base(ids, torch.ones_like(ids)).logits, before, rtol=0, atol=0)


# ---------------------------------------------------------------------------- adapters on a sparse LLM
def _sparse_llm(source: str, tokenizer, tmp_path, encoders: dict | None = None):
    """A sparse LLM with its MoE layers: a tiny Hugging Face Mixtral / Qwen2-MoE (saved, loaded as backbone.llm:
    the `native_moe` conversion), or a tiny Llama upcycled here (exported as Mixtral)."""
    from tests.models.test_native_moe import SPARSE_LAYERS, decisive, save_hf_moe

    if source == "upcycled-llama":
        model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, encoders or {})
        upcycle(model, MoEConfig(num_experts=4, top_k=2, layers="all"))
        return decisive(model).eval(), list(range(TINY_LLM["num_hidden_layers"]))
    hf_dir = save_hf_moe(source, tmp_path / source, tokenizer)
    return build_multimodal(tokenizer, llm=hf_dir, encoders=encoders or {}).eval(), SPARSE_LAYERS[source]


@pytest.mark.parametrize("source", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "upcycled-llama"])
def test_lora_on_a_sparse_llm_exports_as_peft_with_the_models_logits(source, tmp_path, tokenizer):
    """Plain LoRA on the attention (and on Qwen2-MoE's shared expert) and each expert's own LoRA (`moe_lora`),
    saved and exported by `python -m lightning_moe.export --format peft`: `PeftModel.from_pretrained` on the
    base it writes (the native family, or Mixtral for the upcycled Llama) gives the project's logits."""
    from lightning_moe.export import main as export_main
    from tests.conftest import TOKENIZER

    model, sparse = _sparse_llm(source, tokenizer, tmp_path)
    lora = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["shared_expert.up_proj"] if source == "qwen2_moe" else [])
    add_adapters(model, [AdapterRule(kind="lora", targets=lora, r=4, alpha=8),
                         AdapterRule(kind="moe_lora", targets=["mlp"], layers=sparse, r=2, alpha=6)])
    randomize_b(model)
    model.save_pretrained(tmp_path / "model")
    export_main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "peft"), "--format", "peft",
                 "--tokenizer", TOKENIZER])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in sparse for p in ("gate_up_proj", "down_proj"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "peft" / "base").eval()
    b = text_batch(tokenizer)
    hf_inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    with torch.no_grad():
        plain = base(**hf_inputs).logits
        theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(**hf_inputs).logits
        ours = model(b["input_ids"], b["attention_mask"]).logits
        ours_attention_only = without_moe_lora(model)(b["input_ids"], b["attention_mask"]).logits
    real = b["attention_mask"].bool()
    assert (ours - theirs)[real].abs().max() <= 1e-4
    # both kinds matter: the check above is not vacuous for either
    assert (ours - plain)[real].abs().max() > 1e-2 and (ours - ours_attention_only)[real].abs().max() > 1e-2


def without_moe_lora(model):
    """A copy of `model` whose experts' LoRA is zero (its attention LoRA kept)."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if ".lora_B." in name and "mlp" in name and "shared_expert" not in name:
                p.zero_()
    return twin


def test_lora_on_a_native_moe_in_a_llava_base(tmp_path, tokenizer):
    """The same on llava-hf's LlavaForConditionalGeneration (the LLM under `model.language_model.`)."""
    model, sparse = _sparse_llm("mixtral", tokenizer, tmp_path, encoders=tiny_encoders())
    add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj", "o_proj"], r=4, alpha=8),
                         AdapterRule(kind="moe_lora", targets=["mlp"], r=2, alpha=6)])
    randomize_b(model)
    export_peft(model, tmp_path / "peft")
    base_model = without_adapters(model)
    export_multimodal(base_model, tmp_path / "base", tokenizer, language_model=to_hf_causal_lm(base_model))
    base = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    ids, mask, pixels = inputs(tokenizer, 1)
    hf_ids, _, _ = inputs(tokenizer, PATCHES)
    with torch.no_grad():
        ours = model(ids, mask, pixel_values=pixels).logits
        plain = base(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels).logits
        theirs = PeftModel.from_pretrained(base, tmp_path / "peft").eval()(
            input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=pixels).logits
    assert (ours - theirs).abs().max() <= 1e-4 and (ours - plain).abs().max() > 1e-2


def test_adapters_whose_base_or_place_has_no_transformers_form_are_refused(tmp_path, tokenizer):
    from transformers import Qwen3MoeConfig

    from tests.models.test_native_moe import SMALL

    attention = AdapterRule(kind="lora", targets=["q_proj"], r=2, alpha=4)
    # upcycling on top of a native Qwen3-MoE: its config places experts only on its own layers
    config = Qwen3MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=48, num_experts=4,
                            norm_topk_prob=True, decoder_sparse_step=2, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "q3")
    model = build_multimodal(tokenizer, llm=str(tmp_path / "q3"), encoders={})
    upcycle(model, MoEConfig(num_experts=4, top_k=2, layers=[0]))
    add_adapters(model, [attention])
    with pytest.raises(PeftFormatError, match=r"no transformers form.*sparse layers \[0, 1\] differ from the "
                                              r"qwen3_moe model's own \[1\]"):
        export_peft(model, tmp_path / "x")
    # an upcycled Phi: no transformers MoE family has its layout
    phi = build_multimodal(tokenizer, "tiny-phi", TINY_LLM, encoders={})
    upcycle(phi, MoEConfig(layers="all"))
    add_adapters(phi, [attention])
    with pytest.raises(PeftFormatError, match="no transformers form.*no Hugging Face MoE family has phi"):
        export_peft(phi, tmp_path / "x")
    # a rewrite transformers does not know
    dense = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, encoders={})
    add_adapters(dense, [attention])
    dense.surgery.insert(0, {"op": "prune_heads", "heads": [0]})
    with pytest.raises(PeftFormatError, match=r"surgery \['prune_heads'\] has no transformers counterpart"):
        export_peft(dense, tmp_path / "x")
    dense.surgery.pop(0)
    # an adapter folded into its base weight already: exporting it again would add it twice
    dense.llm.get_submodule("model.layers.1.self_attn.q_proj").merge()
    with pytest.raises(PeftFormatError, match=r"\['model\.layers\.1\.self_attn\.q_proj'\] are merged"):
        export_peft(dense, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written by a refusal
    # LoRA on a router is refused where adapters are planned: the router reads its weight, never the LoRA module
    model, _ = _sparse_llm("mixtral", tokenizer, tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.router\.proj is a MoE router's projection"):
        add_adapters(model, [AdapterRule(kind="lora", targets=["router.proj"], layers=[0], r=2, alpha=4)])


def test_peft_lora_on_parameters_is_refused_on_load_with_the_reason(tmp_path, tokenizer):
    model, _ = _sparse_llm("mixtral", tokenizer, tmp_path)
    add_adapters(model, [AdapterRule(kind="moe_lora", targets=["mlp"], r=2, alpha=4)])
    export_peft(model, tmp_path / "peft")
    with pytest.raises(PeftFormatError, match="target_parameters"):
        load_adapters(without_adapters(model), tmp_path / "peft")
