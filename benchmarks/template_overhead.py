"""What the template costs around a real LLM: the project's training step and generation against plain
PyTorch + transformers on the same model and the same batches.

    python benchmarks/template_overhead.py [--steps 10] [--generations 6] [--threads 2] [--quick] [--out DIR]

The model and batches are configs/real/stage2_instruct.yaml's: SmolLM2-135M-Instruct from the packaged GGUF
(`smollm2-135m-instruct`, the `real` extra; docs/real_model.md) with the tiny trainable CLIP tower and its
LLaVA projector, every parameter training (the LLM, the connector, the tower), AdamW at 2e-5, gradient
clipping at 1.0, batch 8 of the shipped shapes data drawn through the project's `DomainMixtureDataModule`,
greedy answers of 4 tokens. `--quick` builds the tiny preset LLM with the shipped tokenizer instead (no
extra needed: the test's smoke run).

a. Training. The project's step is `MoETuning` run by a real `Trainer.fit` with the stage's trainer settings
   and callbacks (TensorBoard logger, `LearningRateMonitor`, `StageProfile`, `MetricsSummary`; not
   `SavePretrained`, which writes the model after training): everything Lightning does between one batch and
   the next is the template's (training_step, logging, the optimizer closure, clipping, callbacks, progress
   bar). The plain step, run by a callback at the start of every batch on that same batch, is what one
   writes without the template: the tower and connector modules, the placeholder spread into its image's
   features the way transformers' LLaVA does it (placeholder ids repeated in data preparation, untimed,
   then `masked_scatter`), the same HF model (`method.model.llm`, the very module) called with
   `labels` for transformers' own loss, backward, `clip_grad_norm_`, its own AdamW over the same
   parameters. A project step is the wall time from the end of the plain step to the next batch's start:
   the batches are drawn before the run (data loading, timed on its own, is outside both).
b. Generation. `method.generate_answers` (what validation and predict call) against `llm.generate` of the
   plain inputs (greedy, the same `max_new_tokens`) and `batch_decode`, on the same validation batches (16
   prompts, one batch per domain in turn), interleaved.

Before timing, parity: the plain first loss equals the project's (same weights), and both generations give
the same answers. Medians after warm-up and their ratios project / plain are printed with the date, the
threads and the commit; `--out DIR` writes DIR/results.json. The target is within 1.15 x for both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from lightning_moe.callbacks import MetricsSummary, StageProfile  # noqa: E402
from lightning_moe.data import DomainMixtureDataModule  # noqa: E402
from lightning_moe.methods import BackboneConfig, MoETuning  # noqa: E402
from lightning_moe.provenance import git_state, provenance_words  # noqa: E402
from lightning_moe.tokens import IGNORE_INDEX  # noqa: E402

REAL_MODEL = "smollm2-135m-instruct"
WARMUP = 2  # steps / generations left out of the medians (allocations, AdamW state)
TARGET = 1.15


def expand_placeholders(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, placeholder: int,
                        features: int, pad_id: int, left: bool) -> tuple[torch.Tensor, ...]:
    """transformers' LLaVA input: each placeholder repeated `features` times (labels ignored there), padded
    again (on the left for generation prompts). Data preparation, as LLaVA's processor does it: not timed."""
    rows = []
    for i in range(ids.shape[0]):
        real = mask[i].bool()
        tokens = ids[i][real]
        repeats = torch.where(tokens == placeholder, features, 1)
        row_labels = (labels[i][real] if labels is not None else torch.full_like(tokens, IGNORE_INDEX))
        expanded = tokens.repeat_interleave(repeats)
        rows.append((expanded, row_labels.repeat_interleave(repeats).masked_fill(expanded == placeholder, IGNORE_INDEX)))
    length = max(len(t) for t, _ in rows)
    out_ids = torch.full((len(rows), length), pad_id, dtype=ids.dtype)
    out_mask = torch.zeros((len(rows), length), dtype=mask.dtype)
    out_labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=ids.dtype)
    for i, (tokens, row_labels) in enumerate(rows):
        span = slice(length - len(tokens), length) if left else slice(0, len(tokens))
        out_ids[i, span], out_mask[i, span], out_labels[i, span] = tokens, 1, row_labels
    return (out_ids, out_mask) if labels is None else (out_ids, out_mask, out_labels)


