"""`DomainMixtureDataModule`: several LLaVA-format domains, mixed for training, apart for evaluation.

Training draws from one mixture of all domains that have a train split:

- `proportional`: each domain in proportion to its size (a plain shuffle of the concatenation);
- `weighted`: domain probability proportional to its `weight`;
- `temperature`: probability proportional to size ** (1 / temperature) (T = 1 is proportional,
  large T approaches uniform), as in multilingual / multi-task mixing.

Validation and test return one DataLoader per domain that has the split, in the order of the
`domains` mapping, so that Lightning's `dataloader_idx` i is domain `eval_domains(stage)[i]` and
conflicts between domains show in per-domain metrics. The tokenizer is loaded in `__init__`
because the model needs its vocabulary size, pad id and placeholder ids before setup.

Domain weights are checked when the config is parsed (`DomainWeight`: finite and > 0), before
any class is built. A weight of 0 is refused rather than read as "disabled": a domain left out of
training is one without `train` files (its val / test splits are still evaluated), which says so
in the config itself. Skipped records are counted per reason, listed in full in the run's log
directory (`skips.py`), and a sample that fails to decode while training is skipped and counted
(`on_before_batch_transfer`). Record ids are compared across every split and domain set up
(`duplicate_ids`: the same id in train and test would be a leak).
"""

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import restricted_number_type
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from lightning_moe.data.dataset import DUPLICATE_ID_POLICIES, SKIPPED_RECORDS, LlavaDataset, collate_batch
from lightning_moe.data.records import (DUPLICATE_ID, MAX_CHARACTERS, MAX_TURNS, BadRecordError, DataError,
                                        SkippedRecord, where)
from lightning_moe.data.skips import SkipLog
from lightning_moe.data.sampler import ResumableDataLoader, ResumableSampler
from lightning_moe.modalities import build_transforms, split_option
from lightning_moe.paths import resolve_data_path
from lightning_moe.tokens import DEFAULT_TOKENIZER, load_tokenizer

SAMPLING_MODES = ("proportional", "weighted", "temperature")
# the arguments that are options of the shipped modalities' transforms, `<modality>_<option>`
TRANSFORM_ARGUMENTS = ("image_size", "image_mean", "image_std", "image_processor", "audio_n_mels", "audio_chunk_seconds",
                       "audio_max_chunks", "audio_processor", "video_num_frames")
SPLITS = ("train", "val", "test")
# Lightning stage -> the splits it needs.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
# Stage names (TrainerFn and RunningStage values included) -> the split their evaluation loaders hold.
EVAL_SPLIT = {
    "fit": "val", "train": "val", "sanity_check": "val", "validate": "val", "val": "val",
    "test": "test", "predict": "test",
}  # fmt: skip


# A float the config parser itself refuses unless finite and > 0 (NaN fails both comparisons), so a
# bad weight stops the run at parsing, naming `data...domains` and `weight`, before the model is built.
DomainWeight = restricted_number_type("DomainWeight", float, [(">", 0), ("<", math.inf)], join="and")


def check_domain_weight(weight: float, key: str = "weight") -> float:
    """`weight` as a plain float if finite and > 0; else a ValueError naming `key`."""
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight < math.inf:
        raise ValueError(
            f"{key} must be a finite number > 0, got {weight!r}; to leave a domain out of training, "
            "drop its `train` files (its val / test splits are still evaluated)"
        )
    return float(weight)


@dataclass
class DomainSpec:
    """One domain: data file(s) per split, relative to the DataModule's `root`, and a mixing weight.

    `weight` (finite, > 0) is used by `sampling: weighted` only.
    """

    train: str | list[str] | None = None
    val: str | list[str] | None = None
    test: str | list[str] | None = None
    weight: DomainWeight = 1.0

    def __post_init__(self) -> None:
        # the parser has checked it already; this covers Python callers, and stores a plain float
        self.weight = check_domain_weight(self.weight)


