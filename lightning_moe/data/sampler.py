"""A training sampler and DataLoader that Lightning can checkpoint and restore mid-epoch, and shard over ranks.

Exact resume: a run killed mid-epoch and resumed from its last checkpoint must see, batch for batch,
what the uninterrupted run saw. Two pieces make that so:

- `ResumableSampler` draws an epoch's order from its own generator seeded by `(seed, epoch)` alone
  (Lightning calls `set_epoch` every epoch), so the order of epoch e never depends on how many
  epochs this process has run, and it can skip the batches a restored run has already trained on.
- `ResumableDataLoader` counts the batches it has handed out this epoch and exposes that count as
  `state_dict` / `load_state_dict`; Lightning's fit loop saves the state of every stateful train
  loader into the checkpoint (`loops.fit_loop.combined_loader`) and restores it on `--ckpt_path`.

The loader's state, not Lightning's epoch counter, says which epoch a restored run continues: a run that
`max_steps` stops mid-epoch writes its last checkpoint in `on_train_epoch_end` or `on_train_end`, after
Lightning has counted the epoch as processed, so on resume Lightning starts "epoch e + 1" at batch b while the
loader stopped at batch b of epoch e. The first `set_epoch` after a restore therefore fixes an offset between
Lightning's epochs and the epochs drawn, kept for the rest of the run (0 when the two agree, as for a
checkpoint written after a batch). It holds for any number of processes.

Several processes (DDP, FSDP): the sampler subclasses `DistributedSampler`, so Lightning does not wrap it,
and shards every global batch of `batch_size x world_size` positions into contiguous per-rank blocks:
rank r's i-th batch is positions [(i*R + r)*B, (i*R + r + 1)*B) of the epoch's order. One process with
`accumulate_grad_batches=R` therefore sees exactly the same micro-batches, which is what the DDP parity
test compares against. With one process nothing is padded or dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

# epoch e is drawn with seed + EPOCH_SEED_STRIDE * e: epoch 0 keeps the plain seed (the order runs had before)
EPOCH_SEED_STRIDE = 1_000_003


class ResumableSampler(DistributedSampler):
    """Per-epoch order from `draw(generator)`, sharded over ranks, able to skip already-trained batches.

    Args:
        draw: returns the epoch's dataset indices given a seeded `torch.Generator` (a permutation,
            or weighted draws with replacement).
        length: how many indices `draw` returns.
        batch_size: per-process batch size (the shard unit).
        seed: base seed; epoch e uses `seed + EPOCH_SEED_STRIDE * e` when `reseed_every_epoch`.
        reseed_every_epoch: False keeps `seed` for every epoch (a loader rebuilt per epoch, such as the
            continual DataModule's per-task loader, whose order then does not depend on the epoch).
        num_replicas / rank: the process group (1 / 0 for a single process).
    """

    def __init__(self, draw: Callable[[torch.Generator], list[int]], length: int, batch_size: int, seed: int = 0,
                 reseed_every_epoch: bool = True, num_replicas: int = 1, rank: int = 0):
        # DistributedSampler.__init__ is not called: it wants a dataset and may query torch.distributed;
        # the subclass exists so that Lightning leaves this sampler alone (`_requires_distributed_sampler`)
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad sampler shape: batch_size={batch_size}, num_replicas={num_replicas}, rank={rank}")
        self.draw, self.length, self.batch_size = draw, length, batch_size
        self.seed, self.reseed_every_epoch = seed, reseed_every_epoch
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.shuffle, self.drop_last = True, False  # read by Lightning's sampler inspection
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained in it)
        self.epoch_offset = 0  # Lightning's epoch minus the epoch drawn (module docstring)
        self.skipped_batches = 0  # batches skipped by the current iteration (set when iteration starts)

    def set_epoch(self, epoch: int) -> None:
        """Lightning starts its epoch `epoch`: draw epoch `epoch - epoch_offset`; after a restore, Lightning's
        first epoch continues the restored one, whatever its number (module docstring)."""
        if self._resume is not None:
            self.epoch_offset = epoch - self._resume[0]
        self.epoch = epoch - self.epoch_offset

    def resume(self, epoch: int, batches: int) -> None:
        """The next iteration over `epoch` starts after its first `batches` batches (a restored checkpoint)."""
        self.epoch, self._resume = epoch, (epoch, batches)

    def epoch_seed(self, epoch: int) -> int:
        return self.seed + EPOCH_SEED_STRIDE * epoch if self.reseed_every_epoch else self.seed

    def _positions_per_rank(self) -> int:
        if self.num_replicas == 1:
            return self.length
        unit = self.batch_size * self.num_replicas
        return -(-self.length // unit) * self.batch_size  # every rank gets the same number of full batches

    def __len__(self) -> int:
        return self._positions_per_rank()

    def __iter__(self) -> Iterator[int]:
        order = list(self.draw(torch.Generator().manual_seed(self.epoch_seed(self.epoch))))
        if len(order) != self.length:
            raise RuntimeError(f"sampler drew {len(order)} indices, expected {self.length}")
        if self.num_replicas > 1:
            per_rank, b, r = self._positions_per_rank(), self.batch_size, self.num_replicas
            order = order + order[: per_rank * r - len(order)]  # wrap around so that no rank runs short
            order = [i for g in range(per_rank // b) for i in order[(g * r + self.rank) * b:(g * r + self.rank + 1) * b]]
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        self.skipped_batches = min(skip, -(-len(order) // self.batch_size))
        return iter(order[skip * self.batch_size:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside the epoch is checkpointed by Lightning (module docstring).

    Needs a `ResumableSampler` and no `batch_sampler`. Lightning's train fetcher does not prefetch from a
    loader with a length, so at a checkpoint the count of batches handed out equals the batches trained.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(self.sampler).__name__}")
        self._batches_this_epoch = 0

    def __iter__(self) -> Iterator[Any]:
        self._batches_this_epoch = 0
        for i, batch in enumerate(super().__iter__()):
            if i == 0:  # the sampler has now started this epoch and knows how many batches it skipped
                self._batches_this_epoch = self.sampler.skipped_batches
            self._batches_this_epoch += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._batches_this_epoch, "length": len(self),
                "num_replicas": self.sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= int(state.get("length", len(self))):  # saved at an epoch's end: the next starts from batch 0
            epoch, batches = epoch + 1, 0
        elif state.get("num_replicas", 1) != self.sampler.num_replicas:
            raise ValueError(
                f"the checkpoint was saved mid-epoch by {state['num_replicas']} training processes and this run has "
                f"{self.sampler.num_replicas}: the rest of that epoch cannot be replayed exactly; resume with "
                f"{state['num_replicas']} processes, or from an end-of-epoch checkpoint")
        self.sampler.resume(epoch, batches)
        self._batches_this_epoch = batches
