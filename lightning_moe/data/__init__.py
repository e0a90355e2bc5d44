"""Data layer: LLaVA-format records -> validated, tokenized samples -> batches, mixed over domains.

Never imports the model or method packages; what it shares with the models is the tokenizer
(`lightning_moe.tokens`) and the modality registry (`lightning_moe.modalities`: each modality's
placeholder, batch keys, decoder and transform).
"""

from lightning_moe.data.conversation import ChatTemplateError, ConversationTokenizer, TokenizedConversation
from lightning_moe.data.continual import ContinualDataModule, TaskSpec
from lightning_moe.data.datamodule import SAMPLING_MODES, DomainMixtureDataModule, DomainSpec, mixture_probabilities
from lightning_moe.data.dataset import DataReport, LlavaDataset, MediaDecodeError, collate_batch, load_media
from lightning_moe.data.preference import PreferenceDataModule, PreferenceDataset, collate_preference
from lightning_moe.data.records import (BadRecordError, DataError, Message, SkippedRecord, parse_record,
                                        prompt_record, read_llava_records)
from lightning_moe.tokens import DEFAULT_TOKENIZER, load_tokenizer, placeholder_token_ids

__all__ = [
    "BadRecordError",
    "ChatTemplateError",
    "ContinualDataModule",
    "ConversationTokenizer",
    "DataError",
    "DataReport",
    "DEFAULT_TOKENIZER",
    "DomainMixtureDataModule",
    "DomainSpec",
    "LlavaDataset",
    "MediaDecodeError",
    "Message",
    "SAMPLING_MODES",
    "SkippedRecord",
    "TaskSpec",
    "TokenizedConversation",
    "collate_batch",
    "load_media",
    "load_tokenizer",
    "mixture_probabilities",
    "parse_record",
    "prompt_record",
    "PreferenceDataModule",
    "PreferenceDataset",
    "collate_preference",
    "placeholder_token_ids",
    "read_llava_records",
]
