"""Which encoders a model has: `EncoderConfig`, one per modality (`BackboneConfig.encoders`, `build_multimodal`),
built into towers and connectors by `build_encoders`; and the flat keys older configs and checkpoints hold
(`vision_tower`, `audio_tower`, `video_pooling`, ...), read by `encoders_from_flat`.

The towers themselves are defined with their modality (`lightning_moe/modalities/`: `image.py`'s `VisionTower`,
`audio.py`'s `AudioTower`), which also says how each is saved and rebuilt (`ModalitySpec.tower`). A modality
whose items another's encoder reads (video: the image tower and connector) names only its pooling here.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from ..modalities import modalities, modality
from .connectors import build_connector

__all__ = ["EncoderConfig", "default_encoders", "encoder_configs", "check_encoders", "build_encoders",
           "FLAT_KEYS", "encoders_from_flat", "pooling_record", "pooling_from_record", "describe_encoders"]


@dataclass
class EncoderConfig:
    """One modality's encoder and connector: the value of `BackboneConfig.encoders[<modality>]`. None fields
    take the modality's default (`ModalitySpec`)."""

    tower: str | None = None  # a preset name, or a Hugging Face name/path; None for a modality read by another's tower
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields for presets, kwargs for from_pretrained
    feature_layer: int | None = None  # the tower's hidden layer read (image: -2, LLaVA's penultimate)
    connector: str | None = None  # the connector kind (models/connectors.py; image: mlp2x_gelu, audio: query)
    connector_options: dict[str, Any] = field(default_factory=dict)  # e.g. the query connector's num_queries
    pooling: str | None = None  # items with slots (audio windows, video frames): "concat" or "mean" (video: mean)


def default_encoders() -> dict[str, EncoderConfig]:
    """What a backbone config that names no encoders builds: the tiny CLIP tower and LLaVA-1.5's projector."""
    return {"image": EncoderConfig(tower="tiny-clip", feature_layer=-2, connector="mlp2x_gelu")}


def encoder_configs(encoders: Mapping[str, EncoderConfig | Mapping[str, Any]]) -> dict[str, EncoderConfig]:
    """`encoders` with plain dicts (a Python caller's, a YAML file's) turned into `EncoderConfig`s, checked."""
    out = _as_encoder_configs(encoders)
    check_encoders(out)
    return out


def _as_encoder_configs(encoders: Mapping[str, EncoderConfig | Mapping[str, Any]]) -> dict[str, EncoderConfig]:
    if not isinstance(encoders, Mapping):
        raise TypeError(f"encoders must map each modality to its encoder (e.g. {{'image': {{'tower': 'tiny-clip'}}}}), "
                        f"got {encoders!r}")
    out = {}
    for name, config in encoders.items():
        if isinstance(config, Mapping):
            unknown = sorted(set(config) - {f.name for f in fields(EncoderConfig)})
            if unknown:
                raise ValueError(f"encoders.{name}: unknown keys {unknown}; an encoder has "
                                 f"{[f.name for f in fields(EncoderConfig)]}")
            config = EncoderConfig(**config)
        out[name] = config
    return out


def check_encoders(encoders: Mapping[str, EncoderConfig]) -> None:
    """Every modality registered, every tower named, every modality read by another's encoder with that encoder
    there and nothing of its own, every pooling one its modality allows; else a ValueError naming the key."""
    for name, config in encoders.items():
        spec = modality(name)
        if spec.encoder_of is not None:
            own = [f.name for f in fields(EncoderConfig) if f.name != "pooling" and getattr(config, f.name)]
            if own:
                raise ValueError(f"encoders.{name}: {name} items go through the {spec.encoder_of} encoder and "
                                 f"connector, so it takes no {own} (set them under encoders.{spec.encoder_of})")
            if spec.encoder_of not in encoders:
                raise ValueError(f"encoders.{name}: {name} items go through the {spec.encoder_of} encoder: "
                                 f"a model with {name} needs encoders.{spec.encoder_of}")
        elif not config.tower:
            raise ValueError(f"encoders.{name}: no tower named (a preset such as tiny-clip, or a Hugging Face "
                             "name or path)")
        if config.pooling is not None and config.pooling not in spec.pooling:
            allowed = f"one of {list(spec.pooling)}" if spec.pooling else "none (its items have no slots)"
            raise ValueError(f"encoders.{name}.pooling must be {allowed}, got {config.pooling!r}")


