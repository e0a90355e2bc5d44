"""The video modality (Uni-MoE): `<video>`, one video per placeholder, its frames through the image transform,
the image tower and the image connector (`encoder_of="image"`: video has no encoder of its own).

Batch: `video_values` (n_video, F, 3, H, W) float32, `video_frame_mask` (n_video, F) bool, True on real frames,
`video_counts` (B,).

- A record's video is a directory of frame images (natural name order, `frame_files`) or a list of frame
  files in temporal order (`records.parse_record`).
- F = `VideoFrames.num_frames` for every item, whatever the batch: a video keeps all its frames if it has at
  most F, padded with zero frames (mask False), else F frames sampled uniformly over its length (the
  reference's `np.linspace` sampling), always in temporal order.
- Pooling: "mean" averages the real frames' encoder features, then projects once (the reference); "concat"
  keeps every frame's tokens in order. Padded frames are never encoded and stay out of the LLM's attention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .image import ImageTransform, decode_image
from .registry import ModalitySpec, decode_errors, frame_files, register_modality

VIDEO_TOKEN = "<video>"


def decode_video(frames: tuple[Path, ...]) -> None:
    """Decode every frame of a video, raising a decode error naming the first that fails."""
    if not frames:
        raise ValueError("the video has no frames")
    for frame in frames:
        try:
            decode_image(frame)
        except decode_errors() as e:
            raise ValueError(f"frame {frame.name}: {e}") from e


class VideoFrames:
    """Frame files (temporal order) -> (`num_frames`, 3, H, W) through the image transform and a (`num_frames`,) mask.

    At most `num_frames` frames are kept: all of a shorter video (then zero frames, mask False),
    else `num_frames` sampled uniformly from first to last (module docstring).
    """

    def __init__(self, image_transform: ImageTransform, num_frames: int = 8):
        if num_frames < 1:
            raise ValueError(f"video num_frames must be >= 1, got {num_frames}")
        self.image_transform = image_transform
        self.num_frames = num_frames

    def select(self, n: int) -> list[int]:
        """Indices of the frames kept out of `n`."""
        if n <= self.num_frames:
            return list(range(n))
        return np.linspace(0, n - 1, self.num_frames).round().astype(int).tolist()

    def __call__(self, frames: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = []
        for index in self.select(len(frames)):
            with Image.open(frames[index]) as image:
                pixels.append(self.image_transform(image))
        values = torch.zeros(self.num_frames, *pixels[0].shape)
        values[: len(pixels)] = torch.stack(pixels)  # (kept, 3, H, W)
        mask = torch.arange(self.num_frames) < len(pixels)
        return values, mask


def video_transform(options: Mapping[str, Any], built: Mapping[str, Any]) -> VideoFrames:
    """`VideoFrames(num_frames)` over the image transform."""
    return VideoFrames(built["image"], **options)


VIDEO = register_modality(ModalitySpec(
    name="video", placeholder=VIDEO_TOKEN, decode=decode_video, load=lambda frames, transform: transform(frames),
    transform=video_transform, encoder_of="image", item="frames", slots="frame", pooling=("mean", "concat"),
))
