"""`MultimodalLM`: modality encoders + connectors + any Hugging Face causal LM.

Data flow (docs/architecture.md): each placeholder token in `input_ids` (one per image, audio clip,
video, or item of any registered modality) is replaced by the N projected features of its item, so a
(B, T) batch becomes (B, T') input embeddings with labels -100 on the features. The LLM then runs
unchanged; sparse layers inside it (after surgery) record their routing for the method's losses.

Modalities (`lightning_moe/modalities/`, Uni-MoE for audio and video): the model reads the modalities
it has a placeholder id for. Each has an encoder and a connector, or reads through another's
(`ModalitySpec.encoder_of`: video frames go through the image encoder and connector). Items with
padded slots (audio windows, video frames) encode only their real slots, combined by the modality's
`pooling` ("concat": every slot's tokens in order; "mean": the slots' encoder features averaged, then
projected once, the reference for video), and the features of padded ones are masked out of the
LLM's attention. `last_token_modality` keeps, after each `embed`, which modality every position of
the spliced sequence came from (routing statistics per modality).

`save_pretrained` writes `multimodal_config.json` (every sub-config, each tower's record as its
modality writes it, the connector kinds, the poolings, the placeholder ids and the surgery log) and
`model.safetensors`; `from_pretrained` rebuilds the modules, replays the surgery and loads the
weights, so a stage's output is the next stage's input.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..gguf_files import transformers_source
from ..modalities import from_pretrained_overrides, modalities, modality_names, preset_config
from ..modalities import modality as modality_spec
from ..safe_load import hf_load_kwargs, hf_source
from ..tokens import IGNORE_INDEX
from .checkpoint import replay_surgery
from .connectors import build_connector
from .encoders import (EncoderConfig, build_encoders, default_encoders, encoder_configs, pooling_from_record,
                       pooling_record)
from .architecture import moe_family
from .native_moe import convert_native_moe
from .presets import LLM_PRESETS

CONFIG_NAME = "multimodal_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MultimodalOutput:
    logits: torch.Tensor  # (B, T', V), or (B, K, V) at `positions`
    labels: torch.Tensor | None  # aligned with logits (not shifted), IGNORE_INDEX where untrained
    attention_mask: torch.Tensor  # (B, T'): 1 on real tokens, also what routing losses use as padding mask
    # (K,) the positions of the spliced sequence that logits and labels hold (`loss_positions`); None: all T'
    positions: torch.Tensor | None = None


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(K,) positions of (B, T') labels whose logits a next-token loss reads: those predicting a trained label in
    some sample, and the position after each. Held in order, consecutive positions still pair logits with the
    next label: where they skip positions, the label they end at is untrained in every sample, so the loss is
    the full sequence's. When only the answers train, K is a small part of T' and the LM head, over the whole
    vocabulary, runs on those positions only."""
    predicts = (labels[:, 1:] != IGNORE_INDEX).any(0)  # (T' - 1,)
    keep = torch.nn.functional.pad(predicts, (0, 1)) | torch.nn.functional.pad(predicts, (1, 0))
    return keep.nonzero()[:, 0]


