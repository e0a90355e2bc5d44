"""The default progress bar of a step-based run counts optimizer steps out of `max_steps`, across epochs,
instead of restarting per epoch under "Epoch N/-2"; a config's own bar and `enable_progress_bar: false`
are respected."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar

from lightning_moe.callbacks import StepProgressBar
from lightning_moe.cli import main
from tests.conftest import ROOT

# 2 batches per epoch and 5 steps: the run spans 3 epochs, which a per-epoch bar would count as 2, 2, 1
SMALL = ["--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_steps=5", "--trainer.limit_train_batches=2",
         "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--data.init_args.batch_size=2",
         "--data.init_args.max_eval_samples_per_domain=2",
         '--trainer.callbacks=[{"class_path": "tests.callbacks.test_progress.BarRecorder"}]']


class BarRecorder(L.Callback):
    """What the bar shows before each training batch (after the previous one, epoch starts included):
    (completed, total, description)."""

    def __init__(self):
        self.seen: list[tuple[int, int, str]] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        if not isinstance(trainer.progress_bar_callback, StepProgressBar):  # the runs without our bar
            return
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.n, bar.total, bar.desc))


def test_step_based_run_shows_steps_out_of_max_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", *SMALL])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, BarRecorder))
    assert cli.trainer.current_epoch == 3 and cli.trainer.global_step == 5
    # one bar over the three epochs: never reset to 0 at an epoch start
    assert [(n, total) for n, total, _ in recorder.seen] == [(step, 5) for step in range(5)]
    assert bar.train_progress_bar.n == 5
    assert all(desc.startswith("Training steps") for _, _, desc in recorder.seen)


def test_epoch_based_run_keeps_lightnings_per_epoch_bar(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", *SMALL, "--trainer.max_steps=-1", "--trainer.max_epochs=2",
])
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, BarRecorder))
    assert [(n, total) for n, total, _ in recorder.seen] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert recorder.seen[-1][2].startswith("Epoch 1")


@pytest.mark.parametrize("extra, expected", [
    (["--trainer.enable_progress_bar=false"], type(None)),
    (["--trainer.callbacks+=lightning.pytorch.callbacks.RichProgressBar"], RichProgressBar),
])
def test_a_configured_bar_or_none_is_respected(tmp_path, monkeypatch, extra, expected):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", *SMALL, "--trainer.max_steps=1", *extra])
    assert type(cli.trainer.progress_bar_callback) is expected
