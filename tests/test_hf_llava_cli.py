"""A real-LLaVA start through the CLI (docs/hf_interop.md): MoE-tuning stage 3 (`stage: moe`) from a tiny
llava-hf directory saved locally. Entering the stage upcycles the llava-hf language model with experts that
copy its MLPs, so before any step the model computes what transformers' LlavaForConditionalGeneration does;
the run then trains the MoE layers with the routing loss logged."""

from __future__ import annotations

import torch

from lightning_moe.cli import main
from lightning_moe.methods import BackboneConfig, MoETuning
from lightning_moe.models import expert_layers
from tests.conftest import ROOT
from tests.models.test_hf_llava import PATCHES, hf_oracle, prompt, tiny_llava_hf
from tests.test_cli import FAST

STAGE3 = str(ROOT / "configs/moe_llava/stage3_moe.yaml")


def test_moe_tuning_stage3_starts_from_a_llava_hf_directory(tmp_path, tokenizer, monkeypatch):
    llava = tmp_path / "llava-hf"
    hf = tiny_llava_hf(llava, tokenizer)
    # the stage's surgery on the imported model: experts copy the dense MLPs, so the logits are still HF's
    method = MoETuning(stage="moe", tokenizer=str(llava), backbone=BackboneConfig(pretrained=str(llava))).eval()
    assert len(expert_layers(method.model)) == 1  # "::2" of 2 decoder layers
    pixels = torch.randn(1, 3, 32, 32)
    ids = prompt(tokenizer, 1)
    with torch.no_grad():
        ours = method.model(ids, torch.ones_like(ids), pixel_values=pixels).logits
    want = hf_oracle(hf)[0](prompt(tokenizer, PATCHES), pixels)
    assert (ours[..., :want.shape[-1]] - want).abs().max() <= 1e-5

    monkeypatch.chdir(tmp_path)  # runs/ lands here
    cli = main(["fit", "--config", STAGE3, *FAST, f"--model.init_args.backbone.pretrained={llava}",
                f"--data.init_args.tokenizer={llava}"])
    assert [e["op"] for e in cli.model.model.surgery] == ["upcycle"]
    assert "train/aux_loss" in cli.trainer.callback_metrics
    assert cli.model.trainable_names and all(n.startswith(("connectors.", "llm.model.layers.0.mlp."))
                                             for n in cli.model.trainable_names)
    assert (tmp_path / "runs/moe_llava/stage3/model/multimodal_config.json").is_file()  # the next stage's input
