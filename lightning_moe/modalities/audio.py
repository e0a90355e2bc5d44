"""The audio modality (Uni-MoE): `<audio>`, one clip per placeholder, cut into Whisper log-mel windows, through
a Whisper encoder and the query connector.

Batch: `audio_values` (n_audio, C, n_mels, frames) float32, one row of C windows per clip; `audio_chunk_mask`
(n_audio, C) bool, True on the windows the clip fills; `audio_counts` (B,).

- A clip file is read with `soundfile` (libsndfile: WAV, FLAC, OGG/Vorbis, MP3 ...), mixed down to mono and
  resampled to 16 kHz (`read_audio`).
- C = `AudioFeatures.max_chunks` for every item, whatever the batch: a clip is cut into windows of
  `chunk_seconds` (Whisper: 30 s; `frames` = chunk_seconds x 100 at Whisper's 10 ms hop), each turned into
  log-mel features by transformers' `WhisperFeatureExtractor` (its own per-window normalisation); the windows
  after the clip's end are zeros with mask False. A clip longer than C windows keeps its first C (counted as
  `long_audio` in the data report). A fixed C makes an item's features independent of the batch it lands in
  (positions included), which generation relies on.
- A Whisper encoder reads one window: `input_features` (n, n_mels, frames) with
  `WhisperConfig(num_mel_bins=n_mels, max_source_positions=frames // 2)`, -> (n, frames // 2, hidden) (its two
  convolutions halve the frames) from its last layer, as Uni-MoE's reference reads it. The model runs it on the
  real windows only and keeps the padded ones out of the LLM's attention; each window's connector tokens
  follow each other in order ("concat" pooling). Docs: docs/unimoe_data.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, WhisperConfig, WhisperFeatureExtractor

from ..safe_load import hf_load_kwargs, hf_source
from .registry import ModalitySpec, Tower, from_pretrained_overrides, preset_config, register_modality

AUDIO_TOKEN = "<audio>"

# Whisper (and so Uni-MoE's audio tower) hears 16 kHz mono.
AUDIO_SAMPLING_RATE = 16_000
MEL_FRAMES_PER_SECOND = 100  # Whisper's log-mel hop: 10 ms (160 samples at 16 kHz)


def read_audio(file: Path, sampling_rate: int = AUDIO_SAMPLING_RATE) -> np.ndarray:
    """The whole clip as float32 mono at `sampling_rate`: (samples,); raises a decode error if damaged
    (libsndfile's `soundfile.SoundFileError`: "Format not recognised", "unknown error in flac decoder"; our own
    checks, an empty clip, a cut stream, non-finite samples: ValueError).

    Channels are averaged (mono mixdown); resampling is polyphase (`scipy.signal.resample_poly`,
    a windowed-sinc anti-aliasing filter, the standard for a rational rate change such as 44.1 -> 16 kHz).
    """
    with soundfile.SoundFile(file) as f:
        expected = f.frames
        audio = f.read(dtype="float32", always_2d=True)  # (samples, channels)
        rate = f.samplerate
    if len(audio) == 0:
        raise ValueError("the clip holds no samples")
    if expected > 0 and len(audio) != expected:  # some containers end early without an error
        raise ValueError(f"the stream ends after {len(audio)} of {expected} samples")
    audio = audio.mean(axis=1)
    if not np.isfinite(audio).all():
        raise ValueError("the clip holds non-finite samples")
    if rate != sampling_rate:
        ratio = Fraction(sampling_rate, rate)
        from scipy.signal import resample_poly  # only when a file's rate is not 16 kHz: scipy.signal loads slowly

        audio = resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)
    return audio


def audio_seconds(file: Path) -> float:
    """The duration a clip's header announces (no decoding: cheap enough for every record at setup)."""
    info = soundfile.info(str(file))
    return info.frames / info.samplerate if info.samplerate else math.inf


def decode_audio(file: Path) -> None:
    """Read and resample the whole clip, raising a decode error if it cannot."""
    read_audio(file)


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


def audio_transform(options: Mapping[str, Any], built: Mapping[str, Any] | None = None) -> AudioFeatures:
    return AudioFeatures(**options)


