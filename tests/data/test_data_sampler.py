"""The resumable training sampler / loader (data/sampler.py): the order of epoch 0 is what torch's samplers
drew before, each epoch has its own order, a restored loader continues where the saved one stopped, and
ranks split each global batch into contiguous blocks that one process with accumulation sees in order; and, under
a real Trainer, a run resumed from a mid-epoch checkpoint trains on the batches the uninterrupted run trained on,
whether the checkpoint was written after a batch or by a run that `max_steps` stopped mid-epoch."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import RandomSampler, WeightedRandomSampler

from lightning_moe.data.datamodule import _permutation, _weighted_draws
from lightning_moe.data.sampler import ResumableDataLoader, ResumableSampler


def loader(sampler: ResumableSampler) -> ResumableDataLoader:
    return ResumableDataLoader(list(range(100)), batch_size=sampler.batch_size, sampler=sampler,
                               collate_fn=lambda rows: rows)


def test_epoch_zero_draws_what_torch_samplers_draw_and_later_epochs_differ():
    weights = torch.rand(30, dtype=torch.double)
    weighted = ResumableSampler(partial(_weighted_draws, weights, 50), 50, batch_size=4, seed=7)
    assert list(weighted) == list(WeightedRandomSampler(weights, 50, generator=torch.Generator().manual_seed(7)))
    shuffle = ResumableSampler(partial(_permutation, 30), 30, batch_size=4, seed=7)
    assert list(shuffle) == list(RandomSampler(range(30), generator=torch.Generator().manual_seed(7)))
    first = list(shuffle)
    shuffle.set_epoch(1)
    assert list(shuffle) != first and sorted(shuffle) == sorted(first)
    fixed = ResumableSampler(partial(_permutation, 30), 30, batch_size=4, seed=7, reseed_every_epoch=False)
    fixed.set_epoch(2)
    assert list(fixed) == first


@pytest.mark.parametrize("stop_after", [0, 3, 7])
def test_a_restored_loader_continues_where_the_saved_one_stopped(stop_after):
    def fresh():
        return loader(ResumableSampler(partial(_permutation, 30), 30, batch_size=4, seed=1))

    reference = fresh()
    reference.sampler.set_epoch(2)
    expected = list(reference)
    saved = fresh()
    saved.sampler.set_epoch(2)
    iterator = iter(saved)
    for _ in range(stop_after):
        next(iterator)
    restored = fresh()
    restored.load_state_dict(saved.state_dict())
    restored.sampler.set_epoch(2)  # what Lightning sets after loading
    assert list(restored) == expected[stop_after:]
    assert restored.state_dict()["batches"] == len(expected)


def test_an_end_of_epoch_state_starts_the_next_epoch_from_its_first_batch():
    saved = loader(ResumableSampler(partial(_permutation, 30), 30, batch_size=4, seed=1))
    list(saved)
    restored = loader(ResumableSampler(partial(_permutation, 30), 30, batch_size=4, seed=1))
    restored.load_state_dict(saved.state_dict())
    assert restored.sampler.epoch == 1
    nxt = loader(ResumableSampler(partial(_permutation, 30), 30, batch_size=4, seed=1))
    nxt.sampler.set_epoch(1)
    assert list(restored) == list(nxt)


def test_ranks_take_contiguous_blocks_of_each_global_batch():
    draw, batch = partial(_permutation, 30), 4
    single = list(loader(ResumableSampler(draw, 30, batch_size=batch, seed=3)))
    ranks = [list(loader(ResumableSampler(draw, 30, batch_size=batch, seed=3, num_replicas=2, rank=r))) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 30 samples: 4 global batches of 8, the last one wrapped around
    for i in range(3):  # the global batches before the wrap-around
        assert ranks[0][i] == single[2 * i] and ranks[1][i] == single[2 * i + 1]
    assert set(sum(ranks[0] + ranks[1], [])) == set(range(30))


def test_a_mid_epoch_state_from_another_process_count_is_refused():
    saved = loader(ResumableSampler(partial(_permutation, 30), 30, batch_size=4, seed=1, num_replicas=2, rank=0))
    next(iter(saved))
    with pytest.raises(ValueError, match="2 training processes"):
        loader(ResumableSampler(partial(_permutation, 30), 30, batch_size=4, seed=1)).load_state_dict(saved.state_dict())


class RecordBatches(L.LightningModule):
    """A one-weight model that records the sample indices of every batch it trains on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.trained_on: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.trained_on.append(batch)
        return self.weight * sum(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):  # 12 samples, batches of 2: 6 batches per epoch
        return loader(ResumableSampler(partial(_permutation, 12), 12, batch_size=2, seed=1))


def fit(steps: int, tmp_path, checkpoints: list[ModelCheckpoint] = (), ckpt_path=None) -> RecordBatches:
    model = RecordBatches()
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path, callbacks=list(checkpoints), enable_checkpointing=bool(checkpoints)
              ).fit(model, ckpt_path=ckpt_path)
    return model


# where a 2-step run writes the checkpoint resumed from: the every-step checkpoint after batch 2; a plain last.ckpt,
# in `on_train_epoch_end`; the quickstart's (a monitored metric, no validation run), in `on_train_end`
CHECKPOINTS = {
    "after batch 2": lambda d: ModelCheckpoint(dirpath=d, filename="{step}", every_n_train_steps=1, save_top_k=-1),
    "at the stopped epoch's end": lambda d: ModelCheckpoint(dirpath=d, save_last=True),
    "at the stopped run's end": lambda d: ModelCheckpoint(dirpath=d, monitor="val/exact_match", save_last=True),
}


@pytest.mark.parametrize("written", CHECKPOINTS)
def test_a_trainer_resumed_mid_epoch_trains_on_the_uninterrupted_runs_batches(written, tmp_path):
    """A run that `max_steps` stops mid-epoch writes its last checkpoint after Lightning counted the epoch as
    processed: the resumed Trainer numbers the rest of epoch 0 "epoch 1", and every later epoch one more."""
    uninterrupted = fit(14, tmp_path).trained_on  # into epoch 2: the epochs after the resumed one draw their own orders
    assert fit(2, tmp_path, [CHECKPOINTS[written](tmp_path / "ckpt")]).trained_on == uninterrupted[:2]
    path = tmp_path / "ckpt" / ("step=2.ckpt" if written == "after batch 2" else "last.ckpt")
    saved = torch.load(path, weights_only=False)["loops"]["fit_loop"]
    assert saved["state_dict"]["combined_loader"][0]["batches"] == 2
    assert saved["epoch_progress"]["current"]["processed"] == (0 if written == "after batch 2" else 1)
    assert fit(14, tmp_path, ckpt_path=path).trained_on == uninterrupted[2:]