def build_encoders(encoders: Mapping[str, EncoderConfig], llm_hidden: int, trust_remote_code: bool = False,
                   allow_unsafe: bool = False) -> tuple[dict[str, nn.Module], dict[str, nn.Module], dict[str, str],
                                                        dict[str, dict[str, Any]], dict[str, str]]:
    """The towers, connectors, connector kinds, connector options and poolings of `encoders`, each keyed by
    modality in registration order (every tower built before the first connector: a fixed seed gives the same
    weights whatever the modalities); `encoders` as `encoder_configs` gives them (checked)."""
    present = [s for s in modalities() if s.name in encoders]
    towers: dict[str, nn.Module] = {}
    kinds: dict[str, str] = {}
    options: dict[str, dict[str, Any]] = {}
    pooling: dict[str, str] = {}
    for spec in present:
        config = encoders[spec.name]
        if spec.tower is not None:
            feature_layer = spec.feature_layer if config.feature_layer is None else config.feature_layer
            towers[spec.name] = spec.tower.build(config.tower, config.overrides, feature_layer=feature_layer,
                                                 trust_remote_code=trust_remote_code, allow_unsafe=allow_unsafe)
            kinds[spec.name] = config.connector or spec.connector
            options[spec.name] = dict(config.connector_options)
        if spec.pooling:
            pooling[spec.name] = config.pooling or spec.pooling[0]
    connectors = {m: build_connector(kinds[m], tower.hidden_size, llm_hidden, **options[m]) for m, tower in towers.items()}
    return towers, connectors, kinds, options, pooling


# ---------------------------------------------------------------------------- the flat form
# the flat backbone keys: key -> (modality, EncoderConfig field)
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "vision_tower": ("image", "tower"), "vision_overrides": ("image", "overrides"),
    "vision_feature_layer": ("image", "feature_layer"), "connector": ("image", "connector"),
    "audio_tower": ("audio", "tower"), "audio_overrides": ("audio", "overrides"),
    "audio_connector": ("audio", "connector"), "audio_connector_options": ("audio", "connector_options"),
    "video_pooling": ("video", "pooling"),
}
# the key whose None meant "no such modality", and what a modality it switched on had by default
_SWITCHES = {"image": "vision_tower", "audio": "audio_tower", "video": "video_pooling"}
_FLAT_DEFAULTS = {"image": default_encoders()["image"], "audio": EncoderConfig(connector="query"),
                  "video": EncoderConfig()}


def encoders_from_flat(flat: Mapping[str, Any],
                       encoders: Mapping[str, EncoderConfig | Mapping[str, Any]] | None = None) -> dict[str, EncoderConfig]:
    """`encoders` (default: `default_encoders()`) with the flat keys of `flat` (`FLAT_KEYS`) applied, as the flat
    form meant them: a key sets its field of its modality's entry, creating it with the old defaults when its
    switch (`vision_tower`, `audio_tower`, `video_pooling`) names one, and a switch set to None removes it. All
    the flat keys of an old config or checkpoint give exactly the encoders it built."""
    unknown = sorted(set(flat) - set(FLAT_KEYS))
    if unknown:
        raise ValueError(f"{unknown} are not keys of the flat backbone form ({list(FLAT_KEYS)})")
    given = default_encoders() if encoders is None else _as_encoder_configs(encoders)
    result = {m: copy.deepcopy(e) for m, e in given.items()}
    for name, switch in _SWITCHES.items():
        keys = [k for k, (m, _) in FLAT_KEYS.items() if m == name and k in flat]
        if switch in flat and flat[switch] is None:
            result.pop(name, None)
            continue
        if not keys or (name not in result and switch not in flat):
            continue  # options of a modality the flat form did not switch on had no effect
        entry = result.get(name) or copy.deepcopy(_FLAT_DEFAULTS[name])
        for key in keys:
            setattr(entry, FLAT_KEYS[key][1], copy.deepcopy(flat[key]))
        result[name] = entry
    return result


def pooling_record(pooling: Mapping[str, str]) -> dict[str, Any]:
    """A model's poolings as `multimodal_config.json` holds them: video's under `video_pooling` (None without
    video), where every record holds it, and any other modality's that is not its default under `pooling`
    (absent when there is none), so that a model of the shipped modalities has one record, and the expert
    stores exported from it one fingerprint, whichever version wrote them. `pooling_from_record` reads both back."""
    others = {m: p for m, p in pooling.items() if m != "video" and p != modality(m).pooling[0]}
    return {"video_pooling": pooling.get("video"), **({"pooling": others} if others else {})}


def pooling_from_record(record: Mapping[str, Any]) -> dict[str, str]:
    """The poolings a `multimodal_config.json` record names (`pooling_record`; a record without either key, written
    before video, names none); a modality not named has its default."""
    pooling = dict(record.get("pooling") or {})
    if record.get("video_pooling") is not None:
        pooling.setdefault("video", record["video_pooling"])
    return pooling


def describe_encoders(encoders: Mapping[str, EncoderConfig]) -> str:
    """`encoders` in YAML flow style with the fields that differ from an empty `EncoderConfig`, e.g.
    `{image: {tower: tiny-clip, feature_layer: -1, connector: mlp2x_gelu}}`."""
    empty = asdict(EncoderConfig())

    def flow(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
        return "null" if value is None else str(value)

    return flow({m: {k: v for k, v in asdict(e).items() if v != empty[k]} for m, e in encoders.items()})
