"""TensorBoard views of routing: expert load per sparse layer (histograms), router entropy, and
a domain × expert heat map per layer that shows whether routing specialises by domain, and an
expert-load bar chart per layer, both drawn by `lightning_moe.plots` (names, values, colour bar) with
the same numbers as text tables beside them. When the method's evaluation outputs carry each token's
modality (`token_modality`, Uni-MoE), also a modality × expert heat map and table per layer (does the
audio expert get the audio tokens?), over the tokens of modality features and the text tokens.

Reads the `routing` and `token_mask` that the method's steps return, so it sees the routing of
the teacher-forced forward pass (not of generation).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from .. import plots
from ..layers import RouterOutput


def layer_names(pl_module: L.LightningModule) -> list[str]:
    """Short names ("layer0", ...) of the routed layers, in the order the method collects them."""
    from ..models import routed_layers

    names = []
    for name, _ in routed_layers(pl_module.model):
        number = re.search(r"\.(\d+)\.", name)
        names.append(f"layer{number.group(1)}" if number else name)
    return names


def log_figure(writer: Any, tag: str, figure: Figure, step: int) -> None:
    """A matplotlib figure (`lightning_moe.plots`) as a TensorBoard image."""
    writer.add_image(tag, plots.to_image(figure), step, dataformats="HWC")


def _tensorboard(trainer: L.Trainer):
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class RoutingStatistics(L.Callback):
    def __init__(self, log_every_n_steps: int | None = None, save_figures: str | None = None):
        """log_every_n_steps: how often training routing is logged; None = the trainer's setting.
        save_figures: a directory where the validation / test figures are also written as PNG
        (`<layer>_<stage>_domain_expert_heatmap.png`, `<layer>_<stage>_expert_load.png`; the latest
        evaluation overwrites the previous one), e.g. for docs; None = TensorBoard only."""
        self.log_every_n_steps = log_every_n_steps
        self.save_figures = save_figures
        self._counts: dict[str, dict[str, torch.Tensor]] = {}  # layer -> domain -> (E,) routed slots
        self._modality_counts: dict[str, dict[str, torch.Tensor]] = {}  # layer -> modality (or text) -> (E,)
        self._entropy: dict[str, list[torch.Tensor]] = defaultdict(list)
        # stage -> layer -> modality -> share of its routed slots per expert, of the latest evaluation: what the
        # heat maps show, kept for code that reads the numbers (experiments/unimoe.py)
        self.modality_shares: dict[str, dict[str, dict[str, list[float]]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx: int) -> None:
        writer = _tensorboard(trainer)
        if writer is None or not isinstance(outputs, dict) or not outputs.get("routing"):
            return
        if trainer.global_step % (self.log_every_n_steps or trainer.log_every_n_steps):
            return
        mask = outputs["token_mask"].reshape(-1).bool()
        for name, routing in zip(layer_names(pl_module), outputs["routing"]):
            indices = routing.indices[mask].detach().flatten().cpu()
            num_experts = routing.probs.shape[-1]
            writer.add_histogram(f"routing/{name}/expert_load", indices, trainer.global_step,
                                 bins=torch.arange(num_experts + 1).float().numpy() - 0.5)
            pl_module.log(f"routing/{name}/entropy", entropy(routing, mask))

    def _accumulate(self, pl_module, outputs: Any) -> None:
        if not isinstance(outputs, dict) or not outputs.get("routing"):
            return
        token_mask = outputs["token_mask"]  # (B, T')
        batch, length = token_mask.shape
        sample_domain = outputs["domain"]
        for name, routing in zip(layer_names(pl_module), outputs["routing"]):
            indices = routing.indices.reshape(batch, length, -1).detach().cpu()
            mask = token_mask.bool().cpu()
            num_experts = routing.probs.shape[-1]
            per_domain = self._counts.setdefault(name, {})
            for b, domain in enumerate(sample_domain):
                counts = torch.bincount(indices[b][mask[b]].flatten(), minlength=num_experts).float()
                per_domain[domain] = per_domain.get(domain, torch.zeros(num_experts)) + counts
            self._entropy[name].append(entropy(routing, token_mask.reshape(-1).bool()).cpu())
            if outputs.get("token_modality") is not None:
                self._accumulate_modalities(name, indices, mask, outputs["token_modality"].cpu(), num_experts)

    def _accumulate_modalities(self, name: str, indices: torch.Tensor, mask: torch.Tensor, modality: torch.Tensor,
                               num_experts: int) -> None:
        from ..modalities import modality_names

        per_modality = self._modality_counts.setdefault(name, {})
        for index, label in [(-1, "text"), *enumerate(modality_names())]:
            chosen = indices[mask & (modality == index)]  # (tokens, k)
            if chosen.numel():
                counts = torch.bincount(chosen.flatten(), minlength=num_experts).float()
                per_modality[label] = per_modality.get(label, torch.zeros(num_experts)) + counts

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._accumulate(pl_module, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._accumulate(pl_module, outputs)

    def _write(self, trainer, pl_module, stage: str) -> None:
        writer = _tensorboard(trainer)
        counts, entropies, modality_counts = self._counts, self._entropy, self._modality_counts
        self._counts, self._entropy, self._modality_counts = {}, defaultdict(list), {}
        if writer is None or trainer.sanity_checking:
            return
        for name, per_modality in modality_counts.items():
            self._write_modalities(writer, trainer, name, stage, per_modality)
        for name, per_domain in counts.items():
            domains = sorted(per_domain)
            matrix = torch.stack([per_domain[d] / per_domain[d].sum().clamp(min=1) for d in domains])  # (D, E)
            heatmap = plots.routing_heatmap(matrix, domains, name, stage)
            log_figure(writer, f"routing/{name}/{stage}_domain_expert_heatmap", heatmap, trainer.global_step)
            header = "| domain | " + " | ".join(f"expert {e}" for e in range(matrix.shape[1])) + " |"
            rows = [f"| {d} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for d, row in zip(domains, matrix.tolist())]
            separator = "|---" * (matrix.shape[1] + 1) + "|"
            writer.add_text(f"routing/{name}/{stage}_domain_expert_table", "\n".join([header, separator, *rows]),
                            trainer.global_step)
            total = torch.stack(list(per_domain.values())).sum(0)
            load = plots.expert_load(total, name, stage)
            log_figure(writer, f"routing/{name}/{stage}_expert_load", load, trainer.global_step)
            if self.save_figures and trainer.is_global_zero:
                plots.save_png(heatmap, Path(self.save_figures) / f"{name}_{stage}_domain_expert_heatmap.png")
                plots.save_png(load, Path(self.save_figures) / f"{name}_{stage}_expert_load.png")
            writer.add_scalar(f"routing/{name}/{stage}_load_max_over_mean", total.max() / total.mean().clamp(min=1e-9),
                              trainer.global_step)
        for name, values in entropies.items():
            writer.add_scalar(f"routing/{name}/{stage}_entropy", torch.stack(values).mean(), trainer.global_step)

    def _write_modalities(self, writer, trainer, name: str, stage: str, per_modality: dict[str, torch.Tensor]) -> None:
        labels = list(per_modality)
        matrix = torch.stack([per_modality[m] / per_modality[m].sum().clamp(min=1) for m in labels])  # (M, E)
        self.modality_shares.setdefault(stage, {})[name] = dict(zip(labels, matrix.tolist()))
        figure = plots.heatmap(matrix, labels, [str(e) for e in range(matrix.shape[1])],
                               title=f"{name}: share of each modality's tokens per expert ({stage})", xlabel="expert",
                               ylabel="modality", colorbar_label="share of routed token slots")
        log_figure(writer, f"routing/{name}/{stage}_modality_expert_heatmap", figure, trainer.global_step)
        header = "| modality | " + " | ".join(f"expert {e}" for e in range(matrix.shape[1])) + " |"
        rows = [f"| {m} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for m, row in zip(labels, matrix.tolist())]
        writer.add_text(f"routing/{name}/{stage}_modality_expert_table",
                        "\n".join([header, "|---" * (matrix.shape[1] + 1) + "|", *rows]), trainer.global_step)
        if self.save_figures and trainer.is_global_zero:
            plots.save_png(figure, Path(self.save_figures) / f"{name}_{stage}_modality_expert_heatmap.png")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")


def entropy(routing: RouterOutput, mask: torch.Tensor) -> torch.Tensor:
    """Mean router entropy (nats) over real tokens; log(E) = uniform routing, 0 = deterministic."""
    probs = routing.probs.detach()[mask]
    return -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean()
