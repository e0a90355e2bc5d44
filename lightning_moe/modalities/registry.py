"""The modality registry: a modality's name -> `ModalitySpec` (its placeholder token, batch keys, record items,
decoder, transform, encoder tower, connector and pooling).

`data/`, `models/`, `tokens.py` and `edge.py` read modalities only through this registry, so a new modality is
one file that calls `register_modality` (`video.py` is the smallest: its frames go through the image tower);
nothing else in the package changes (docs/architecture.md). The order of registration is the order of the
placeholder tokens `load_tokenizer` adds and of the modality indices of `MultimodalLM.last_token_modality`: the
shipped image, audio and video come first, always (`lightning_moe/modalities/__init__.py`).

This package lies below `data/` and `models/`, so both may import it: it imports neither, nor Lightning.
"""

from __future__ import annotations

import difflib
import inspect
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn
from transformers import PretrainedConfig

__all__ = ["MediaItem", "Tower", "ModalitySpec", "register_modality", "unregister_modality", "modality",
           "modalities", "modality_names", "split_option", "frame_files", "decode_errors", "build_transforms",
           "preset_config", "unknown_override", "from_pretrained_overrides", "POOLINGS"]

MediaItem = Path | tuple[Path, ...]  # what one placeholder stands for: a file, or the frame files of a video


def _natural_key(path: Path) -> list:
    """`frame2.png` before `frame10.png`: digit runs compare as numbers, the rest as text."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_files(directory: Path) -> tuple[Path, ...]:
    """The frames of a frame-sequence item (`item="frames"`, e.g. a video directory) in temporal order: its image
    files (by suffix), names in natural order.

    Hidden files and files of other types (a README, a `.json` of metadata) are not frames.
    """
    suffixes = {s for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = [p for p in directory.iterdir() if not p.name.startswith(".") and p.suffix.lower() in suffixes]
    return tuple(sorted(files, key=_natural_key))


# How the per-slot features of an item with padded slots (audio windows, video frames) become its tokens:
# "concat" keeps every real slot's connector tokens in order; "mean" averages the slots' encoder features over
# the real ones, then projects once (the Uni-MoE reference for video)
POOLINGS = ("concat", "mean")

# What decoding a damaged file raises whatever its modality: PIL's errors are OSError (UnidentifiedImageError,
# "image file is truncated", "broken data stream"), plus SyntaxError / EOFError from some plugins, zlib.error from
# raw streams, ValueError from transforms and our own checks, and DecompressionBombError (an Exception) for huge
# images. A spec adds its library's own (`ModalitySpec.decode_errors`).
COMMON_DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError,
)  # fmt: skip


@dataclass(frozen=True)
class Tower:
    """How a modality's encoder is built from a backbone config, written into `multimodal_config.json` and
    rebuilt from that record. A tower maps a batch of items to (items, tokens, hidden) features and has
    `hidden_size` (the connector's input width)."""

    # build(name_or_path, overrides, *, feature_layer=, trust_remote_code=, allow_unsafe=) -> tower: a preset name
    # builds a fresh tiny tower, anything else loads a checkpoint
    build: Callable[..., nn.Module]
    to_config: Callable[[nn.Module], dict[str, Any]]  # tower -> its JSON-ready record
    from_config: Callable[[dict[str, Any]], nn.Module]  # record -> a fresh (randomly initialised) tower of that shape


@dataclass(frozen=True)
class ModalitySpec:
    """Everything the data side and the model need to know about one modality."""

    name: str  # the record field, the key of `BackboneConfig.encoders` and of the model's modules
    placeholder: str  # its token in the text, one per item, e.g. "<image>"
    decode: Callable[[MediaItem], None]  # decode one item in full; a damaged file raises one of `decode_errors()`
    load: Callable[[MediaItem, Any], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]  # (item, transform) ->
    # its values, and with `slots` also its (slots,) bool mask
    # (options, the transforms of the modalities registered before) -> this modality's transform; options come
    # from the data module (`<name>_<option>` arguments and `modality_options[<name>]`) or `edge generate`
    transform: Callable[[dict[str, Any], Mapping[str, Any]], Any]
    tower: Tower | None = None  # its own encoder; None: the encoder (and connector) of `encoder_of` read its items
    encoder_of: str | None = None  # e.g. video: "image"
    connector: str = "mlp2x_gelu"  # the connector kind (models/connectors.py) when a config names none
    feature_layer: int = -2  # the tower's hidden layer when a config names none (a tower may ignore it)
    item: Literal["file", "frames"] = "file"  # a record's item: one file, or a video-like sequence of frame files
    values_key: str = ""  # the batch key of its values; "" = "<name>_values"
    slots: str | None = None  # items with padded slots (audio: "chunk", video: "frame"): a "<name>_<slots>_mask"
    pooling: tuple[str, ...] = ()  # with slots: the `POOLINGS` a model may use for it, its default first
    # a built tower -> the transform options that match it (image size, audio window): `edge generate` sizes its
    # inputs from the stored model with it
    transform_options: Callable[[nn.Module], dict[str, Any]] | None = None
    decode_errors: tuple[type[Exception], ...] = ()  # what its decoder raises for a damaged file, beyond the common
    # an item longer than its transform keeps (an audio clip past `max_chunks` windows), counted as
    # `long_<name>` in the data report; `overflow_settings(transform)` is what that depends on (the sample cache
    # key of a data set holds it)
    overflows: Callable[[MediaItem, Any], bool] | None = None
    overflow_settings: Callable[[Any], tuple] | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"modality name {self.name!r} must be an identifier (it names batch keys and config keys)")
        if not self.placeholder or any(c.isspace() for c in self.placeholder):
            raise ValueError(f"modality {self.name!r}: placeholder {self.placeholder!r} must be one word, e.g. "
                             f"'<{self.name}>'")
        if (self.tower is None) == (self.encoder_of is None):
            raise ValueError(f"modality {self.name!r}: give exactly one of `tower` (its own encoder) and "
                             "`encoder_of` (the modality whose encoder reads its items)")
        if self.item not in ("file", "frames"):
            raise ValueError(f"modality {self.name!r}: item must be 'file' or 'frames', got {self.item!r}")
        if bool(self.slots) != bool(self.pooling) or any(p not in POOLINGS for p in self.pooling):
            raise ValueError(f"modality {self.name!r}: items with slots need `pooling`, a non-empty subset of "
                             f"{POOLINGS} (its default first), and only they; got slots={self.slots!r}, "
                             f"pooling={self.pooling!r}")
        if (self.overflows is None) != (self.overflow_settings is None):
            raise ValueError(f"modality {self.name!r}: `overflows` and `overflow_settings` go together")
        if not self.values_key:
            object.__setattr__(self, "values_key", f"{self.name}_values")

    @property
    def mask_key(self) -> str | None:
        """The batch key of its (items, slots) bool mask, True on real slots; None for items without slots."""
        return f"{self.name}_{self.slots}_mask" if self.slots else None

    @property
    def counts_key(self) -> str:
        """The batch key of its (B,) long per-sample item counts."""
        return f"{self.name}_counts"

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return tuple(k for k in (self.values_key, self.mask_key, self.counts_key) if k)

    def encoder_modality(self) -> str:
        """The modality whose encoder and connector read this one's items: its own name, or `encoder_of`."""
        return self.encoder_of or self.name