def mixture_probabilities(
    sizes: dict[str, int], weights: dict[str, float], sampling: str, temperature: float = 2.0
) -> dict[str, float]:
    """Probability of drawing each domain (keys of `sizes`) under a sampling mode (module docstring)."""
    if sampling == "proportional":
        scores = {d: float(n) for d, n in sizes.items()}
    elif sampling == "weighted":
        scores = {d: float(weights[d]) for d in sizes}
    elif sampling == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        scores = {d: float(n) ** (1.0 / temperature) for d, n in sizes.items()}
    else:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if any(s < 0 or not math.isfinite(s) for s in scores.values()) or sum(scores.values()) <= 0:
        raise ValueError(f"cannot mix domains with scores {scores} (sampling={sampling!r})")
    total = sum(scores.values())
    return {d: s / total for d, s in scores.items()}


def _check_at_least(minimum: int, **settings: int | None) -> None:
    """A ValueError naming the first setting that is given (not None) and not an integer >= `minimum`."""
    for key, value in settings.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


def _domain_spec(name: str, spec: DomainSpec | dict) -> DomainSpec:
    """A `DomainSpec` from a spec or a plain dict (Python callers), errors naming `domains.<name>`."""
    if isinstance(spec, DomainSpec):
        return spec  # checked when it was built
    check_domain_weight(spec.get("weight", 1.0), f"domains.{name}.weight")
    return DomainSpec(**spec)


