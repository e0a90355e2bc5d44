"""`LlavaDataset` (validated, pre-tokenized LLaVA records of one domain) and `collate_batch`.

All validation and tokenization happen in `LlavaDataset.__init__` (the DataModule builds the
datasets at setup), so bad records fail early, before any worker starts, and the counts of
skipped, truncated and answerless samples are known before training. Every modality item is
decoded in full there too, by its modality's decoder (`ModalitySpec.decode`: a header check such as
PIL's `verify()` passes a truncated JPEG or a corrupt zlib stream), unless `decode_media=False` defers
that for a corpus too large to read at setup. `__getitem__` only loads and transforms the media (images, audio clips,
video frames).

Loading is the costly part (a few thousand records a second), and an experiment or a test session builds the
same datasets run after run: `LlavaDataset` keeps what it loaded per process (`sample_cache_key`: the data
files' contents, the root, the tokenizer and the settings the samples depend on)
and a dataset built again with the same key takes its samples and a copy of its report from there. Media files
are not re-checked on a reuse; one that changed since is caught when drawn, as below. A subclass whose samples
depend on more extends the key, or returns None to load every time; `clear_sample_cache()` empties it.

A file that still fails to decode when drawn (decoding deferred, or the file changed since setup)
raises naming its record; under `skip_bad_records` the sample is skipped instead: the next sample
of the dataset that decodes takes its place (so batches keep their size and a resumed run draws
the same substitutes) and the skipped record rides in the item under `SKIPPED_RECORDS`, which
`collate_batch` gathers into the batch so that the main process counts it, whatever the workers.

A sample is a dict; `collate_batch` turns a list of them into the batch dict the models read:

    input_ids (B, T) long, right-padded     attention_mask (B, T)     labels (B, T), -100 but on assistant tokens
    prompt_input_ids (B, P) LEFT-padded     prompt_attention_mask (B, P)   (for generation)
    answers: list[str]   domain: list[str]   id: list[str]
    skipped_records: list[dict]   (only when a sample was skipped while loading; see above)

and for each registered modality (`lightning_moe/modalities/`, keys from its `ModalitySpec`):

    <values_key> (items_in_batch, ...)         its items through its transform, e.g. pixel_values (n, 3, H, W)
    <name>_<slots>_mask (items_in_batch, S)    for items with padded slots: True on real slots, e.g.
                                               audio_chunk_mask (n, C), video_frame_mask (n, F)
    <name>_counts (B,) long                    items of each sample

- Items are in placeholder order across the batch: sample 0's items in the order its placeholders of that
  modality appear in `input_ids`, then sample 1's, ... So item k of a modality fills the k-th placeholder of
  that modality in the row-major scan of `input_ids`.
- A sample without a modality contributes no items; a batch without any item of a modality has no values /
  mask key at all (its counts are all 0). Each placeholder is ONE token in `input_ids`; the model expands it
  into that item's features.
- S is fixed by the transform for every item, whatever the batch (audio: `AudioFeatures.max_chunks`, video:
  `VideoFrames.num_frames`), so an item's features do not depend on the batch it lands in (positions
  included), which generation relies on. The model keeps padded slots out of the LLM's attention.
"""

import copy
import hashlib
import os
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_moe.data.conversation import ConversationTokenizer, TemplateRejectedError
from lightning_moe.data.records import (
    CHAT_TEMPLATE_REJECTED,
    DUPLICATE_ID,
    MAX_CHARACTERS,
    MAX_TURNS,
    PLACEHOLDER_MISMATCH,
    BadRecordError,
    SkippedRecord,
    iter_llava_file,
    parse_record,
    unreadable_reason,
    where,
)
from lightning_moe.modalities import MediaItem, build_transforms, decode_errors, modalities
from lightning_moe.modalities import modality as modality_spec
from lightning_moe.tokens import IGNORE_INDEX

__all__ = ["LlavaDataset", "DataReport", "MediaDecodeError", "collate_batch", "load_media", "clear_sample_cache",
           "tokenizer_fingerprint", "SKIPPED_RECORDS"]

DUPLICATE_ID_POLICIES = ("keep", "error")
SKIPPED_RECORDS = "skipped_records"  # item / batch key: samples skipped while loading (SkippedRecord dicts + domain)