_SPECS: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec, *, replace: bool = False) -> ModalitySpec:
    """Make `spec` known to the data side, the tokenizer and the model, after the modalities registered before.

    A taken name, placeholder or batch key is an error (two modalities would read each other's tokens or
    tensors); `replace=True` swaps the spec registered under the same name, keeping its place in the order.
    """
    old = _SPECS.get(spec.name)
    if old is not None and not replace and old != spec:
        raise ValueError(f"modality {spec.name!r} is already registered (placeholder {old.placeholder!r}); "
                         "pass replace=True to override it, or unregister_modality it first")
    for other in _SPECS.values():
        if other.name == spec.name:
            continue
        if other.placeholder == spec.placeholder:
            raise ValueError(f"modality {spec.name!r}: placeholder {spec.placeholder!r} is taken by modality "
                             f"{other.name!r}")
        clash = set(other.batch_keys) & set(spec.batch_keys)
        if clash:
            raise ValueError(f"modality {spec.name!r}: batch keys {sorted(clash)} are taken by modality {other.name!r}")
    if spec.encoder_of is not None:
        source = _SPECS.get(spec.encoder_of)
        if source is None or source.tower is None:
            raise ValueError(f"modality {spec.name!r}: encoder_of={spec.encoder_of!r} must name a registered "
                             f"modality with its own tower (registered: {list(_SPECS)})")
    _SPECS[spec.name] = spec
    return spec


def unregister_modality(name: str) -> ModalitySpec:
    """Forget modality `name` (a test's own modality, so that it does not reach the tests after it)."""
    spec = modality(name)
    users = [s.name for s in _SPECS.values() if s.encoder_of == name]
    if users:
        raise ValueError(f"modality {name!r} is the encoder of {users}: unregister those first")
    return _SPECS.pop(name)