@lru_cache(maxsize=None)
def keeps_chosen_logits(llm_class: type) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (transformers' models do; a custom one may not)."""
    return "logits_to_keep" in inspect.signature(llm_class.forward).parameters


class MultimodalLM(nn.Module):
    def __init__(
        self,
        llm: PreTrainedModel,
        encoders: dict[str, nn.Module] | None = None,
        connectors: dict[str, nn.Module] | None = None,
        connector_kinds: dict[str, str] | None = None,
        placeholder_ids: dict[str, int] | None = None,
        connector_options: dict[str, dict[str, Any]] | None = None,
        pooling: dict[str, str] | None = None,
    ):
        """encoders / connectors: modality -> its tower / connector (the same keys). placeholder_ids: modality ->
        its token id, for every modality the model reads (those with an encoder, and those read through another's,
        e.g. video). pooling: modality -> "concat" | "mean", for modalities whose items have slots (default: the
        modality's own)."""
        super().__init__()
        self.llm = llm
        self.encoders = nn.ModuleDict(encoders or {})
        self.connectors = nn.ModuleDict(connectors or {})
        if set(self.encoders) != set(self.connectors):
            raise ValueError(f"encoders {sorted(self.encoders)} and connectors {sorted(self.connectors)} differ")
        self.connector_kinds = dict(connector_kinds or {})
        self.connector_options = {m: dict(o) for m, o in (connector_options or {}).items()}
        self.placeholder_ids = dict(placeholder_ids or {})
        pooling = dict(pooling or {})
        missing = (set(self.encoders) | set(pooling)) - set(self.placeholder_ids)
        if missing:
            raise ValueError(f"no placeholder token id for modalities {sorted(missing)}")
        self.pooling: dict[str, str] = {}
        for name in self.placeholder_ids:
            spec = modality_spec(name)
            source = spec.encoder_modality()
            if source not in self.encoders:
                raise ValueError(f"{name} items go through the {source} encoder: a model that reads {name} needs a "
                                 f"{source} tower")
            if spec.pooling:
                self.pooling[name] = pooling.pop(name, spec.pooling[0])
                if self.pooling[name] not in spec.pooling:
                    raise ValueError(f"{name} pooling must be one of {list(spec.pooling)}, got {self.pooling[name]!r}")
        if pooling:
            raise ValueError(f"pooling given for {sorted(pooling)}, whose items have no slots")
        # (B, T') index into the registry's modality order (`lightning_moe.modalities.modality_names()`), -1 on text
        self.last_token_modality: torch.Tensor | None = None
        # Ordered record of in-place rewrites (models/checkpoint.py), replayed by from_pretrained.
        self.surgery: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ forward
    @property
    def modalities(self) -> list[str]:
        """The modalities this model reads, in registration order."""
        return [m for m in modality_names() if m in self.placeholder_ids]

    def _encoder_features(self, modality: str, values: torch.Tensor) -> torch.Tensor:
        encoder = self.encoders[modality]
        frozen = not any(p.requires_grad for p in encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return encoder(values)

    def _connect(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        connector = self.connectors[modality]
        return connector(features.to(next(connector.parameters()).dtype))

    def encode(self, modality: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(items, ...) raw inputs -> (items, N, llm_hidden) projected features (`encode_items` also gives their mask)."""
        return self.encode_items(modality, values, mask)[0]

    def encode_items(self, modality: str, values: torch.Tensor,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw inputs of `items` items -> ((items, N, llm_hidden) projected features, (items, N) bool mask or None).

        Items without slots (image (items, 3, H, W)): one encoder pass each, N = the connector's tokens. Items
        with slots and a (items, S) slot mask (audio (items, C, n_mels, frames): windows; video (items, F, 3,
        H, W): frames, through the image tower): each real slot encoded, then "concat" keeps each slot's
        connector tokens in order (N = S x tokens per slot) and "mean" averages the slots' encoder features over
        the real ones before one projection (N = tokens per slot). Padded slots are never encoded; their
        features are zeros and masked.
        """
        if modality not in self.placeholder_ids:
            raise ValueError(f"this model reads no {modality} (it reads {', '.join(self.modalities) or 'text only'})")
        spec = modality_spec(modality)
        source = spec.encoder_modality()
        if not spec.slots:  # one encoder pass per item
            return self._connect(source, self._encoder_features(source, values)), None
        items, slots = values.shape[:2]
        if mask is None:
            mask = torch.ones(items, slots, dtype=torch.bool, device=values.device)
        mask = mask.to(device=values.device, dtype=torch.bool)
        keep = mask.reshape(-1)  # (items * slots,)
        encoded = self._encoder_features(source, values.flatten(0, 1)[keep])  # (kept, S, De)
        if self.pooling[modality] == "mean":
            # the features averaged over the real slots, then projected once (the video reference)
            full = encoded.new_zeros(items * slots, *encoded.shape[1:]).index_put((keep.nonzero()[:, 0],), encoded)
            weight = mask.to(encoded.dtype)[:, :, None, None]  # (items, S, 1, 1)
            pooled = (full.view(items, slots, *encoded.shape[1:]) * weight).sum(1) / weight.sum(1).clamp(min=1)
            return self._connect(source, pooled), mask.any(1, keepdim=True).expand(-1, pooled.shape[1])
        projected = self._connect(source, encoded)  # (kept, N_slot, D)
        n_slot = projected.shape[1]
        full = projected.new_zeros(items * slots, n_slot, projected.shape[-1])
        full = full.index_put((keep.nonzero()[:, 0],), projected)
        return full.view(items, slots * n_slot, -1), mask.repeat_interleave(n_slot, dim=1)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
        **modality_inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Splice modality features into the token embeddings at their placeholders."""
        embed_tokens = self.llm.get_input_embeddings()
        # placeholder id -> ((items, N, D) features, (items, N) mask or None, modality index)
        features: dict[int, tuple[torch.Tensor, torch.Tensor | None, int]] = {}
        names = modality_names()
        for modality in self.modalities:
            spec = modality_spec(modality)
            values = modality_inputs.get(spec.values_key)
            if values is not None and values.shape[0] > 0:
                mask = modality_inputs.get(spec.mask_key) if spec.mask_key else None
                feats, feat_mask = self.encode_items(modality, values, mask)
                features[self.placeholder_ids[modality]] = (feats, feat_mask, names.index(modality))
        is_placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
        for modality, token_id in self.placeholder_ids.items():
            is_placeholder |= input_ids == token_id
        if not features:
            if is_placeholder.any():
                raise ValueError("the batch has placeholder tokens but no modality inputs")
            self.last_token_modality = torch.full_like(input_ids, -1)
            return embed_tokens(input_ids), attention_mask, labels

        batch, length = input_ids.shape
        # Each token occupies one slot, each placeholder N slots; `starts` is each token's first slot.
        slots = torch.ones_like(input_ids)
        for token_id, (feats, _, _) in features.items():
            slots = torch.where(input_ids == token_id, feats.shape[1], slots)
        totals = slots.sum(1)  # (B,)
        # the spliced length depends on the data (items per sample): under torch.compile the one graph break
        new_length = int(totals.max())
        # right padding: samples end early; left padding (generation): samples end together
        offsets = (new_length - totals) if padding_side == "left" else torch.zeros_like(totals)
        starts = slots.cumsum(1) - slots + offsets[:, None]  # (B, T)

        # Which token fills each output slot, found without data-dependent shapes (no nonzero: torch.compile
        # traces it): mark t + 1 at token t's first slot, carry it forward (cummax), then keep the slots that lie
        # inside that token's span (not the padding before the first or after the last token).
        positions = torch.arange(new_length, device=input_ids.device)
        marks = torch.zeros(batch, new_length, dtype=torch.long, device=input_ids.device)
        marks = marks.scatter(1, starts, torch.arange(1, length + 1, device=input_ids.device).expand(batch, -1))
        token = marks.cummax(1).values - 1  # (B, T') source token of each slot, -1 before the first
        source = token.clamp(min=0)
        inside = (token >= 0) & (positions < starts.gather(1, source) + slots.gather(1, source))  # (B, T')
        source_ids = input_ids.gather(1, source)  # (B, T')
        text = inside & ~is_placeholder.gather(1, source)  # (B, T') slots of text tokens

        text_embeds = embed_tokens(input_ids.masked_fill(is_placeholder, 0))
        spread = text_embeds.gather(1, source[..., None].expand(-1, -1, text_embeds.shape[-1]))  # (B, T', D)
        out = torch.where(text[..., None], spread, 0)
        source_mask = attention_mask.gather(1, source)
        out_mask = torch.where(text, source_mask, 0)
        out_labels = None if labels is None else torch.where(text, labels.gather(1, source), IGNORE_INDEX)
        out_modality = input_ids.new_full((batch, new_length), -1)
        for token_id, (feats, feat_mask, modality_index) in features.items():
            self._check_items(input_ids == token_id, feats.shape[0], token_id)
            filled = inside & (source_ids == token_id)  # (B, T'): row-major = item after item, N slots each
            out = out.masked_scatter(filled[..., None], feats.to(out.dtype))
            item_mask = source_mask
            if feat_mask is not None:  # padded slots (audio windows, video frames) stay out of attention
                item_mask = item_mask * torch.zeros_like(item_mask).masked_scatter(filled, feat_mask.to(item_mask.dtype))
            out_mask = torch.where(filled, item_mask, out_mask)
            out_modality = out_modality.masked_fill(filled, modality_index)
        self.last_token_modality = out_modality
        return out, out_mask, out_labels

    @staticmethod
    def _check_items(is_token: torch.Tensor, items: int, token_id: int) -> None:
        """One placeholder token per item: a ValueError when they differ (under torch.compile, an assertion in
        the graph, since a Python `if` on a tensor would break it)."""
        count = is_token.sum()
        if torch.compiler.is_compiling():
            torch._assert_async(count == items, "placeholder tokens and items to fill them differ")
        elif int(count) != items:
            raise ValueError(f"{int(count)} placeholder tokens (id {token_id}) in the batch but {items} items to fill them")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        loss_logits_only: bool = False,
        **modality_inputs: torch.Tensor,
    ) -> MultimodalOutput:
        """loss_logits_only: with `labels`, logits (and labels) only at the positions a next-token loss on them
        reads (`loss_positions`, the output's `positions`); the loss is the same. All positions where the LLM's
        forward cannot choose (no `logits_to_keep`) or under torch.compile (the count depends on the data)."""
        embeds, mask, labels = self.embed(input_ids, attention_mask, labels, **modality_inputs)
        positions, chosen = None, {}
        if (loss_logits_only and labels is not None and keeps_chosen_logits(type(self.llm))
                and not torch.compiler.is_compiling()):
            positions = loss_positions(labels)
            labels, chosen = labels[:, positions], {"logits_to_keep": positions}
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **chosen)
        return MultimodalOutput(logits=out.logits, labels=labels, attention_mask=mask, positions=positions)

    @torch.no_grad()
    def generate(
        self,
        prompt_input_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        max_new_tokens: int = 16,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy (default) or sampled continuation of LEFT-padded prompts -> (B, new tokens)."""
        keys = {k for s in modalities() for k in (s.values_key, s.mask_key) if k}
        modality_inputs = {k: kwargs.pop(k) for k in list(kwargs) if k in keys}
        embeds, mask, _ = self.embed(prompt_input_ids, prompt_attention_mask, padding_side="left", **modality_inputs)
        kwargs.setdefault("do_sample", False)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict[str, Any]:
        return {
            "llm": self.llm.config.to_dict(),
            # each tower's record as its modality writes it (`Tower.to_config`)
            "encoders": {m: modality_spec(m).tower.to_config(enc) for m, enc in self.encoders.items()},
            "connectors": {
                m: {"kind": self.connector_kinds[m], "in_dim": self.encoders[m].hidden_size,
                    "out_dim": self.llm.config.hidden_size, "options": self.connector_options.get(m, {})}
                for m in self.connectors
            },
            **pooling_record(self.pooling),
            "placeholder_ids": self.placeholder_ids,
            "surgery": self.surgery,
        }

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], source: str | Path | None = None) -> "MultimodalLM":
        """Fresh (randomly initialised) modules of the recorded shapes, with the surgery replayed. `source`: the
        file the record came from, named in the error a record this process cannot rebuild raises."""
        try:
            for m in config["encoders"]:
                spec = modality_spec(m)
                if spec.tower is None:
                    raise ValueError(f"the record has an encoder under {m!r}, a modality without a tower of its "
                                     f"own (its items go through the {spec.encoder_of} encoder, recorded under "
                                     f"{spec.encoder_of!r})")
            llm_config = AutoConfig.for_model(**config["llm"])
            llm = AutoModelForCausalLM.from_config(llm_config)
            # each tower is rebuilt by its modality (the record's key); older records have no connector options
            encoders = {m: modality_spec(m).tower.from_config(e) for m, e in config["encoders"].items()}
            options = {m: c.get("options", {}) for m, c in config["connectors"].items()}
            connectors = {m: build_connector(c["kind"], c["in_dim"], c["out_dim"], **options[m])
                          for m, c in config["connectors"].items()}
            model = cls(llm, encoders, connectors, {m: c["kind"] for m, c in config["connectors"].items()},
                        config["placeholder_ids"], options, pooling_from_record(config))
            replay_surgery(model, config["surgery"])
        except ValueError as error:
            if source is None:
                raise
            raise ValueError(f"{source}: {error}") from error
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2, default=str))
        save_model(self, str(directory / WEIGHTS_NAME))  # handles tied embeddings

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "MultimodalLM":
        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} not found: not a MultimodalLM directory (write one with save_pretrained)"
            )
        # built with its random initialisation, though the load overwrites every weight: a seeded run draws its
        # new routers and adapters from the random stream after the load, and building on the meta device
        # (models/meta.py, which the transformers export uses) would move that stream and every seeded result
        model = cls.from_config_dict(json.loads(config_file.read_text()), config_file)
        missing, unexpected = load_model(model, str(directory / WEIGHTS_NAME), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{directory / WEIGHTS_NAME} does not match the recorded model: "
                               f"missing {sorted(missing)[:5]}..., unexpected {sorted(unexpected)[:5]}...")
        return model


