"""`ExpertOffloading`: `main.py predict` (and `test`) with the experts read from an EdgeMoE store.

At the start of prediction (and of testing) the callback swaps every `SparseMoE` layer of the
method's model for an offloaded one served from the store (`lightning_moe.inference.offload`):
non-expert weights stay as loaded, experts are read from the store's files into a byte-budgeted
cache, optionally predicted and prefetched. The store must have been exported from this very
model (same config and non-expert weights: `offload` checks the store's fingerprint), e.g.

    python -m lightning_moe.edge export --model CKPT --out STORE
    python main.py predict --config CONFIG --ckpt_path CKPT \\
        --trainer.callbacks+=lightning_moe.callbacks.ExpertOffloading --trainer.callbacks.store=STORE \\
        --trainer.callbacks.budget_fraction=0.25

At the end it prints the counters (hits, misses, bytes read, seconds waiting ...), logs them under
`offload/` to the trainer's logger, writes them as JSON to `stats_path` if given, and closes the
offloader (stops the prefetch thread), and puts the resident `SparseMoE` layers back, so a later
run with the same module (test after predict) starts from the model as loaded; the counters stay
in `self.stats`. With float32 experts, offloaded predictions equal resident ones (tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ..inference import CACHE_POLICIES, PROFILE_NAME, ExpertOffloader, ExpertStore, RoutingProfile, cache_budget, offload
from ..inference.store import expert_layers


class ExpertOffloading(L.Callback):
    def __init__(
        self,
        store: str,
        budget_fraction: float | None = None,
        budget_mb: float | None = None,
        policy: str = "lru",
        prefetch: bool = False,
        profile: str | None = None,
        prefetch_width: int | None = None,
        prediction: str = "table",
        dequantize_on_load: bool = False,
        drop_page_cache: bool = False,
        stats_path: str | None = None,
        in_test: bool = True,
    ):
        """
        Args:
            store: the expert store directory (`python -m lightning_moe.edge export`).
            budget_fraction: cache budget as a fraction of the store's expert bytes, or
            budget_mb: the budget in MiB; neither: no cache (every routed expert is read on demand).
            policy: cache eviction, 'lru' or 'freq_distance' (needs a routing profile).
            prefetch: predict the next MoE layer's experts and load them on a background thread.
            profile: routing profile JSON for prefetch / 'freq_distance'; default STORE/routing_profile.json.
            prefetch_width: experts prefetched per layer (default: the layer's top_k).
            prediction: 'table' (the profile's transitions, EdgeMoE) or 'lookahead' (the next
                layer's router on this layer's input; needs no profile), see `ExpertOffloader`.
            dequantize_on_load: cache quantised experts dense (see `ExpertOffloader`).
            drop_page_cache: drop each expert file from the OS page cache after reading it, so every
                read comes from storage (see `ExpertStore`).
            stats_path: write the counters there as JSON (e.g. beside the predictions).
            in_test: offload in `test` too, not only in `predict`.
        """
        if policy not in CACHE_POLICIES:
            raise ValueError(f"ExpertOffloading: policy must be one of {CACHE_POLICIES}, got {policy!r}")
        cache_budget(0, budget_fraction, budget_mb)  # both given, or a non-positive fraction: fail now
        self.store_path, self.budget_fraction, self.budget_mb = Path(store), budget_fraction, budget_mb
        self.policy, self.prefetch, self.prefetch_width = policy, prefetch, prefetch_width
        self.dequantize_on_load, self.drop_page_cache, self.prediction = dequantize_on_load, drop_page_cache, prediction
        self.profile_path = Path(profile) if profile else None
        self.stats_path = Path(stats_path) if stats_path else None
        self.in_test = in_test
        self.offloader: ExpertOffloader | None = None
        self.stats: dict[str, Any] | None = None  # the last run's counters
        self._resident: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, SparseMoE) swapped out

    # ------------------------------------------------------------------ swap in, report
    def _start(self, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if model is None or not expert_layers(model):
            raise ValueError(f"ExpertOffloading: {type(pl_module).__name__}.model has no SparseMoE layer; experts "
                             "can be offloaded only from a sparse model (e.g. MoE-tuning's stage `moe`)")
        # StoreError naming the directory if it is not a store
        store = ExpertStore(self.store_path, drop_page_cache=self.drop_page_cache)
        profile = None
        if (self.prefetch and self.prediction == "table") or self.policy == "freq_distance":
            profile = RoutingProfile.load(self.profile_path or store.directory / PROFILE_NAME)
        self._resident = []
        for name, moe in expert_layers(model):
            parent_name, _, attr = name.rpartition(".")
            self._resident.append((model.get_submodule(parent_name) if parent_name else model, attr, moe))
        self.offloader = offload(
            model, store, budget_bytes=cache_budget(store.expert_memory_bytes, self.budget_fraction, self.budget_mb),
            policy=self.policy, profile=profile, prefetch=self.prefetch, prefetch_width=self.prefetch_width,
            prediction=self.prediction, dequantize_on_load=self.dequantize_on_load,
        )  # raises if the store is another model's, the budget is below the largest expert, or the model is on GPU
        if hasattr(pl_module, "refresh_routed_layers"):  # routing statistics read the swapped layers
            pl_module.refresh_routed_layers()
        budget = self.offloader.cache.budget_bytes if self.offloader.cache is not None else None
        rank_zero_info(f"ExpertOffloading: {len(store.entries)} experts of {len(store.layers)} MoE layers served from "
                       f"{store.directory}, cache budget "
                       f"{'none' if budget is None else f'{budget / 2**20:.2f} MiB'} of "
                       f"{store.expert_memory_bytes / 2**20:.2f} MiB, policy {self.policy}, prefetch {self.prefetch}")

    def _restore(self, pl_module: L.LightningModule) -> None:
        """Put the resident SparseMoE layers back in place of the offloaded ones."""
        for parent, attr, moe in self._resident:
            setattr(parent, attr, moe)
        self._resident = []
        if hasattr(pl_module, "refresh_routed_layers"):
            pl_module.refresh_routed_layers()

    def _end(self, trainer: L.Trainer) -> None:
        if self.offloader is None:
            return
        try:
            self.offloader.close()  # waits for queued prefetches, so the counters below are final
        finally:
            self.stats = self.offloader.stats.as_dict()
            self.offloader = None
            self._restore(trainer.lightning_module)
        rank_zero_info(f"ExpertOffloading counters: {json.dumps(self.stats)}")
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"offload/{k}": float(v) for k, v in self.stats.items()}, step=trainer.global_step)
        if self.stats_path is not None:
            path = self.stats_path
            if trainer.world_size > 1:
                path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.stats, indent=2) + "\n")
            rank_zero_info(f"ExpertOffloading: wrote the counters to {path}")

    # ------------------------------------------------------------------ Lightning hooks
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.in_test:
            self._start(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.offloader is not None:
            self.offloader.close()  # stop the prefetch thread; the run failed, so no counters are written
            self.offloader = None
            self._restore(pl_module)
