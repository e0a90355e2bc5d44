"""Configuration that would be silently ignored is an error: an override the config has no field of (LLM
presets and checkpoints, the encoder towers' presets) names the nearest field; an LLM checkpoint whose
weights lack some of the model's tensors names the directory, its files and the missing tensors; an impossible
`MoEConfig` value names its field (through the CLI: tests/test_one_line_errors.py), and layers that select none of
the model's are an error when it is upcycled."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_moe.cli import main
from lightning_moe.models import build_llm, build_multimodal
from tests.conftest import ROOT, TINY_LLM, TINY_VISION, TINY_WHISPER


def test_a_misspelt_llm_override_of_a_preset_names_the_field(tokenizer):
    with pytest.raises(ValueError, match=r"llm_overrides of preset 'tiny-llama': LlamaConfig has no field "
                                         r"'hiden_size' \(did you mean 'hidden_size'"):
        build_multimodal(tokenizer, "tiny-llama", {**TINY_LLM, "hiden_size": 32}, {})
    with pytest.raises(ValueError, match=r"no field 'use_sliding_window'"):  # a Mistral field, not a Llama one
        build_llm("tiny-llama", tokenizer, {"use_sliding_window": True})


def test_fields_a_config_reads_under_another_name_stay_valid(tokenizer):
    # transformers reads rope_theta into rope_parameters, and Mixtral's num_experts is an alias
    assert build_llm("tiny-llama", tokenizer, {**TINY_LLM, "rope_theta": 500.0}).config.rope_parameters["rope_theta"] == 500.0
    assert build_llm("tiny-mixtral", tokenizer, {**TINY_LLM, "num_experts": 2}).config.num_local_experts == 2


@pytest.mark.parametrize("modality, tower, overrides, nearest", [
    ("image", "tiny-clip", {**TINY_VISION, "num_hiden_layers": 1}, "num_hidden_layers"),
    ("audio", "tiny-whisper", {**TINY_WHISPER, "encoder_layer": 1}, "encoder_layers"),
])
def test_a_misspelt_tower_override_of_a_preset_names_the_field(tokenizer, modality, tower, overrides, nearest):
    key = next(k for k in overrides if k not in {**TINY_VISION, **TINY_WHISPER})
    encoders = {modality: {"tower": tower, "overrides": overrides}}
    if modality == "audio":
        encoders["audio"]["connector_options"] = {"num_queries": 2, "num_layers": 1, "num_heads": 2}
    with pytest.raises(ValueError, match=rf"tower overrides of preset '{tower}': \w+ has no field '{key}' "
                                         rf"\(did you mean '{nearest}'"):
        build_multimodal(tokenizer, "tiny-llama", TINY_LLM, encoders)


@pytest.fixture
def llama_dir(tmp_path, tokenizer):
    llm = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2))
    llm.save_pretrained(tmp_path / "llm")
    return tmp_path / "llm", llm


def test_a_misspelt_llm_override_of_a_checkpoint_names_the_field(llama_dir, tokenizer):
    directory, _ = llama_dir
    with pytest.raises(ValueError, match=rf"llm_overrides of {directory}: LlamaConfig has no field 'hiden_size' "
                                         r"\(did you mean 'hidden_size'"):
        build_llm(str(directory), tokenizer, {"hiden_size": 64})
    # a real field still overrides the checkpoint's config
    assert build_llm(str(directory), tokenizer, {"rms_norm_eps": 1e-3}).config.rms_norm_eps == 1e-3


@pytest.mark.parametrize("weights", ["empty", "unrelated", "partial"])
def test_an_llm_checkpoint_without_the_models_weights_is_an_error(llama_dir, tokenizer, weights):
    directory, llm = llama_dir
    state = {k: v.clone() for k, v in llm.state_dict().items()}
    kept = {"empty": {}, "unrelated": {"something.else": torch.zeros(3)},
            "partial": {k: v for k, v in state.items() if "layers.0.mlp" not in k}}[weights]
    save_file(kept, str(directory / "model.safetensors"), metadata={"format": "pt"})
    missing = sorted(k for k in state if k not in kept)
    assert missing  # what transformers would initialise randomly
    with pytest.raises(ValueError) as err:
        build_llm(str(directory), tokenizer)
    message = str(err.value)
    assert (f"LLM {directory} (model.safetensors): its weights lack {len(missing)} of the model's {len(state)} "
            f"tensors (e.g. {', '.join(missing[:5])})") in message, message
    assert "backbone.allow_missing_weights: true" in message
    built = build_llm(str(directory), tokenizer, allow_missing_weights=True)  # random init, asked for
    assert built.config.hidden_size == 32


def test_the_cli_reports_a_misspelt_override_in_one_message(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"),
              "--model.init_args.backbone.llm_overrides={hiden_size: 64}", "--trainer.max_steps=0"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Namespace(" not in err
    assert "has no field 'hiden_size' (did you mean 'hidden_size'" in err, err


@pytest.mark.parametrize("fields, words", [
    ({"num_experts": True}, "moe.num_experts must be an integer >= 1, got True"),
    ({"eval_capacity_factor": float("inf")}, "moe.eval_capacity_factor must be a finite number > 0"),
    ({"router_jitter": -0.1}, r"moe.router_jitter must be a number in \[0, 1\)"),
    ({"layers": "1:2:3:4"}, "moe.layers: layer spec '1:2:3:4' is neither"),
    ({"layers": [1, 1]}, r"moe.layers lists a layer more than once: \[1, 1\]"),
    ({"layers": ["a"]}, "moe.layers must be 'all', a slice like '::2' or a non-empty list"),
])
def test_an_impossible_moe_config_names_its_field(fields, words):
    from lightning_moe.models import MoEConfig

    with pytest.raises(ValueError, match=words):
        MoEConfig(**fields)


def test_layers_that_select_none_of_the_models_layers_are_an_error(tokenizer):
    from lightning_moe.models import MoEConfig, upcycle

    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, {})  # 2 decoder layers: "4:" is valid, selects none
    with pytest.raises(ValueError, match=r"moe.layers '4:' selects none of the model's 2 decoder layers"):
        upcycle(model, MoEConfig(layers="4:"))