def batch_inputs(batch: dict[str, Any], prompt: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors from a collated batch (training sequence, or the left-padded generation prompt)."""
    ids, mask = ("prompt_input_ids", "prompt_attention_mask") if prompt else ("input_ids", "attention_mask")
    inputs = {"input_ids": batch[ids], "attention_mask": batch[mask]}
    inputs.update({k: batch[k] for s in modalities() for k in (s.values_key, s.mask_key) if k and k in batch})
    return inputs


def build_llm(name_or_path: str, tokenizer: PreTrainedTokenizerBase, overrides: dict[str, Any] | None = None,
              torch_dtype: str | None = None, trust_remote_code: bool = False,
              allow_unsafe: bool = False, allow_missing_weights: bool = False) -> PreTrainedModel:
    """A preset name builds a fresh tiny LLM sized to the tokenizer; anything else loads with from_pretrained
    (safetensors only and no repository code, unless `allow_unsafe` / `trust_remote_code` say otherwise).
    A GGUF file or packaged name loads its converted directory (`gguf_files.transformers_source`).

    An override the config has no field of is a ValueError naming the nearest field. A checkpoint whose
    weights lack some of the model's tensors (which transformers would initialise randomly, with a load
    report only) is a ValueError naming them, unless `allow_missing_weights`."""
    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if name_or_path in LLM_PRESETS:
        llm = AutoModelForCausalLM.from_config(preset_config(LLM_PRESETS, name_or_path, {**special, **(overrides or {})},
                                                             "llm_overrides"))
    else:
        if (Path(name_or_path) / CONFIG_NAME).is_file():
            raise ValueError(f"{name_or_path} is a lightning-moe save_pretrained directory ({CONFIG_NAME}), not a "
                             "transformers model: name it as backbone.pretrained, or export it to transformers with "
                             "python -m lightning_moe.export")
        name_or_path = transformers_source(name_or_path)
        dtype = getattr(torch, torch_dtype) if torch_dtype else None
        load_kwargs = hf_load_kwargs(trust_remote_code, allow_unsafe)
        with hf_source("LLM", name_or_path, allow_unsafe, trust_remote_code):
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            with from_pretrained_overrides(config, overrides, f"llm_overrides of {name_or_path}"):
                llm, loading = AutoModelForCausalLM.from_pretrained(
                    name_or_path, dtype=dtype, output_loading_info=True, **load_kwargs, **(overrides or {}))
        missing = sorted(loading["missing_keys"])
        if missing and not allow_missing_weights:
            files = sorted(p.name for p in Path(name_or_path).glob("*.safetensors"))
            where = f"{name_or_path} ({', '.join(files)})" if files else name_or_path
            raise ValueError(f"LLM {where}: its weights lack "
                             f"{len(missing)} of the model's {len(llm.state_dict())} tensors (e.g. "
                             f"{', '.join(missing[:5])}), which would train from random initialisation; point to "
                             "the complete checkpoint, or set backbone.allow_missing_weights: true to start those from random weights")
        if llm.get_input_embeddings().num_embeddings < len(tokenizer):  # placeholders were added
            llm.resize_token_embeddings(len(tokenizer))
    llm.generation_config.pad_token_id = tokenizer.pad_token_id
    llm.generation_config.eos_token_id = tokenizer.eos_token_id
    return llm


def build_multimodal(
    tokenizer: PreTrainedTokenizerBase,
    llm: str = "tiny-llama",
    llm_overrides: dict[str, Any] | None = None,
    encoders: Mapping[str, EncoderConfig | Mapping[str, Any]] | None = None,
    *,
    torch_dtype: str | None = None,
    trust_remote_code: bool = False,
    allow_unsafe: bool = False,
    allow_missing_weights: bool = False,
) -> MultimodalLM:
    """The LLM and, for each modality of `encoders` (modality -> `EncoderConfig` or a dict of its fields, as
    `BackboneConfig.encoders` holds them), its tower and connector, or the encoder it reads through (video: the
    image tower). None: `default_encoders()` (the tiny CLIP tower); {}: a text-only model. allow_missing_weights:
    see `build_llm`."""
    encoders = default_encoders() if encoders is None else encoder_configs(encoders)
    language_model = build_llm(llm, tokenizer, llm_overrides, torch_dtype, trust_remote_code, allow_unsafe,
                               allow_missing_weights)
    towers, connectors, kinds, options, pooling = build_encoders(encoders, language_model.config.hidden_size,
                                                                 trust_remote_code, allow_unsafe)
    placeholder_ids = {}
    for spec in modalities():
        if spec.name not in encoders:
            continue
        placeholder_ids[spec.name] = tokenizer.convert_tokens_to_ids(spec.placeholder)
        if placeholder_ids[spec.name] in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer has no {spec.placeholder!r} token (load it with load_tokenizer)")
    model = MultimodalLM(language_model, towers, connectors, kinds, placeholder_ids, options, pooling=pooling)
    if moe_family(language_model) is not None:  # a native MoE LLM is a sparse model here
        convert_native_moe(model)
    if torch_dtype:
        model.to(getattr(torch, torch_dtype))
    return model
