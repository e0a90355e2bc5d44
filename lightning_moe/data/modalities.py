"""Audio and video items -> fixed-size tensors with masks: the batch contract between `data/` and the models.

What a collated batch holds for each modality (`collate_batch`; keys from `lightning_moe.tokens`):

    pixel_values      (n_image, 3, H, W)              float32   images through the image transform
    image_counts      (B,) long                                 images of each sample
    audio_values      (n_audio, C, n_mels, frames)    float32   Whisper log-mel, one row of C chunks per clip
    audio_chunk_mask  (n_audio, C) bool                         True on the chunks the clip fills
    audio_counts      (B,) long
    video_values      (n_video, F, 3, H, W)           float32   frames through the image transform
    video_frame_mask  (n_video, F) bool                         True on real frames
    video_counts      (B,) long

- Items are in placeholder order across the batch: sample 0's items in the order its `<audio>`
  (`<video>`, `<image>`) placeholders appear in `input_ids`, then sample 1's, ... So item k of a
  modality fills the k-th placeholder of that modality in the row-major scan of `input_ids`.
- A sample without a modality contributes no items; a batch without any item of a modality has
  no `<modality>_values` / mask key at all (its counts are all 0). Each placeholder is ONE token in
  `input_ids`; the model expands it into that item's features.
- C = `AudioFeatures.max_chunks` and F = `VideoFrames.num_frames` for every item, whatever the
  batch: a clip is cut into windows of `chunk_seconds` (Whisper: 30 s; `frames` = chunk_seconds
  x 100 at Whisper's 10 ms hop), each turned into log-mel features by transformers'
  `WhisperFeatureExtractor` (its own per-window normalisation); the windows after the clip's
  end are zeros with mask False. A clip longer than C windows keeps its first C (counted as
  `long_audio` in the data report). A video keeps all its frames if it has at most F, padded with
  zero frames (mask False), else F frames sampled uniformly over its length (the reference's
  `np.linspace` sampling), always in temporal order. Fixed C and F make an item's features
  independent of the batch it lands in (positions included), which generation relies on.
- A Whisper encoder reads one window: `input_features` (n, n_mels, frames) with
  `WhisperConfig(num_mel_bins=n_mels, max_source_positions=frames // 2)`; the model runs it on
  `audio_values.flatten(0, 1)` (or on the masked chunks only) and must keep padded chunks and
  frames out of the LLM's attention (their features are not data).

Audio files are read by `media.read_audio` (soundfile, mono mixdown, polyphase resampling to
16 kHz); video frames are image files (`media.frame_files`). Docs: docs/unimoe_data.md.
"""

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor

from lightning_moe.data.media import AUDIO_SAMPLING_RATE

ImageTransform = Callable[[Image.Image], torch.Tensor]  # PIL image -> (3, H, W) float


MEL_FRAMES_PER_SECOND = 100  # Whisper's log-mel hop: 10 ms (160 samples at 16 kHz)


def whisper_window_seconds(max_source_positions: int) -> float:
    """The window one pass of a Whisper encoder reads: its convolutions halve the frames, so two log-mel frames
    a position (`max_source_positions` 1500: 30 s; the tiny preset's 50: 1 s)."""
    return 2 * max_source_positions / MEL_FRAMES_PER_SECOND


class AudioFeatures:
    """A 16 kHz mono waveform -> (`max_chunks`, n_mels, frames) Whisper log-mel and a (`max_chunks`,) chunk mask.

    Args:
        n_mels: mel bins (Whisper: 80; large-v3: 128).
        chunk_seconds: the window one encoder pass hears (Whisper: 30); short windows (e.g. 1 s)
            keep tiny CPU models fast. A multiple of 10 ms, so a window is a whole number of frames.
        max_chunks: windows per clip (module docstring).
        processor: a Hugging Face feature extractor name or path (a Whisper checkpoint's); it
            replaces `n_mels` and `chunk_seconds` with its own.
    """

    def __init__(self, n_mels: int = 80, chunk_seconds: float = 30.0, max_chunks: int = 4, processor: str | None = None):
        if max_chunks < 1:
            raise ValueError(f"audio max_chunks must be >= 1, got {max_chunks}")
        if processor is not None:
            from transformers import AutoFeatureExtractor  # only needed for real checkpoints

            # never the repository's own Python code (safe_load.py)
            self.extractor = AutoFeatureExtractor.from_pretrained(processor, trust_remote_code=False)
            if not hasattr(self.extractor, "n_samples") or self.extractor.sampling_rate != AUDIO_SAMPLING_RATE:
                raise ValueError(f"audio processor {processor!r} is not a 16 kHz Whisper-style feature extractor "
                                 f"({type(self.extractor).__name__})")
        else:
            self.extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=AUDIO_SAMPLING_RATE)
            hop = self.extractor.hop_length
            n_samples = round(chunk_seconds * AUDIO_SAMPLING_RATE)
            if n_samples <= 0 or n_samples % hop or not math.isclose(n_samples, chunk_seconds * AUDIO_SAMPLING_RATE):
                raise ValueError(f"audio chunk_seconds must be a positive multiple of {hop / AUDIO_SAMPLING_RATE} s "
                                 f"(one frame), got {chunk_seconds}")
            # the extractor pads / cuts every input to n_samples and emits n_samples // hop frames
            self.extractor.chunk_length = chunk_seconds
            self.extractor.n_samples = n_samples
            self.extractor.nb_max_frames = n_samples // hop
        self.max_chunks = max_chunks
        self.n_samples: int = int(self.extractor.n_samples)
        self.n_mels: int = int(self.extractor.feature_size)
        self.frames: int = int(self.extractor.nb_max_frames)
        self.chunk_seconds = self.n_samples / AUDIO_SAMPLING_RATE

    def chunks(self, seconds: float) -> int:
        """Windows a clip of `seconds` needs (before the `max_chunks` cap)."""
        return max(1, math.ceil(round(seconds * AUDIO_SAMPLING_RATE) / self.n_samples))

    def __call__(self, waveform: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(self.chunks(len(waveform) / AUDIO_SAMPLING_RATE), self.max_chunks)
        pieces = [waveform[k * self.n_samples : (k + 1) * self.n_samples] for k in range(n)]
        features = self.extractor(pieces, sampling_rate=AUDIO_SAMPLING_RATE, return_tensors="np")["input_features"]
        values = torch.zeros(self.max_chunks, self.n_mels, self.frames)
        values[:n] = torch.from_numpy(np.asarray(features, dtype=np.float32))  # (n, n_mels, frames)
        mask = torch.arange(self.max_chunks) < n
        return values, mask


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