@dataclass
class DataReport:
    """What happened to the records of one dataset; nothing is dropped without being counted here."""

    records: int = 0  # records read (including bad ones)
    kept: int = 0  # samples in the dataset
    skipped: Counter = field(default_factory=Counter)  # bad-record reason -> count (skip_bad_records=True)
    truncated: int = 0  # kept samples cut to max_length (still with some answer tokens)
    no_answer_tokens: int = 0  # skipped (always): no assistant token left after truncation
    cut_placeholders: int = 0  # skipped (always): truncation would cut a modality placeholder off
    duplicate_ids: int = 0  # kept samples whose id an earlier record of the dataset has (`duplicate_ids: keep`)
    # modality -> kept items longer than its transform keeps (audio clips past max_chunks windows: their first
    # windows are used), for the modalities that measure it (`ModalitySpec.overflows`)
    long_items: Counter = field(default_factory=Counter)
    skipped_records: list[SkippedRecord] = field(default_factory=list)  # every skipped record, in file order

    def as_dict(self) -> dict:
        return {
            "records": self.records,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "truncated": self.truncated,
            "no_answer_tokens": self.no_answer_tokens,
            "cut_placeholders": self.cut_placeholders,
            "duplicate_ids": self.duplicate_ids,
            **{f"long_{s.name}": self.long_items[s.name] for s in modalities() if s.overflows is not None},
        }


@dataclass
class _Sample:
    id: str
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long
    prompt_ids: torch.Tensor  # (P,) long
    answer: str
    media: dict[str, list[MediaItem]]  # modality -> items in placeholder order (`ParsedRecord.files`)
    file: str  # the data file and line, to name the record if a file fails to decode later
    line: int | None


