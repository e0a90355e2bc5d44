"""Uni-MoE through the CLI on the shipped data/media: the shipped configs chain (align, one experts run per
modality, moe), and right after stage 3's surgery, with the router forced to a modality's expert, the model
computes what that modality's stage-2 run computed; every output of the chain loads on the safe path;
TensorBoard gets the modality x expert heat map; an experts run refuses data of other modalities."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lightning_moe.cli import main
from lightning_moe.methods import BackboneConfig, UniMoE
from lightning_moe.models import MultimodalLM, expert_layers
from tests.conftest import ROOT, built_once
from tests.methods.test_unimoe import forced
from tests.test_cli import FAST, UNIMOE, assert_outputs_load_safely, workdir  # noqa: F401  (fixture)


def fit(config: str, *extra: str):
    # train files are only checked at set-up, decoded when drawn: the runs draw a few batches of 12000 records
    return main(["fit", "--config", str(ROOT / config), *FAST, "--data.init_args.defer_train_decoding=true", *extra])


# both tests start from one stage-1 run, built once per session even when xdist hands them to two workers
@pytest.fixture(scope="session")
def align_output(tmp_path_factory) -> Path:
    """Stage 1 (align) run once for this module's tests; its runs/ folder, to copy into a test's workdir."""
    def align(directory: Path) -> None:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(directory)
            assert fit(UNIMOE[0]).trainer.global_step == 2

    return built_once(tmp_path_factory, "unimoe_align", align) / "runs"


def eval_batch(cli) -> dict:
    """A validation batch of the run's data module (every modality the mixture has)."""
    cli.datamodule.setup("validate")
    return next(iter(cli.datamodule.val_dataloader()[0]))


@pytest.mark.slow  # five CLI runs of the shipped configs on data/media, then four models compared
def test_unimoe_stages_chain_and_stage3_starts_from_each_modalitys_ffn(workdir, align_output):
    shutil.copytree(align_output, workdir / "runs")
    for config in UNIMOE[1:-1]:
        cli = fit(config)
        assert cli.trainer.global_step == 2
    assert (workdir / "runs/unimoe/experts/video/model/multimodal_config.json").is_file()
    cli = fit(UNIMOE[-1], "--trainer.max_steps=1", "--trainer.val_check_interval=1")
    assert [e["op"] for e in cli.model.model.surgery] == ["upcycle", "adapters"]
    # TensorBoard: the modality x expert heat map per layer
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((workdir / "runs/unimoe/moe").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "routing/layer0/val_modality_expert_heatmap" in events.Tags()["images"]
    assert any(t.startswith("val/routing/") and t.endswith("_own_expert_share") for t in events.Tags()["scalars"])
    assert (workdir / "runs/unimoe/moe/merged/multimodal_config.json").is_file()
    assert_outputs_load_safely(workdir)

    # through the shipped configs' outputs: a fresh stage-3 model, forced to each slot, computes its stage-2 model
    method = UniMoE(stage="moe", backbone=BackboneConfig(pretrained="runs/unimoe/align/model"),
                    experts={m: f"runs/unimoe/experts/{m}/model" for m in ("image", "audio", "video")},
                    moe=cli.model.moe_options)
    model = method.model.eval()
    batch = {k: v for k, v in eval_batch(cli).items() if isinstance(v, torch.Tensor)}
    inputs = method.model_inputs(batch)
    sources = {"dense": "align", "image": "experts/image", "audio": "experts/audio", "video": "experts/video"}
    for slot, name in enumerate(method.moe_options.experts):
        handles = [moe.router.register_forward_hook(forced(slot)) for _, moe in expert_layers(model)]
        with torch.no_grad():
            got = model(**inputs).logits
        for h in handles:
            h.remove()
        stage2 = MultimodalLM.from_pretrained(workdir / f"runs/unimoe/{sources[name]}/model").eval()
        with torch.no_grad():
            torch.testing.assert_close(got, stage2(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_experts_run_refuses_mixed_data(workdir, align_output):
    shutil.copytree(align_output, workdir / "runs")
    with pytest.raises(ValueError, match="audio data only"):  # not trained on the video batches
        fit(UNIMOE[1], "--data.init_args.domains=null")  # every domain of data/media, video included