def discover_domains(root) -> dict[str, DomainSpec]:
    """The shipped layout: one folder per domain with `{train,val,test}.jsonl`, in name order."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    domains = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = {split: f"{folder.name}/{split}.jsonl" for split in SPLITS if (folder / f"{split}.jsonl").is_file()}
        if files:
            domains[folder.name] = DomainSpec(**files)
    if not domains:
        raise ValueError(f"no domains under {root}: expected <domain>/train.jsonl (val.jsonl, test.jsonl) folders")
    return domains


class DomainMixtureDataModule(L.LightningDataModule):
    """A mixture of LLaVA-format domains (see the module docstring).

    Args:
        domains: name -> `DomainSpec` (or a dict with its fields): files per split and a weight.
            None: every `<root>/<domain>/` holding any of `train.jsonl`, `val.jsonl`, `test.jsonl`.
        root: dataset root; data files and image paths resolve under it.
        tokenizer: tokenizer name or directory, loaded with `load_tokenizer`.
        batch_size / eval_batch_size: training / evaluation batch sizes.
        sampling: `proportional`, `weighted` or `temperature` (training mixture).
        temperature: T of temperature sampling.
        samples_per_epoch: training samples drawn per epoch (with replacement); default: the
            total train size, and `proportional` then visits each sample once per epoch.
        max_length: conversations are truncated to this many tokens (and counted).
        image_size / image_mean / image_std: the default image transform.
        image_processor: a Hugging Face image processor name/path; replaces the default transform.
        audio_n_mels / audio_chunk_seconds / audio_max_chunks: Whisper log-mel features of audio
            clips, cut into windows of `audio_chunk_seconds` (Whisper: 30; short for tiny CPU
            models), at most `audio_max_chunks` per clip (`lightning_moe/modalities/audio.py`).
        audio_processor: a Hugging Face feature extractor name/path (a Whisper checkpoint's);
            replaces `audio_n_mels` and `audio_chunk_seconds` with its own.
        video_num_frames: frames per video (fewer are padded and masked, more sampled uniformly);
            frames go through the image transform.
        modality_options: modality -> options of its transform (`ModalitySpec.transform`), for any registered
            modality; an argument above `<modality>_<option>` is `modality_options[<modality>][<option>]`
            (`image_size` is the image transform's `size`), and an entry here overrides it.
        max_eval_samples_per_domain: cap each validation / test domain (first N samples).
        max_train_samples_per_domain: cap each training domain (its first N samples): smoke runs
            (the experiments' and benchmarks' `--quick`) and data-size studies; None: all of them.
        skip_bad_records: skip and count bad records instead of raising, and skip (and count) a
            training sample that fails to decode when drawn; all listed in `skipped_records.jsonl`
            in the run's log directory.
        max_turns_per_record / max_characters_per_record: a record with more turns, or more characters of
            text, is a bad record (`too_many_turns` / `too_many_characters`), so that one record cannot stall
            setup; None: no limit.
        duplicate_ids: `keep` records whose id an earlier record has, in the same split and domain or in
            another (counted in the data report: `duplicate_ids`, `duplicate_ids_across`; the same id in train
            and test is a leak), or `error`: such a record is a bad record (`duplicate_id`).
        defer_train_decoding: for train corpora too large to read at setup: their modality files
            are checked for existence and place only, not decoded, until a batch draws them.
            Evaluation splits are always decoded at setup.
        num_workers: DataLoader workers.
        seed: seed of the training sampler.
    """

    def __init__(
        self,
        domains: dict[str, DomainSpec] | None = None,
        root: str = "data/shapes",
        tokenizer: str = DEFAULT_TOKENIZER,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        sampling: str = "proportional",
        temperature: float = 2.0,
        samples_per_epoch: int | None = None,
        max_length: int = 128,
        image_size: int = 32,
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_processor: str | None = None,
        audio_n_mels: int = 80,
        audio_chunk_seconds: float = 30.0,
        audio_max_chunks: int = 4,
        audio_processor: str | None = None,
        video_num_frames: int = 8,
        modality_options: dict[str, dict[str, Any]] | None = None,
        max_eval_samples_per_domain: int | None = None,
        max_train_samples_per_domain: int | None = None,
        skip_bad_records: bool = False,
        defer_train_decoding: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        max_turns_per_record: int | None = MAX_TURNS,
        max_characters_per_record: int | None = MAX_CHARACTERS,
        duplicate_ids: str = "keep",
    ):
        super().__init__()
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if duplicate_ids not in DUPLICATE_ID_POLICIES:
            raise ValueError(f"duplicate_ids must be one of {DUPLICATE_ID_POLICIES}, got {duplicate_ids!r}")
        _check_at_least(1, batch_size=batch_size, eval_batch_size=eval_batch_size, max_length=max_length,
                        image_size=image_size, audio_n_mels=audio_n_mels, audio_max_chunks=audio_max_chunks,
                        video_num_frames=video_num_frames, samples_per_epoch=samples_per_epoch,
                        max_eval_samples_per_domain=max_eval_samples_per_domain,
                        max_train_samples_per_domain=max_train_samples_per_domain,
                        max_turns_per_record=max_turns_per_record, max_characters_per_record=max_characters_per_record)
        _check_at_least(0, num_workers=num_workers)
        for key, value in {"temperature": temperature, "audio_chunk_seconds": audio_chunk_seconds}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        self.root = resolve_data_path(root)
        if domains is None:
            domains = discover_domains(self.root)
        if not domains:
            raise ValueError("domains is empty")
        # Python callers may pass plain dicts; the CLI passes DomainSpec instances.
        self.domains = {name: _domain_spec(name, s) for name, s in domains.items()}
        self.save_hyperparameters(ignore=["domains"])
        self.hparams["domains"] = {name: asdict(s) for name, s in self.domains.items()}  # plain, YAML-friendly
        if sampling != "weighted" and any(s.weight != 1.0 for s in self.domains.values()):
            rank_zero_warn(f"domain weights are only used by sampling='weighted' (sampling={sampling!r})")

        self.tokenizer = load_tokenizer(tokenizer)
        self.transforms = build_transforms(self.transform_options())  # modality -> its transform
        self.datasets: dict[str, dict[str, LlavaDataset]] = {}  # split -> domain -> dataset
        self.data_report: dict[str, dict[str, dict]] = {}  # split -> domain -> DataReport.as_dict()
        self.skip_log = SkipLog()  # every skipped record (setup and loading), and the file listing them

    def transform_options(self) -> dict[str, dict[str, Any]]:
        """modality -> its transform's options: the `<modality>_<option>` arguments (`TRANSFORM_ARGUMENTS`), then
        `modality_options`."""
        options: dict[str, dict[str, Any]] = {}
        for key in TRANSFORM_ARGUMENTS:
            name, option = split_option(key)
            options.setdefault(name, {})[option] = self.hparams[key]
        for name, given in (self.hparams.modality_options or {}).items():
            options[name] = {**options.get(name, {}), **given}
        return options

    # ----- setup ---------------------------------------------------------------------------

    def eval_domains(self, stage: str) -> list[str]:
        """The domain of each evaluation dataloader_idx in `stage` (a Lightning stage or `trainer.state.stage`)."""
        if stage not in EVAL_SPLIT:
            raise ValueError(f"unknown stage {stage!r}; one of {sorted(EVAL_SPLIT)}")
        return [name for name, spec in self.domains.items() if getattr(spec, EVAL_SPLIT[stage])]

    def setup(self, stage: str) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # every rank calls setup, and `log_dir` may synchronise ranks: the folder is read here only
            self.skip_log.set_directory(trainer.log_dir, trainer.global_rank)
        for split in STAGE_SPLITS[stage]:
            if split not in self.datasets:
                self.datasets[split] = self._build_split(split)
                for name, dataset in self.datasets[split].items():
                    self.skip_log.add((r.as_dict() for r in dataset.report.skipped_records),
                                      split=split, domain=name, stage="setup")
        self._check_ids_across_datasets()
        self._print_report(stage)

    def _check_ids_across_datasets(self) -> None:
        """Count, per split and domain, the samples whose id a record of another split or domain has (the same id in
        train and test is a leak; an earlier split, in train/val/test order, or an earlier domain holds the first),
        in `data_report[split][domain]["duplicate_ids_across"]`; with `duplicate_ids: error` such a sample is a bad
        record (`duplicate_id`): skipped and counted under `skip_bad_records`, else setup stops naming both."""
        first_of: dict[str, tuple[str, str]] = {}  # id -> (split/domain, file:line) of its first sample
        for split in (s for s in SPLITS if s in self.datasets):
            for name, dataset in self.datasets[split].items():
                here, kept, across, skipped = f"{split}/{name}", [], 0, []
                for sample in dataset.samples:
                    record = sample[0] if isinstance(sample, tuple) else sample  # a preference pair: its chosen side
                    first = first_of.setdefault(record.id, (here, where(record.file, record.line, None).rstrip(":")))
                    if first[0] == here:  # a repeat inside one data set: its own `duplicate_ids` count
                        kept.append(sample)
                    elif self.hparams.duplicate_ids == "error":
                        error = BadRecordError(DUPLICATE_ID, record.file, record.line, record.id,
                                               f"the id of a record of {first[0]} ({first[1]}); ids must be unique "
                                               "across the data module's splits and domains (duplicate_ids: error)")
                        if not self.hparams.skip_bad_records:
                            raise error
                        skipped.append(SkippedRecord.from_error(error))
                    else:
                        kept.append(sample)
                        across += 1
                if skipped:
                    dataset.samples, dataset.report.kept = kept, len(kept)
                    dataset.report.skipped[DUPLICATE_ID] += len(skipped)
                    dataset.report.skipped_records.extend(skipped)
                    self.skip_log.add((r.as_dict() for r in skipped), split=split, domain=name, stage="setup")
                    if not kept:
                        raise DataError(f"domain {name!r} has no usable {split} samples: {self._why_empty(dataset)}")
                self.data_report[split][name] = {**dataset.report.as_dict(), "duplicate_ids_across": across}

    def dataset_class(self, split: str) -> type[LlavaDataset]:
        """The dataset class that reads a split's files (a subclass may read another record format)."""
        return LlavaDataset

    def _build_split(self, split: str) -> dict[str, LlavaDataset]:
        datasets = {}
        for name, spec in self.domains.items():
            files = getattr(spec, split)
            if not files:
                continue
            dataset = self.dataset_class(split)(
                [self.root / f for f in ([files] if isinstance(files, str) else files)],
                root=self.root,
                tokenizer=self.tokenizer,
                domain=name,
                max_length=self.hparams.max_length,
                transforms=self.transforms,
                skip_bad_records=self.hparams.skip_bad_records,
                max_samples=self.hparams[f"max_{'train' if split == 'train' else 'eval'}_samples_per_domain"],
                decode_media=not (split == "train" and self.hparams.defer_train_decoding),
                max_turns=self.hparams.max_turns_per_record,
                max_characters=self.hparams.max_characters_per_record,
                duplicate_ids=self.hparams.duplicate_ids,
            )
            self.data_report.setdefault(split, {})[name] = dataset.report.as_dict()
            if len(dataset) == 0:
                raise DataError(f"domain {name!r} has no usable {split} samples: {self._why_empty(dataset)}")
            datasets[name] = dataset
        if split == "train" and not datasets:
            raise DataError("no domain has a train split")
        return datasets

    def _why_empty(self, dataset: LlavaDataset) -> str:
        """Why a dataset kept no sample, in words: its files are empty, or what happened to each record."""
        r = dataset.report
        files = ", ".join(str(p) for p in dataset.paths)
        if r.records == 0:
            return f"its data files hold no records ({files})"
        skipped = sum(r.skipped.values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(r.skipped.items()))
        first = r.skipped_records[0] if r.skipped_records else None
        if skipped == r.records:
            return (f"all {r.records} records of {files} were skipped as bad ({reasons}); the first: "
                    f"{where(first.file, first.line, first.id)} {first.problem}")
        return (f"of {r.records} records of {files}, {skipped} were skipped as bad{f' ({reasons})' if reasons else ''}, "
                f"{r.no_answer_tokens} kept no answer token and {r.cut_placeholders} would have a placeholder cut "
                f"within max_length={self.hparams.max_length}")

    def _print_report(self, stage: str) -> None:
        lines = [f"data report ({getattr(stage, 'value', stage)}): split/domain: kept of records read, then what was skipped or truncated"]
        problems = []
        for split in STAGE_SPLITS[stage]:
            for name, dataset in self.datasets[split].items():
                r = dataset.report
                skipped = ", ".join(f"{k}={v}" for k, v in sorted(r.skipped.items())) or "0"
                lines.append(
                    f"  {split}/{name}: {r.kept} of {r.records}, skipped {skipped}, "
                    f"truncated {r.truncated}, no answer tokens left {r.no_answer_tokens}, "
                    f"placeholder cut {r.cut_placeholders}, duplicate ids {r.duplicate_ids}, ids of another "
                    f"split or domain {self.data_report[split][name]['duplicate_ids_across']}"
                    + "".join(f", {m} items cut to what the transform keeps {n}" for m, n in r.long_items.items() if n)
                )
                if r.skipped or r.truncated or r.no_answer_tokens or r.cut_placeholders:
                    problems.append(f"{split}/{name}")
                first_of_reason = {}
                for record in r.skipped_records:
                    first_of_reason.setdefault(record.reason, record)
                lines.extend(f"    e.g. {reason}: {where(rec.file, rec.line, rec.id)} {rec.problem}"
                             for reason, rec in sorted(first_of_reason.items()))
        if any(d.report.skipped_records for split in STAGE_SPLITS[stage] for d in self.datasets[split].values()):
            lines.append(f"  every skipped record (file, line, id, reason): {self._skip_file_note()}")
        rank_zero_info("\n".join(lines))
        if problems:
            rank_zero_warn(f"records were skipped or truncated in {', '.join(problems)} (see the data report)")
        shared = [f"{split}/{name}" for split in STAGE_SPLITS[stage] for name in self.datasets[split]
                  if self.data_report[split][name]["duplicate_ids_across"]]
        if shared:
            rank_zero_warn(f"records in {', '.join(shared)} have the id of a record of another split or domain (the "
                           "same sample in train and in val/test would be a leak; see the data report, or set "
                           "duplicate_ids: error)")

    def _skip_file_note(self) -> str:
        if self.skip_log.path is not None:
            return str(self.skip_log.path)
        return "no run directory (no trainer attached): see the DataModule's `skip_log.records`"

    # ----- samples that fail to decode while loading -------------------------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count and list the samples a loader skipped (`LlavaDataset.__getitem__`) and drop them from the batch."""
        skipped = batch.pop(SKIPPED_RECORDS, None) if isinstance(batch, dict) else None
        if skipped:
            trainer = getattr(self, "trainer", None)
            if trainer is None or trainer.training or trainer.state.stage is None:
                split = "train"
            else:
                split = EVAL_SPLIT.get(trainer.state.stage.value, "val")
            first = not self.skip_log.counts("loading")
            self.skip_log.add(skipped, split=split, stage="loading",
                              step=trainer.global_step if trainer is not None else None)
            if first:
                r = skipped[0]
                rank_zero_warn(
                    f"a {split} sample failed to decode and was replaced by the next one "
                    f"({where(r['file'], r['line'], r['id'])} {r['problem']}); "
                    f"each such sample is counted and listed in {self._skip_file_note()}"
                )
        return batch

    def teardown(self, stage: str) -> None:
        counts = self.skip_log.counts("loading")
        if counts:
            per_reason = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            rank_zero_info(f"samples skipped while loading, up to the end of {getattr(stage, 'value', stage)}: {per_reason}; "
                           f"listed in {self._skip_file_note()}")

    # ----- loaders -------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def domain_probabilities(self) -> dict[str, float]:
        """Probability of each training domain under the configured sampling (needs setup('fit'))."""
        sizes = {name: len(d) for name, d in self.datasets["train"].items()}
        weights = {name: self.domains[name].weight for name in sizes}
        return mixture_probabilities(sizes, weights, self.hparams.sampling, self.hparams.temperature)

    # False: every epoch draws with the same seed (a DataModule that builds a new loader per epoch, per task)
    reseed_sampler_every_epoch = True

    def train_sampler(self, dataset: ConcatDataset) -> ResumableSampler:
        """The training order: resumable mid-epoch and sharded over processes (data/sampler.py)."""
        num_samples = self.hparams.samples_per_epoch
        if self.hparams.sampling == "proportional" and num_samples is None:
            size = len(dataset)
            draw = partial(_permutation, size)  # a plain shuffle, as torch's RandomSampler draws it
        else:
            # per-sample weight p(domain) / size(domain): a domain is drawn with p(domain), then uniformly within.
            probabilities = self.domain_probabilities()
            weights = torch.cat(
                [torch.full((len(d),), probabilities[d.domain] / len(d), dtype=torch.double) for d in dataset.datasets]
            )
            size = num_samples or len(dataset)
            draw = partial(_weighted_draws, weights, size)  # as torch's WeightedRandomSampler draws them
        trainer = getattr(self, "trainer", None)  # the process group, once a Trainer is attached
        world, rank = getattr(trainer, "world_size", 1), getattr(trainer, "global_rank", 0)
        return ResumableSampler(draw, size, self.hparams.batch_size, seed=self.hparams.seed,
                                reseed_every_epoch=self.reseed_sampler_every_epoch, num_replicas=world, rank=rank)

    def _loader(self, dataset, batch_size: int, sampler: Sampler | None = None, collate=collate_batch) -> DataLoader:
        workers = self.hparams.num_workers
        # a training loader carries its position in the epoch into checkpoints (exact resume)
        loader_class = ResumableDataLoader if isinstance(sampler, ResumableSampler) else DataLoader
        # An evaluation loader draws its iterator's base seed from a generator of its own: from torch's global
        # one, each validation would move the stream that dropout and the router's noise draw from afterwards,
        # and a run's training would depend on how often (and whether) it validates.
        generator = None if sampler is not None else torch.Generator().manual_seed(self.hparams.seed)
        return loader_class(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,  # training order comes from the sampler; evaluation stays in file order
            collate_fn=partial(collate, pad_token_id=self.pad_token_id),
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = ConcatDataset(list(self.datasets["train"].values()))
        return self._loader(dataset, self.hparams.batch_size, self.train_sampler(dataset))

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        return [self._loader(d, self.hparams.eval_batch_size) for d in self.datasets[split].values()]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> list[DataLoader]:
        """The test split, one loader per domain (generation on held-out data)."""
        return self._eval_loaders("test")


def _permutation(size: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(size, generator=generator).tolist()


def _weighted_draws(weights: torch.Tensor, size: int, generator: torch.Generator) -> list[int]:
    return torch.multinomial(weights, size, replacement=True, generator=generator).tolist()