class LlavaDataset(Dataset):
    """One domain's LLaVA-format records, validated and tokenized eagerly.

    Args:
        paths: one or more `.json` / `.jsonl` files.
        root: directory that modality files (images, audio clips, video frames) resolve under (never outside it).
        tokenizer: a tokenizer from `load_tokenizer` (chat template, single-token placeholders).
        domain: name carried by every sample (per-domain metrics).
        max_length: longer conversations are truncated (and counted).
        transforms: modality -> its transform (`ModalitySpec.transform`), e.g. {"image": NormalizeImage(32)};
            a modality not named gets its spec's default (video's reads the image transform).
        skip_bad_records: skip and count bad records instead of raising; a sample that fails to
            decode when drawn is replaced by the next one that decodes (module docstring).
        max_samples: keep only the first `max_samples` good samples (evaluation subsets).
        decode_media: decode every modality file in full here (False: only check that it exists
            under the root, and leave decoding to `__getitem__`).
        max_turns / max_characters: a record with more turns, or more characters of text, is a bad record
            (`too_many_turns` / `too_many_characters`; records.py's generous defaults); None: no limit.
        duplicate_ids: `keep` a record whose id an earlier record of the dataset has (counted in the report's
            `duplicate_ids`), or make it a bad record (`error`: reason `duplicate_id`).
    """

    # Consecutive samples that may fail to decode while looking for a substitute: more means the
    # storage itself is gone (an unmounted image folder), which skipping would only hide.
    MAX_CONSECUTIVE_DECODE_FAILURES = 32

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        root: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        domain: str = "default",
        max_length: int = 2048,
        transforms: Mapping[str, Any] | None = None,
        skip_bad_records: bool = False,
        max_samples: int | None = None,
        decode_media: bool = True,
        max_turns: int | None = MAX_TURNS,
        max_characters: int | None = MAX_CHARACTERS,
        duplicate_ids: str = "keep",
    ):
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self.root = Path(root)
        self.domain = domain
        self.max_length = max_length
        self.transforms = build_transforms(given=transforms)
        self.skip_bad_records = skip_bad_records
        self.decode_media = decode_media
        if duplicate_ids not in DUPLICATE_ID_POLICIES:
            raise ValueError(f"duplicate_ids must be one of {DUPLICATE_ID_POLICIES}, got {duplicate_ids!r}")
        self.max_turns, self.max_characters, self.duplicate_ids = max_turns, max_characters, duplicate_ids
        self.report = DataReport()
        self.samples: list[_Sample] = []
        key = self.sample_cache_key(tokenizer, max_samples)
        if key is not None and key in _LOADED:
            _LOADED.move_to_end(key)
            samples, report = _LOADED[key]
            self.samples, self.report = list(samples), copy.deepcopy(report)
            return
        self._load(ConversationTokenizer(tokenizer), max_samples)
        self.report.kept = len(self.samples)
        if key is not None:
            _remember(key, self.samples, self.report)

    def sample_cache_key(self, tokenizer: PreTrainedTokenizerBase, max_samples: int | None) -> tuple | None:
        """What the loaded samples and report depend on (module docstring); None: do not reuse them."""
        try:
            if not all(p.is_file() for p in self.paths):
                return None  # missing, or a FIFO that reading would block on: loading says so, naming it
            if sum(os.path.getsize(p) for p in self.paths) > MAX_CACHED_FILE_BYTES:
                return None
            # the contents, not the modification times: a file rewritten within the clock's tick keeps its mtime
            files = tuple((os.path.realpath(p), hashlib.sha256(Path(p).read_bytes()).hexdigest()) for p in self.paths)
        except OSError:
            return None  # a missing file: loading says so, naming it
        # what the report's long items depend on; and the registered modalities: which record fields are read
        overflow = tuple(s.overflow_settings(self.transforms[s.name]) for s in modalities() if s.overflows is not None)
        settings = (self.max_length, self.skip_bad_records, self.decode_media, max_samples, overflow, modalities(),
                    self.max_turns, self.max_characters, self.duplicate_ids)
        return (type(self), files, os.path.abspath(self.root), os.path.realpath(self.root),
                tokenizer_fingerprint(tokenizer), settings)

    def _load(self, chat: ConversationTokenizer, max_samples: int | None) -> None:
        decoded: set[MediaItem] = set()  # items shared by several records are decoded once
        seen_ids: dict[str, str] = {}  # id -> where its first sample is
        for path in self.paths:
            for line, record in iter_llava_file(path):
                if max_samples is not None and len(self.samples) >= max_samples:
                    return
                self.report.records += 1
                try:
                    sample = self._make_sample(record, path, line, chat, decoded)
                    if sample is not None:
                        self._check_id(sample[0] if isinstance(sample, tuple) else sample, seen_ids)
                except BadRecordError as e:
                    if not self.skip_bad_records:
                        raise
                    self.report.skipped[e.reason] += 1
                    self.report.skipped_records.append(SkippedRecord.from_error(e))
                    continue
                if sample is not None:
                    self.samples.append(sample)

    def _check_id(self, sample: "_Sample", seen_ids: dict[str, str]) -> None:
        """Count a sample whose id an earlier sample has, or refuse it (`duplicate_ids`)."""
        first = seen_ids.get(sample.id)
        if first is None:
            seen_ids[sample.id] = where(sample.file, sample.line, None).rstrip(":")
            return
        if self.duplicate_ids == "error":
            raise BadRecordError(DUPLICATE_ID, sample.file, sample.line, sample.id,
                                 f"the id of an earlier record ({first}); ids must be unique (duplicate_ids: error)")
        self.report.duplicate_ids += 1

    def _make_sample(
        self, record: dict | BadRecordError, path: Path, line: int | None, chat: ConversationTokenizer,
        decoded: set[MediaItem],
    ) -> _Sample | None:
        if isinstance(record, BadRecordError):  # a malformed JSON line
            raise record
        parsed = parse_record(record, self.root, path, line, self.max_turns, self.max_characters)
        for modality, items in parsed.files.items() if self.decode_media else ():
            for file in items:
                if file in decoded:
                    continue
                try:
                    modality_spec(modality).decode(file)
                except decode_errors() as e:
                    raise BadRecordError(unreadable_reason(modality), path, line, parsed.id,
                                         f"unreadable {modality} {_name(modality, file)}: {e}") from e
                decoded.add(file)
        long_items: Counter = Counter()
        for modality_name, items in parsed.files.items():
            spec = modality_spec(modality_name)
            for file in items if spec.overflows is not None else ():
                try:
                    long_items[modality_name] += spec.overflows(file, self.transforms[modality_name])
                except decode_errors() as e:  # deferred decoding: the header is all that is read here
                    raise BadRecordError(unreadable_reason(modality_name), path, line, parsed.id,
                                         f"unreadable {modality_name} {file}: {e}") from e
        try:
            tokens = chat(parsed.messages, self.max_length)
        except TemplateRejectedError as e:
            raise BadRecordError(CHAT_TEMPLATE_REJECTED, path, line, parsed.id, str(e)) from e
        if tokens.num_trained == 0:
            # counted apart from bad records: the record is fine, max_length is too small for it.
            self.report.no_answer_tokens += 1
            return None
        # Training (input_ids) and generation (prompt_ids) both pair every item with one placeholder.
        for spec in modalities():
            modality, placeholder = spec.name, spec.placeholder
            n_items = len(parsed.files.get(modality, []))
            token_id = chat.tokenizer.convert_tokens_to_ids(placeholder)
            in_input, in_prompt = tokens.input_ids.count(token_id), tokens.prompt_ids.count(token_id)
            if tokens.truncated and in_input < n_items:
                # cutting an item off would leave its features unmatched; max_length is too small for it.
                self.report.cut_placeholders += 1
                return None
            if in_input != n_items or in_prompt != n_items:
                raise BadRecordError(
                    PLACEHOLDER_MISMATCH, path, line, parsed.id,
                    f"{n_items} {modality}(s) but {in_input} {placeholder} token(s), {in_prompt} before the last answer "
                    f"(a{'n' if modality[0] in 'aeiou' else ''} {modality} after the last assistant turn, or a "
                    "tokenizer not loaded with load_tokenizer)",
                )  # fmt: skip
        self.report.truncated += int(tokens.truncated)
        self.report.long_items.update(long_items)
        return _Sample(
            id=parsed.id,
            input_ids=torch.tensor(tokens.input_ids, dtype=torch.long),
            labels=torch.tensor(tokens.labels, dtype=torch.long),
            prompt_ids=torch.tensor(tokens.prompt_ids, dtype=torch.long),
            answer=tokens.answer,
            media=parsed.files,
            file=str(path),
            line=line,
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | tuple[dict, dict]:
        """`load_item(index)`; under `skip_bad_records` a sample that fails to decode is replaced (module docstring)."""
        skipped: list[dict] = []
        for attempt in range(min(len(self), self.MAX_CONSECUTIVE_DECODE_FAILURES)):
            try:
                item = self.load_item((index + attempt) % len(self))
            except BadRecordError as e:
                if not self.skip_bad_records:
                    raise
                skipped.append({**SkippedRecord.from_error(e).as_dict(), "domain": self.domain})
                continue
            if skipped:
                # a preference item is a (chosen, rejected) pair: the records ride on the chosen sample
                (item[0] if isinstance(item, tuple) else item)[SKIPPED_RECORDS] = skipped
            return item
        raise RuntimeError(
            f"{len(skipped)} consecutive samples of domain {self.domain!r} failed to decode from index {index} "
            f"(is the media storage still reachable?); the first: "
            f"{where(skipped[0]['file'], skipped[0]['line'], skipped[0]['id'])} {skipped[0]['problem']}"
        )

    def load_item(self, index: int) -> dict | tuple[dict, dict]:
        """The item of sample `index` with its media loaded; raises `BadRecordError` if a file fails to decode."""
        sample = self.samples[index]
        return self.item(sample, self.load_media(sample))

    def load_media(self, sample: _Sample) -> dict[str, torch.Tensor | None]:
        """`load_media` of the sample's items with this dataset's transforms; a failure names the record."""
        try:
            return load_media(sample.media, self.transforms)
        except MediaDecodeError as e:
            raise BadRecordError(unreadable_reason(e.modality), sample.file, sample.line, sample.id, str(e)) from e

    def item(self, sample: _Sample, media: dict[str, torch.Tensor | None]) -> dict:
        """The dict `collate_batch` reads, for a sample and its loaded media (`load_media`)."""
        return {
            "id": sample.id,
            "domain": self.domain,
            "input_ids": sample.input_ids,
            "labels": sample.labels,
            "prompt_ids": sample.prompt_ids,
            "answer": sample.answer,
            **media,  # pixel_values (n_images, 3, H, W) or None, audio_values + audio_chunk_mask, ...
        }


# sample_cache_key -> (samples, report) of the datasets this process loaded, least recently used first
_LOADED: OrderedDict[tuple, tuple[list[_Sample], DataReport]] = OrderedDict()
# enough for every shipped corpus; a larger one is not kept (holding it after its run would cost memory, and
# hashing its files time)
MAX_CACHED_SAMPLES = 100_000
MAX_CACHED_FILE_BYTES = 64 * 2**20


def _remember(key: tuple, samples: list[_Sample], report: DataReport) -> None:
    if len(samples) > MAX_CACHED_SAMPLES:
        return
    _LOADED[key] = (list(samples), copy.deepcopy(report))
    while sum(len(s) for s, _ in _LOADED.values()) > MAX_CACHED_SAMPLES:
        _LOADED.popitem(last=False)


def clear_sample_cache() -> None:
    """Forget the samples this process loaded (the next dataset built loads its files again)."""
    _LOADED.clear()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of what tokenization depends on: the vocabulary and rules (a fast tokenizer's whole JSON), the
    added tokens, the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    text = "\n".join([type(tokenizer).__name__, rules, repr(sorted(tokenizer.get_added_vocab().items())),
                      repr(tokenizer.special_tokens_map), str(tokenizer.chat_template)])
    return hashlib.sha256(text.encode()).hexdigest()


class MediaDecodeError(ValueError):
    """A modality item that fails to decode while loading; the message names the file."""

    def __init__(self, modality: str, item: MediaItem, error: Exception):
        self.modality = modality
        super().__init__(f"cannot decode {_name(modality, item)}: {error}")


def load_media(media: Mapping[str, list[MediaItem]], transforms: Mapping[str, Any]) -> dict[str, torch.Tensor | None]:
    """One sample's items (modality -> items in placeholder order) through their modality's transform
    (`transforms`, modality -> transform; only the modalities the sample has are read), under their batch keys:
    every registered modality's values (None when the sample lacks it) and, for items with slots, its mask; e.g.
    `pixel_values` (n_images, 3, H, W), `audio_values` (n_audio, C, n_mels, frames) with `audio_chunk_mask`
    (n_audio, C). For one sample these are the tensors `collate_batch` puts in its batch. Raises
    `MediaDecodeError` naming the first item that fails to decode.
    """
    loaded: dict[str, torch.Tensor | None] = {}
    for spec in modalities():
        values, masks = [], []
        for item in media.get(spec.name, []):
            try:
                out = spec.load(item, transforms[spec.name])
            except decode_errors() as e:
                raise MediaDecodeError(spec.name, item, e) from e
            if spec.mask_key:
                values.append(out[0])  # (S, ...)
                masks.append(out[1])  # (S,) bool
            else:
                values.append(out)
        loaded[spec.values_key] = torch.stack(values) if values else None
        if spec.mask_key:
            loaded[spec.mask_key] = torch.stack(masks) if masks else None
    return loaded


def _name(modality: str, item: MediaItem) -> str:
    """A file, or a frame sequence's first frame and its frame count, for messages."""
    if isinstance(item, tuple):
        return f"{modality} of {len(item)} frame(s) from {item[0]}" if item else f"{modality} of no frames"
    return str(item)


def _pad(sequences: list[torch.Tensor], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D tensors into (B, T) padded with `value` on the right (or left); also the 0/1 mask."""
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        cols = slice(length - len(s), length) if left else slice(0, len(s))
        out[i, cols] = s
        mask[i, cols] = 1
    return out, mask


def _pad_slots(values: torch.Tensor, width: int) -> torch.Tensor:
    """(items, slots, ...) zero-padded (False for a mask) to (items, width, ...)."""
    if values.shape[1] == width:
        return values
    pad = values.new_zeros(values.shape[0], width - values.shape[1], *values.shape[2:])
    return torch.cat([values, pad], dim=1)


def collate_batch(samples: list[dict], pad_token_id: int) -> dict:
    """Samples of `LlavaDataset` -> batch dict (see the module docstring for keys and shapes)."""
    input_ids, attention_mask = _pad([s["input_ids"] for s in samples], pad_token_id)
    labels, _ = _pad([s["labels"] for s in samples], IGNORE_INDEX)
    # left padding: generation appends to the right end of every prompt at once.
    prompt_input_ids, prompt_attention_mask = _pad([s["prompt_ids"] for s in samples], pad_token_id, left=True)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_input_ids": prompt_input_ids,
        "prompt_attention_mask": prompt_attention_mask,
        "answers": [s["answer"] for s in samples],
        "domain": [s["domain"] for s in samples],
        "id": [s["id"] for s in samples],
    }
    for spec in modalities():
        key, mask_key = spec.values_key, spec.mask_key
        present = [s for s in samples if s.get(key) is not None]
        batch[spec.counts_key] = torch.tensor([0 if s.get(key) is None else len(s[key]) for s in samples],
                                              dtype=torch.long)
        if not present:
            continue
        if mask_key is None:
            batch[key] = torch.cat([s[key] for s in present])  # (items_in_batch, ...), e.g. (n, 3, H, W)
            continue
        # items of one DataModule share their slot count already; a mixed list is padded to the widest (mask False)
        width = max(s[key].shape[1] for s in present)
        batch[key] = torch.cat([_pad_slots(s[key], width) for s in present])  # (items, slots, ...)
        batch[mask_key] = torch.cat([_pad_slots(s[mask_key], width) for s in present])  # (items, slots) bool
    skipped = [record for s in samples for record in s.get(SKIPPED_RECORDS, ())]
    if skipped:
        batch[SKIPPED_RECORDS] = skipped  # counted by the DataModule in the main process
    return batch
