"""Preference data (RLAIF-V style): a `chosen` and a `rejected` answer to one prompt and image.

A preference record is a LLaVA record whose `conversations` end with the (human) prompt, plus the
two answers:

    {"id", "image": "rel/path.png", "conversations": [{"from": "human", "value": "<image>\\nQ"}],
     "chosen": "yes", "rejected": "no"}

`chosen` / `rejected` are strings or single assistant turns (`{"from": "gpt", "value": ...}`).
Each answer is appended to the prompt and goes through the same reader, validation and chat
template as any LLaVA record (`LlavaDataset`), so bad pairs fail with the same errors naming the
file, line and record. Only the final answer is labelled (the shared prompt, earlier assistant
turns included, is masked), so the log-probabilities a preference loss sums are those of the
answer alone.

`collate_preference` stacks a batch of B pairs as ONE batch of 2B sequences, the B chosen first,
then the B rejected (`num_pairs` = B), so the policy and the reference each run one forward per
step. `PreferenceDataModule` trains on preference files and evaluates on ordinary LLaVA files
(generation, exact match, POPE), one loader per domain, as `DomainMixtureDataModule` does.
"""

from pathlib import Path

from torch.utils.data import ConcatDataset, DataLoader

from lightning_moe.data.conversation import ConversationTokenizer
from lightning_moe.data.datamodule import DomainMixtureDataModule
from lightning_moe.data.dataset import LlavaDataset, collate_batch
from lightning_moe.data.records import MALFORMED_RECORD, ROLES, BadRecordError
from lightning_moe.tokens import IGNORE_INDEX

PAIR_KEYS = ("chosen", "rejected")


def _answer_turn(value: object, key: str, bad) -> dict:
    """A preference answer (a string or one assistant turn) -> a LLaVA assistant turn."""
    if isinstance(value, str):
        value = {"from": "gpt", "value": value}
    if not isinstance(value, dict) or ROLES.get(value.get("from")) != "assistant" or not isinstance(value.get("value"), str):
        raise bad(f"'{key}' must be a string or one assistant turn {{'from': 'gpt', 'value': str}}, got {value!r}")
    if not value["value"].strip():
        raise bad(f"'{key}' is empty")
    return value


def split_preference_record(record: object, path: str | Path, line: int | None) -> tuple[dict, dict]:
    """A preference record -> (chosen, rejected) LLaVA records sharing the prompt and images."""
    if not isinstance(record, dict):
        raise BadRecordError(MALFORMED_RECORD, path, line, None, f"a record must be a JSON object, got {type(record).__name__}")
    record_id = str(record["id"]) if "id" in record else f"{Path(path).name}:{line}"

    def bad(problem: str) -> BadRecordError:
        return BadRecordError(MALFORMED_RECORD, path, line, record_id, problem)

    missing = [k for k in PAIR_KEYS if k not in record]
    if missing:
        raise bad(f"a preference record needs 'chosen' and 'rejected'; missing {missing}")
    prompt = record.get("conversations")
    if not isinstance(prompt, list) or not prompt:
        raise bad("'conversations' must be a non-empty list ending with the prompt")
    if not isinstance(prompt[-1], dict) or ROLES.get(prompt[-1].get("from")) != "user":
        raise bad("'conversations' must end with the human prompt that 'chosen' and 'rejected' answer")
    chosen, rejected = (_answer_turn(record[k], k, bad) for k in PAIR_KEYS)
    if chosen["value"].strip() == rejected["value"].strip():
        raise bad(f"'chosen' and 'rejected' are the same answer ({chosen['value']!r}): nothing to prefer")
    shared = {k: v for k, v in record.items() if k not in PAIR_KEYS}
    return ({**shared, "conversations": [*prompt, chosen]}, {**shared, "conversations": [*prompt, rejected]})


class PreferenceDataset(LlavaDataset):
    """One domain's preference pairs; each item is (chosen, rejected) sample dicts sharing the image.

    Takes `LlavaDataset`'s arguments. A pair is kept only if both answers are (a truncated-away
    answer is counted in the report as for any sample).
    """

    def _make_sample(self, record, path: Path, line: int | None, chat: ConversationTokenizer, decoded: set[Path]):
        if isinstance(record, BadRecordError):  # a malformed JSON line
            raise record
        pair = []
        for llava_record in split_preference_record(record, path, line):
            sample = super()._make_sample(llava_record, path, line, chat, decoded)
            if sample is None:
                return None
            # train on the final answer only: everything up to its generation prompt is shared context
            sample.labels[: len(sample.prompt_ids)] = IGNORE_INDEX
            pair.append(sample)
        return tuple(pair)

    def load_item(self, index: int) -> tuple[dict, dict]:
        chosen, rejected = self.samples[index]
        media = self.load_media(chosen)  # both answers are about the same images (audio, video)
        return self.item(chosen, media), self.item(rejected, media)


def collate_preference(pairs: list[tuple[dict, dict]], pad_token_id: int) -> dict:
    """B pairs -> one `collate_batch` batch of 2B sequences: rows [0, B) chosen, [B, 2B) rejected.

    `num_pairs` = B. Images follow the rows (chosen images first), matching the placeholders.
    """
    batch = collate_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_token_id)
    batch["num_pairs"] = len(pairs)
    return batch


class PreferenceDataModule(DomainMixtureDataModule):
    """`DomainMixtureDataModule` whose train files hold preference records (module docstring).

    Same arguments; each domain's `train` names preference files (e.g. the shipped
    `preference/<domain>/train.jsonl`), `val` / `test` ordinary LLaVA files, evaluated by
    generation. `batch_size` counts pairs, so a step sees 2 x batch_size sequences.
    """

    def dataset_class(self, split: str) -> type[LlavaDataset]:
        return PreferenceDataset if split == "train" else LlavaDataset

    def train_dataloader(self) -> DataLoader:
        dataset = ConcatDataset(list(self.datasets["train"].values()))
        return self._loader(dataset, self.hparams.batch_size, self.train_sampler(dataset), collate=collate_preference)
