"""Native Hugging Face MoE LLMs (Mixtral, Qwen2-MoE with its gated shared expert, OLMoE, Qwen3-MoE) as
project `SparseMoE` models, and every LLM back to plain transformers.

Oracles: the Hugging Face model itself, built from a tiny config and saved locally (no hub): its
logits, and its own router aux loss (`output_router_logits=True`, `load_balancing_loss_func`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig)

from lightning_moe.layers import SparseMoE
from lightning_moe.methods import MoETuning
from lightning_moe.methods.base import AuxLossConfig, BackboneConfig
from lightning_moe.formats import to_hf_causal_lm
from lightning_moe.models import (AdapterRule, MoEConfig, MultimodalLM, add_adapters, build_multimodal,
                                  expert_layers, parameter_counts, upcycle)
from lightning_moe.models.multimodal import build_llm
from tests.conftest import TOKENIZER

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
# family -> (config class, fields): a dense layer between sparse ones where the family allows it, both
# norm_topk_prob settings, Qwen2-MoE's shared expert of another width than the routed ones
FAMILIES = {
    "mixtral": (MixtralConfig, dict(intermediate_size=96, num_local_experts=4)),
    "qwen2_moe": (Qwen2MoeConfig, dict(intermediate_size=128, moe_intermediate_size=48, num_experts=4,
                                       shared_expert_intermediate_size=80, mlp_only_layers=[1])),
    "olmoe": (OlmoeConfig, dict(intermediate_size=48, num_experts=4)),
    "qwen3_moe": (Qwen3MoeConfig, dict(intermediate_size=128, moe_intermediate_size=48, num_experts=4,
                                       norm_topk_prob=True, decoder_sparse_step=2)),
}
SPARSE_LAYERS = {"mixtral": [0, 1, 2], "qwen2_moe": [0, 2], "olmoe": [0, 1, 2], "qwen3_moe": [1]}


def save_hf_moe(family: str, directory, tokenizer) -> str:
    """A tiny Hugging Face MoE LLM saved with its own save_pretrained; weights perturbed so that routing
    is decisive (Qwen2-MoE's router starts at zero: every expert tied)."""
    config_cls, fields = FAMILIES[family]
    config = config_cls(**SMALL, **fields, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    hf = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(directory)
    return str(directory)


def text_batch(tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tokenizer), (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding on one sample: losses must skip it
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a "prompt" that is not trained on
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def real(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[mask.bool()]


@pytest.fixture
def hf_dir(request, tmp_path, tokenizer):
    return save_hf_moe(request.param, tmp_path / request.param, tokenizer)


@pytest.mark.parametrize("hf_dir", list(FAMILIES), indirect=True)
def test_native_moe_blocks_become_sparse_moe_with_hf_logits(hf_dir, tokenizer, tmp_path):
    family = hf_dir.rsplit("/", 1)[-1]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model = build_multimodal(tokenizer, llm=hf_dir, encoders={}).eval()
    assert model.surgery == [{"op": "native_moe", "family": family, "layers": SPARSE_LAYERS[family]}]
    moes = expert_layers(model)
    assert len(moes) == len(SPARSE_LAYERS[family])
    assert all((m.shared_expert is not None) == (family == "qwen2_moe") for _, m in moes)
    b = text_batch(tokenizer)
    with torch.no_grad():
        ours = model(b["input_ids"], b["attention_mask"]).logits
        theirs = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert (real(ours, b["attention_mask"]) - real(theirs, b["attention_mask"])).abs().max() <= 1e-5
    # the log replays: save_pretrained -> from_pretrained rebuilds the HF model and converts it again
    model.save_pretrained(tmp_path / "project")
    again = MultimodalLM.from_pretrained(tmp_path / "project").eval()
    assert again.surgery == model.surgery
    with torch.no_grad():
        assert torch.equal(again(b["input_ids"], b["attention_mask"]).logits, ours)


@pytest.mark.parametrize("hf_dir", list(FAMILIES), indirect=True)
def test_aux_loss_equals_hf_router_aux_loss(hf_dir, tokenizer):
    """`train/aux_loss` (form switch, pooled over layers) is HF's `load_balancing_loss_func` on the same batch,
    and LM loss + router_aux_loss_coef x aux is HF's own training loss."""
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    coef = hf.config.router_aux_loss_coef
    method = MoETuning(stage="moe", tokenizer=TOKENIZER, backbone=BackboneConfig(llm=hf_dir, encoders={}),
                       aux_loss=AuxLossConfig(form="switch", layers="concat", coef=coef)).eval()
    assert not any(e["op"] == "upcycle" for e in method.model.surgery)  # stage moe keeps the native experts
    b = text_batch(tokenizer, seed=1)
    with torch.no_grad():
        step = method.compute_loss(b)
        out = hf(**b, output_router_logits=True)
    assert torch.is_tensor(out.aux_loss)
    torch.testing.assert_close(step.logs["aux_loss"], out.aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(step.logs["loss"], out.loss, rtol=1e-5, atol=1e-6)
    # the padded tokens matter: HF's value without the mask differs, ours followed the mask
    unmasked = hf(input_ids=b["input_ids"], output_router_logits=True).aux_loss
    assert not torch.allclose(unmasked, out.aux_loss)


@pytest.mark.parametrize("hf_dir", list(FAMILIES), indirect=True)
def test_round_trip_project_hf_project_is_bit_identical(hf_dir, tokenizer, tmp_path):
    model = build_multimodal(tokenizer, llm=hf_dir, encoders={}).eval()
    hf = to_hf_causal_lm(model)
    assert type(hf).__name__ == type(AutoModelForCausalLM.from_pretrained(hf_dir)).__name__
    hf.save_pretrained(tmp_path / "exported")
    back = build_multimodal(tokenizer, llm=str(tmp_path / "exported"), encoders={}).eval()
    assert back.surgery == model.surgery
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    b = text_batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(back(b["input_ids"], b["attention_mask"]).logits,
                           model(b["input_ids"], b["attention_mask"]).logits)


def tiny_llama(tokenizer, **overrides) -> MultimodalLM:
    return build_multimodal(tokenizer, "tiny-llama", {"hidden_size": 64, "intermediate_size": 128,
                                                      "num_hidden_layers": 3, **overrides}, encoders={}).eval()


def decisive(model: MultimodalLM) -> MultimodalLM:
    """Upcycled experts start identical and routers near zero: make them differ, so a wrong key map shows."""
    with torch.no_grad():
        for _, moe in expert_layers(model):
            moe.router.proj.weight.normal_(std=0.5)
            moe.gate_up_proj.add_(torch.randn_like(moe.gate_up_proj) * 0.05)
            moe.down_proj.add_(torch.randn_like(moe.down_proj) * 0.05)
    return model


@pytest.mark.parametrize("layers,normalize,family", [
    ("all", True, "MixtralForCausalLM"),
    ("::2", True, "Qwen2MoeForCausalLM"),  # MoE-LLaVA's every other layer: Qwen2-MoE's mlp_only_layers
    ("all", False, "Qwen2MoeForCausalLM"),  # Mixtral always renormalises; Qwen2-MoE's norm_topk_prob=False
])
def test_upcycled_llama_exports_to_the_exact_hf_family(tokenizer, tmp_path, layers, normalize, family):
    model = decisive(tiny_llama(tokenizer))
    upcycle(model, MoEConfig(num_experts=4, top_k=2, layers=layers, normalize_weights=normalize))
    hf = to_hf_causal_lm(model)
    assert type(hf).__name__ == family
    hf.save_pretrained(tmp_path / "exported")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    b = text_batch(tokenizer)
    with torch.no_grad():
        ours = model(b["input_ids"], b["attention_mask"]).logits
        theirs = loaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert (real(ours, b["attention_mask"]) - real(theirs, b["attention_mask"])).abs().max() <= 1e-5
        back = build_multimodal(tokenizer, llm=str(tmp_path / "exported"), encoders={}).eval()
        assert torch.equal(back(b["input_ids"], b["attention_mask"]).logits, ours)


def test_dense_llm_exports_as_itself(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    hf = to_hf_causal_lm(model)
    assert hf is model.llm and type(hf).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("case,message", [
    ("phi", "no Hugging Face MoE family has phi"),
    ("capacity", "capacity_factor drops tokens"),
    ("attention_bias", "exportable with attention_bias=False"),
    ("per_layer_experts", "a Hugging Face MoE config holds one setting for all layers"),
    ("lora", "--merge-lora"),
])
def test_models_no_hf_family_represents_are_refused_with_the_reason(tokenizer, case, message):
    if case == "phi":
        model = build_multimodal(tokenizer, "tiny-phi", {"hidden_size": 64, "intermediate_size": 128},
                                 encoders={})
        upcycle(model, MoEConfig(layers="all"))
    elif case == "attention_bias":
        model = tiny_llama(tokenizer, attention_bias=True)
        upcycle(model, MoEConfig(layers="all"))
    else:
        model = tiny_llama(tokenizer)
        if case == "per_layer_experts":
            upcycle(model, MoEConfig(layers=[0], num_experts=4))
            upcycle(model, MoEConfig(layers=[2], num_experts=2, top_k=1))
        else:
            upcycle(model, MoEConfig(layers="all", capacity_factor=1.5 if case == "capacity" else None))
        if case == "lora":
            add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj"], layers="all", r=2)])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        to_hf_causal_lm(model)


def test_project_directory_is_never_taken_for_a_transformers_one(tokenizer, tmp_path):
    tiny_llama(tokenizer).save_pretrained(tmp_path / "project")
    with pytest.raises(ValueError, match="lightning-moe save_pretrained directory.*backbone.pretrained"):
        build_llm(str(tmp_path / "project"), tokenizer)


def test_sparse_moe_keeps_the_family_settings(tokenizer, tmp_path):
    """top_k and norm_topk_prob come from the config: a wrong one would still run, with other logits."""
    d = save_hf_moe("qwen3_moe", tmp_path / "q3", tokenizer)
    model = build_multimodal(tokenizer, llm=d, encoders={})
    (_, moe), = expert_layers(model)
    assert isinstance(moe, SparseMoE) and moe.top_k == 2 and moe.router.normalize is True
    d = save_hf_moe("olmoe", tmp_path / "olmoe", tokenizer)
    assert all(m.router.normalize is False for _, m in expert_layers(build_multimodal(tokenizer, llm=d,
                                                                                      encoders={})))


def test_activated_parameters_count_the_shared_expert_fully(tokenizer, tmp_path):
    model = build_multimodal(tokenizer, llm=save_hf_moe("qwen2_moe", tmp_path / "q2", tokenizer), encoders={})
    counts = parameter_counts(model)
    routed = sum(m.gate_up_proj.numel() + m.down_proj.numel() for _, m in expert_layers(model))
    assert counts.total - counts.activated == routed * (4 - 2) // 4  # top-2 of 4 routed experts; shared always on


def test_upcycling_on_top_of_a_native_moe_is_refused_at_export(tokenizer, tmp_path):
    """Qwen3-MoE with experts on layer 1 only; upcycling layer 0 with the same settings gives a model its
    config cannot describe (it places experts by decoder_sparse_step / mlp_only_layers)."""
    config = Qwen3MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=48, num_experts=4,
                            norm_topk_prob=True, decoder_sparse_step=2, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "q3")
    model = build_multimodal(tokenizer, llm=str(tmp_path / "q3"), encoders={})
    upcycle(model, MoEConfig(num_experts=4, top_k=2, layers=[0]))
    with pytest.raises(ValueError, match=r"sparse layers \[0, 1\] differ from the qwen3_moe model's own \[1\]"):
        to_hf_causal_lm(model)