def modality(name: str) -> ModalitySpec:
    if name not in _SPECS:
        raise ValueError(f"modality {name!r} is not registered; registered: {list(_SPECS)} (a modality defined "
                         "outside the package is registered by importing the module that calls register_modality "
                         "for it, before it is used)")
    return _SPECS[name]


def modalities() -> tuple[ModalitySpec, ...]:
    """Every registered modality, in registration order."""
    return tuple(_SPECS.values())


def modality_names() -> tuple[str, ...]:
    """The registered modality names, in registration order (what `MultimodalLM.last_token_modality` indexes)."""
    return tuple(_SPECS)


def split_option(key: str) -> tuple[str, str]:
    """`<modality>_<option>` (a data module argument, an `edge generate` flag) -> (modality, option), the
    modality being the longest registered name the key starts with (a name may itself contain "_")."""
    names = [n for n in _SPECS if key.startswith(f"{n}_") and len(key) > len(n) + 1]
    if not names:
        raise ValueError(f"{key!r} is not <modality>_<option> for a registered modality (registered: {list(_SPECS)})")
    name = max(names, key=len)
    return name, key[len(name) + 1:]


def decode_errors() -> tuple[type[Exception], ...]:
    """What decoding or loading a damaged item of any registered modality raises."""
    return COMMON_DECODE_ERRORS + tuple(e for s in _SPECS.values() for e in s.decode_errors)


def build_transforms(options: Mapping[str, Mapping[str, Any]] | None = None,
                     given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """modality -> its transform, for every registered modality, in registration order: `given[name]` if there,
    else its spec's `transform(options[name], the transforms before it)`."""
    options, given = options or {}, given or {}
    unknown = sorted((set(options) | set(given)) - set(_SPECS))
    if unknown:
        raise ValueError(f"transforms or transform options for modalities {unknown}, which are not registered "
                         f"(registered: {list(_SPECS)})")
    built: dict[str, Any] = {}
    for spec in _SPECS.values():
        if spec.name in given:
            built[spec.name] = given[spec.name]
            continue
        try:
            built[spec.name] = spec.transform(dict(options.get(spec.name, {})), built)
        except TypeError as error:
            raise ValueError(f"modality {spec.name!r}: bad transform options {dict(options.get(spec.name, {}))} "
                             f"({error})") from error
    return built


def unknown_override(key: str, config: PretrainedConfig, what: str) -> ValueError:
    """The error for an override `key` that `config`'s class has no field of, naming the nearest field."""
    fields = (set(config.to_dict()) | set(config.attribute_map)
              | set(inspect.signature(type(config).__init__).parameters)) - {"self", "kwargs"}
    nearest = difflib.get_close_matches(key, sorted(fields), n=3)
    hint = f"did you mean {' or '.join(map(repr, nearest))}?" if nearest else f"its fields: {', '.join(sorted(fields))}"
    return ValueError(f"{what}: {type(config).__name__} has no field {key!r} ({hint})")


def preset_config(presets: Mapping[str, tuple[Callable[..., PretrainedConfig], dict[str, Any]]], name: str,
                  overrides: dict[str, Any] | None = None, what: str = "overrides") -> PretrainedConfig:
    """The config of a tiny preset (name -> (config class, fields)), single fields changed by `overrides`;
    ValueError (naming `what`, the key and the nearest field) for a key the config class has no field of."""
    config_cls, defaults = presets[name]
    overrides = overrides or {}
    config = config_cls(**{**defaults, **overrides})
    default = config_cls(**defaults)
    for key in overrides:
        # a config keeps a key it does not know as a new attribute (a legacy name it reads, e.g. rope_theta, it
        # consumes): silently, so a typo would build the preset unchanged
        if hasattr(config, key) and not hasattr(default, key):
            raise unknown_override(key, default, f"{what} of preset {name!r}")
    return config


@contextmanager
def from_pretrained_overrides(config: PretrainedConfig, overrides: dict[str, Any] | None, what: str) -> Iterator[None]:
    """Around a `from_pretrained(..., **overrides)`: the TypeError transformers raises for an override that is
    neither a field of the loaded `config` nor a loading option becomes `unknown_override`'s error."""
    try:
        yield
    except TypeError as err:
        key = next((k for k in overrides or {} if f"unexpected keyword argument '{k}'" in str(err)), None)
        if key is None:
            raise
        raise unknown_override(key, config, what) from err
