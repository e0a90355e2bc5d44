"""`python -m lightning_moe.export` end to end: fine-tune a tiny saved Mixtral-based multimodal model with
`stage: moe` through the CLI (routing losses and heat maps in TensorBoard), export it, load it with plain
transformers (same logits), and put it in an EdgeMoE store; `merge_lora` as a command; refusals that say why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_moe import edge
from lightning_moe.cli import main as cli_main
from lightning_moe.export import main as export_main
from lightning_moe.formats import NotExportable
from lightning_moe.inference import ExpertStore, load_resident_model
from lightning_moe.models import (AdapterRule, MoEConfig, MultimodalLM, add_adapters, build_multimodal,
                                  expert_layers, upcycle)
from tests.conftest import ROOT, TINY_LLM, tiny_encoders
from tests.test_cli import FAST


# a fresh interpreter runs this tree's package (the shared venv's editable install may point elsewhere)
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def export_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_moe.export", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV)


def text_inputs(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(["How many shapes are there? two", "Is there a red circle?"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a[mask.bool()] - b[mask.bool()]).abs().max().item()


def test_fine_tune_a_saved_mixtral_multimodal_model_export_and_load_with_transformers(workdir, tokenizer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # a tiny Mixtral-based multimodal model, saved: its MoE blocks are SparseMoE already (native_moe)
    start = build_multimodal(tokenizer, "tiny-mixtral", TINY_LLM, tiny_encoders())
    assert start.surgery == [{"op": "native_moe", "family": "mixtral", "layers": [0, 1]}]
    start.save_pretrained(workdir / "mixtral_mm")

    cli = cli_main(["fit", "--config", str(ROOT / "configs/moe_llava/stage3_moe.yaml"), *FAST,
                    "--model.init_args.backbone.pretrained=mixtral_mm", "--model.init_args.aux_loss.form=switch",
                    "--trainer.log_every_n_steps=1"])
    assert cli.trainer.global_step == 2
    assert cli.model.model.surgery == start.surgery  # stage moe fine-tunes the native experts, no upcycling
    trained = cli.model.model.eval()
    moved = [n for n, p in trained.state_dict().items() if ".mlp." in n and not torch.equal(p, start.state_dict()[n])]
    assert moved, "the experts did not train"
    events = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/aux_loss", "train/lm_loss"} <= set(tags["scalars"])
    assert {"routing/layer0/expert_load", "routing/layer1/expert_load"} <= set(tags["histograms"])
    assert "routing/layer1/val_domain_expert_heatmap" in tags["images"]

    ckpt = next(Path(cli.trainer.logger.log_dir).rglob("*.ckpt"))
    export_main(["--model", str(ckpt), "--out", "exported", "--text-only"])
    hf = AutoModelForCausalLM.from_pretrained("exported").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    hf_tokenizer = AutoTokenizer.from_pretrained("exported")
    assert len(hf_tokenizer) == len(tokenizer)
    ids, mask = text_inputs(hf_tokenizer)
    with torch.no_grad():
        ours = trained(ids, mask).logits
        assert max_diff(hf(input_ids=ids, attention_mask=mask).logits, ours, mask) <= 1e-5

    # the SavePretrained directory exports too, from a fresh process, as the docs' command runs it
    run = export_command("--model", "runs/moe_llava/stage3/model", "--out", "exported_dir", "--text-only", cwd=workdir)
    assert run.returncode == 0, run.stderr
    again = AutoModelForCausalLM.from_pretrained("exported_dir").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits,
                           hf(input_ids=ids, attention_mask=mask).logits)

    # EdgeMoE: the converted model goes into an expert store, and comes back with the same logits
    edge.main(["export", "--model", str(ckpt), "--out", "store"])
    store = ExpertStore(Path("store"))
    assert len(store.entries) == 2 * 4  # 2 MoE layers x 4 experts
    with torch.no_grad():
        assert torch.equal(load_resident_model(store).eval()(ids, mask).logits, ours)


def lora_model(tokenizer) -> MultimodalLM:
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, encoders={})
    upcycle(model, MoEConfig(layers="all"))
    add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj", "v_proj"], layers="all", r=4)])
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): make it change the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.eval()


def test_merge_lora_command_then_hf_export(workdir, tokenizer):
    model = lora_model(tokenizer)
    model.save_pretrained("with_lora")
    tokenizer.save_pretrained("with_lora")
    with pytest.raises(ValueError, match="--merge-lora"):
        export_main(["--model", "with_lora", "--out", "refused"])
    assert not Path("refused").exists()

    export_main(["--model", "with_lora", "--out", "merged", "--format", "project", "--merge-lora"])
    merged = MultimodalLM.from_pretrained("merged").eval()
    assert [e["op"] for e in merged.surgery] == ["upcycle"]  # the adapters are folded in, gone from the log
    assert not any("lora" in n for n in merged.state_dict())
    ids, mask = text_inputs(tokenizer)
    with torch.no_grad():
        ours = model(ids, mask).logits
        assert max_diff(merged(ids, mask).logits, ours, mask) <= 1e-5
        export_main(["--model", "merged", "--out", "hf"])
        hf = AutoModelForCausalLM.from_pretrained("hf").eval()
        assert type(hf).__name__ == "MixtralForCausalLM"
        assert max_diff(hf(input_ids=ids, attention_mask=mask).logits, ours, mask) <= 1e-5


def test_export_refuses_what_it_cannot_write_and_says_why(workdir, tokenizer):
    phi = build_multimodal(tokenizer, "tiny-phi", TINY_LLM, encoders={})
    upcycle(phi, MoEConfig(layers="all"))
    phi.save_pretrained("phi_moe")
    run = export_command("--model", "phi_moe", "--out", "out", cwd=workdir)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "no Hugging Face MoE family has phi" in run.stderr and "Llama-family" in run.stderr
    # a transformers directory is not a model to export (and the project's is not a transformers one)
    phi.llm.save_pretrained("plain_hf")
    with pytest.raises(NotExportable, match="a transformers directory"):
        export_main(["--model", "plain_hf", "--out", "x"])


def test_offloaded_qwen2_moe_keeps_its_shared_expert_resident(tmp_path, tokenizer):
    from lightning_moe.inference import export_store, load_offloaded
    from tests.models.test_native_moe import save_hf_moe, text_batch

    model = build_multimodal(tokenizer, llm=save_hf_moe("qwen2_moe", tmp_path / "q2", tokenizer),
                             encoders={}).eval()
    store = export_store(model, tmp_path / "store")
    offloaded, _ = load_offloaded(store)
    assert all(m.shared_expert is not None for _, m in expert_layers(offloaded))
    b = text_batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(offloaded.eval()(b["input_ids"], b["attention_mask"]).logits,
                                   model(b["input_ids"], b["attention_mask"]).logits, rtol=0, atol=1e-6)