class PlainModel:
    """The method's modules used without the template: tower + connector, LLaVA's `masked_scatter`, the HF LLM."""

    def __init__(self, method: MoETuning) -> None:
        model = method.model
        self.llm, self.tower, self.connector = model.llm, model.encoders["image"], model.connectors["image"]
        self.placeholder = model.placeholder_ids["image"]
        self.tokenizer = method.tokenizer
        with torch.no_grad():
            self.features = model.encode("image", torch.zeros(1, 3, 32, 32)).shape[1]  # tokens per image

    def inputs(self, batch: dict, prompt: bool = False) -> tuple[torch.Tensor, ...]:
        if prompt:
            return expand_placeholders(batch["prompt_input_ids"], batch["prompt_attention_mask"], None,
                                       self.placeholder, self.features, self.tokenizer.pad_token_id, left=True)
        return expand_placeholders(batch["input_ids"], batch["attention_mask"], batch["labels"], self.placeholder,
                                   self.features, self.tokenizer.pad_token_id, left=False)

    def embeds(self, ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        image_features = self.connector(self.tower(pixel_values))
        is_image = ids == self.placeholder
        embeds = self.llm.get_input_embeddings()(ids.masked_fill(is_image, 0))
        return embeds.masked_scatter(is_image[..., None], image_features.to(embeds.dtype))

    def loss(self, ids, mask, labels, pixel_values) -> torch.Tensor:
        return self.llm(inputs_embeds=self.embeds(ids, pixel_values), attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def answers(self, ids, mask, pixel_values, max_new_tokens: int) -> list[str]:
        new = self.llm.generate(inputs_embeds=self.embeds(ids, pixel_values), attention_mask=mask, do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                eos_token_id=self.tokenizer.eos_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class InterleavedPlainStep(L.Callback):
    """At each batch's start, one plain training step on that batch (timed), then the clock for the project's
    step starts; it stops at the next batch's start."""

    def __init__(self, plain: PlainModel, plain_inputs: list[tuple[torch.Tensor, ...]], clip: float) -> None:
        self.plain, self.plain_inputs, self.clip = plain, plain_inputs, clip
        self.plain_times: list[float] = []
        self.project_times: list[float] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._resumed: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.params = [p for p in pl_module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=2e-5, weight_decay=0.0)  # the stage's optimizer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        start = time.perf_counter()
        if self._resumed is not None:
            self.project_times.append(start - self._resumed)
        ids, mask, labels = self.plain_inputs[batch_idx]
        self.plain.loss(ids, mask, labels, batch["pixel_values"]).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._resumed = time.perf_counter()
        self.plain_times.append(self._resumed - start)


def build(args: argparse.Namespace) -> tuple[MoETuning, DomainMixtureDataModule]:
    tokenizer = str(ROOT / "data/tokenizer") if args.quick else REAL_MODEL
    image = {"tower": "tiny-clip", "feature_layer": -1, "connector": "mlp2x_gelu"}
    backbone = (BackboneConfig(encoders={"image": image}) if args.quick else
                BackboneConfig(llm=REAL_MODEL, torch_dtype="float32", encoders={"image": image}))
    torch.manual_seed(0)
    method = MoETuning(stage="instruct", backbone=backbone, tokenizer=tokenizer, train_vision_tower=True,
                       optimizer=lambda params: torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0),
                       max_new_tokens=4, pope_domains=["pope"])
    data = DomainMixtureDataModule(root=str(ROOT / "data/shapes"), tokenizer=tokenizer, batch_size=args.batch_size,
                                   eval_batch_size=16, max_eval_samples_per_domain=16,
                                   max_train_samples_per_domain=8 * args.batch_size if args.quick else None)
    data.setup("fit")
    return method, data


def time_data_loading(data: DomainMixtureDataModule, batches: int) -> float:
    """Median seconds to draw one training batch from the data module's loader (images read and collated)."""
    times, loader = [], iter(data.train_dataloader())
    for _ in range(batches):
        start = time.perf_counter()
        next(loader)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps of each (after 2 warm-up steps)")
    parser.add_argument("--generations", type=int, default=6, help="timed generation batches of each (after 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: the tiny preset LLM, 2 timed steps")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json here")
    args = parser.parse_args()
    provenance = git_state()  # when the run starts
    if args.quick:
        args.steps, args.generations = 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|isn't set|log_every_n_steps).*")
    L.seed_everything(0, verbose=False)
    method, data = build(args)
    plain = PlainModel(method)
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(8)]
    val_batches = [next(iter(domain)) for domain in data.val_dataloader()]
    data_s = time_data_loading(data, 2 + args.steps // 2)

    # parity: the same weights give the same first loss and the same answers either way
    with torch.no_grad():
        project_loss = method.compute_loss(batches[0]).logs["lm_loss"]
        plain_loss = plain.loss(*plain.inputs(batches[0]), batches[0]["pixel_values"])
    torch.testing.assert_close(plain_loss, project_loss, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"the plain step's first loss: {m}")
    method.eval()
    for batch in val_batches:
        project_answers = method.generate_answers(batch)
        plain_answers = plain.answers(*plain.inputs(batch, prompt=True), batch["pixel_values"], method.max_new_tokens)
        assert project_answers == plain_answers, (project_answers, plain_answers)
    print(f"parity: ok (first LM loss {float(project_loss):.5f} both ways; the same greedy answers on "
          f"{len(val_batches)} validation batches)")

    # a. training: the real Trainer, with the plain step interleaved by a callback
    total = WARMUP + args.steps + 1  # the last iteration has no next batch start to end its clock
    plain_inputs = [plain.inputs(batches[k % len(batches)]) for k in range(total)]
    interleaved = InterleavedPlainStep(plain, plain_inputs, clip=1.0)
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=total, gradient_clip_val=1.0,
                            log_every_n_steps=5, num_sanity_val_steps=0, limit_val_batches=0,
                            enable_checkpointing=False, enable_progress_bar=True, enable_model_summary=False,
                            logger=TensorBoardLogger(logs, name="template_overhead"),
                            callbacks=[interleaved, LearningRateMonitor(), StageProfile(), MetricsSummary()])
        train_loader = DataLoader([batches[k % len(batches)] for k in range(total)], batch_size=None,
                                  collate_fn=lambda batch: batch)
        method.train()
        trainer.fit(method, train_dataloaders=train_loader)
    step = {"project": statistics.median(interleaved.project_times[WARMUP:]),
            "plain": statistics.median(interleaved.plain_times[WARMUP:len(interleaved.project_times)])}

    # b. generation, interleaved
    method.eval()
    prompts = [plain.inputs(b, prompt=True) for b in val_batches]
    gen_times: dict[str, list[float]] = {"project": [], "plain": []}
    for k in range(WARMUP + args.generations):
        batch, (ids, mask) = val_batches[k % len(val_batches)], prompts[k % len(val_batches)]
        runs = {"project": lambda: method.generate_answers(batch),
                "plain": lambda: plain.answers(ids, mask, batch["pixel_values"], method.max_new_tokens)}
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if k >= WARMUP:
                gen_times[name].append(time.perf_counter() - start)
    generation = {name: statistics.median(t) for name, t in gen_times.items()}

    model = "tiny preset LLM (--quick)" if args.quick else REAL_MODEL
    stamp = (f"{datetime.date.today()}, {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{provenance_words(provenance)}")
    print(f"\n{stamp}; {model}, stage 2 (instruct), batch {args.batch_size}: {args.steps} interleaved training steps "
          f"each, {args.generations} generation batches of {len(val_batches[0]['domain'])} prompts "
          f"({method.max_new_tokens} new tokens) each\n")
    print(f"| what | project s | plain s | project / plain | within {TARGET} |\n|---|---|---|---|---|")
    rows = {"training step": step, "greedy generation": generation}
    ratios = {name: r["project"] / r["plain"] for name, r in rows.items()}
    for name, r in rows.items():
        print(f"| {name} | {r['project']:.3f} | {r['plain']:.3f} | {ratios[name]:.2f} | "
              f"{'yes' if ratios[name] <= TARGET else 'no'} |")
    print(f"\ndata loading (the data module's loader, in the main process): {data_s:.3f} s a batch, outside both steps")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({
            "stamp": stamp, **provenance, "model": model, "batch_size": args.batch_size, "steps": args.steps,
            "generations": args.generations, "median_s": rows, "ratios": ratios, "data_loading_s": data_s,
            "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
