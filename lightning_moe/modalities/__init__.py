"""Modalities, one file each (`image.py`, `audio.py`, `video.py`), and their registry (`registry.py`).

Importing this package registers the shipped modalities, in this order: image, audio, video (the order of
their placeholder tokens in the tokenizer). A new modality: a file (in or outside the package) with a decoder,
a transform and an encoder tower (or another modality's, `encoder_of`) and a `register_modality(ModalitySpec(
...))` call, imported before the data and the model are built (docs/architecture.md).
"""

from .registry import (
    POOLINGS,
    MediaItem,
    build_transforms,
    ModalitySpec,
    Tower,
    decode_errors,
    frame_files,
    modalities,
    modality,
    modality_names,
    split_option,
    preset_config,
    from_pretrained_overrides,
    register_modality,
    unregister_modality,
)
from .image import IMAGE, IMAGE_TOKEN, HFImageProcessor, ImageTransform, NormalizeImage  # noqa: E402  (registers "image")
from .audio import AUDIO, AUDIO_TOKEN, AudioFeatures, whisper_window_seconds  # noqa: E402  (registers "audio")
from .video import VIDEO, VIDEO_TOKEN, VideoFrames  # noqa: E402  (registers "video")

__all__ = ["ModalitySpec", "Tower", "MediaItem", "register_modality", "unregister_modality", "modality", "modalities",
           "modality_names", "split_option", "decode_errors", "frame_files", "build_transforms", "POOLINGS", "preset_config",
           "from_pretrained_overrides", "IMAGE", "AUDIO",
           "VIDEO", "IMAGE_TOKEN", "AUDIO_TOKEN", "VIDEO_TOKEN", "NormalizeImage", "HFImageProcessor",
           "ImageTransform", "AudioFeatures", "VideoFrames", "whisper_window_seconds"]