def load_audio(file: Path, transform: AudioFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    return transform(read_audio(file))


def clip_overflows(file: Path, transform: AudioFeatures) -> bool:
    """Whether the clip needs more windows than the transform keeps (from its header)."""
    return transform.chunks(audio_seconds(file)) > transform.max_chunks


# ---------------------------------------------------------------------------- the tower
# Whisper encoders. The window is short so that a CPU trains in minutes: max_source_positions=50 reads
# 100 log-mel frames, 1 s at Whisper's 10 ms hop (the data side's `audio_chunk_seconds: 1.0`); real
# Whisper reads 30 s (1500 positions). Only the encoder is built (`AudioTower`).
AUDIO_PRESETS: dict[str, tuple[Callable[..., PretrainedConfig], dict[str, Any]]] = {
    "tiny-whisper": (
        WhisperConfig,
        dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
             decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, max_source_positions=50,
             max_target_positions=32),
    ),
}


class AudioTower(nn.Module):
    """(windows, n_mels, frames) Whisper log-mel -> (windows, frames // 2, hidden) from the encoder's last layer."""

    def __init__(self, encoder: nn.Module):  # transformers' WhisperEncoder
        super().__init__()
        self.model = encoder
        cfg = encoder.config
        self.num_positions = cfg.max_source_positions  # features per window
        self.hidden_size = cfg.d_model
        self.feature_layer = -1  # recorded for the model config; Whisper's reference reads the last layer

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(input_features.to(dtype)).last_hidden_state


def build_audio_tower(name_or_path: str, overrides: dict[str, Any] | None = None, trust_remote_code: bool = False,
                      allow_unsafe: bool = False, feature_layer: int | None = None) -> AudioTower:
    """A preset name builds a fresh tiny Whisper encoder; anything else (an `openai/whisper-*` name or a local
    directory) loads a Whisper checkpoint and keeps its encoder (safetensors only, no repository code, unless
    `allow_unsafe` / `trust_remote_code` say otherwise). `feature_layer` is not read: the last layer is."""
    # the modeling code loads when a tower is built, not when the registry is imported (the tokenizer imports it)
    from transformers import WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    if name_or_path in AUDIO_PRESETS:
        return AudioTower(WhisperEncoder(preset_config(AUDIO_PRESETS, name_or_path, overrides, "audio tower overrides")))
    with hf_source("audio tower", name_or_path, allow_unsafe, trust_remote_code):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if not isinstance(config, WhisperConfig):
        raise ValueError(f"audio tower {name_or_path!r} is a {config.model_type!r} checkpoint; a Whisper one is needed")
    # the full encoder-decoder loads, the decoder is dropped: Whisper checkpoints keep the encoder under `model.encoder`
    with from_pretrained_overrides(config, overrides, f"audio tower overrides of {name_or_path}"):
        whisper = WhisperModel.from_pretrained(name_or_path, **hf_load_kwargs(trust_remote_code, allow_unsafe),
                                               **(overrides or {}))
    return AudioTower(whisper.get_encoder())


def audio_tower_from_config(config_dict: dict[str, Any]) -> AudioTower:
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return AudioTower(WhisperEncoder(AutoConfig.for_model(**config_dict)))


def audio_record(tower: AudioTower) -> dict[str, Any]:
    return {"kind": "audio", "config": tower.config.to_dict(), "feature_layer": tower.feature_layer}


WHISPER = Tower(build=build_audio_tower, to_config=audio_record,
                from_config=lambda record: audio_tower_from_config(record["config"]))

AUDIO = register_modality(ModalitySpec(
    name="audio", placeholder=AUDIO_TOKEN, decode=decode_audio, load=load_audio, transform=audio_transform,
    tower=WHISPER, connector="query", feature_layer=-1, slots="chunk", pooling=("concat",),
    # the stored Whisper encoder's window and mel bins
    transform_options=lambda tower: {"n_mels": tower.config.num_mel_bins,
                                     "chunk_seconds": whisper_window_seconds(tower.config.max_source_positions)},
    decode_errors=(soundfile.SoundFileError,),
    overflows=clip_overflows, overflow_settings=lambda t: (t.chunk_seconds, t.max_chunks),
))
