"""Reading and decoding modality files (images, audio, video frames), and proving at setup that they are usable.

A header check is not enough: PIL's `verify()` reads a file's structure but decodes no pixel, so
a truncated JPEG or a PNG whose zlib stream is corrupt (with valid chunk checksums) passes it and
then fails when a training step draws it; a cut FLAC file opens and fails halfway. Setup therefore
decodes every item of a record in full with the decoder its modality registers in `MEDIA_DECODERS`;
a modality the datasets learn to load adds one entry there and its files are checked at setup with
no other change. A failure is counted under `unreadable_<modality>` (`unreadable_reason`).

Items (what one placeholder stands for, `records.parse_record` resolves them):
- image: one file, read with Pillow;
- audio: one file, read with `soundfile` (libsndfile: WAV, FLAC, OGG/Vorbis, MP3 ...), mixed down
  to mono and resampled to 16 kHz (`read_audio`);
- video: a tuple of frame files in temporal order (a record names a directory of frames or a list
  of them; `frame_files` lists a directory), each frame an image.
"""

import math
import re
import zlib
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image
from scipy.signal import resample_poly

# What decoding a damaged file raises: PIL's errors are OSError (UnidentifiedImageError, "image file
# is truncated", "broken data stream"), plus SyntaxError / EOFError from some plugins, zlib.error from
# raw streams, ValueError from transforms and DecompressionBombError (an Exception) for huge images;
# libsndfile's are soundfile.SoundFileError (LibsndfileError: "Format not recognised", "unknown error
# in flac decoder"); our own checks (an empty clip, a cut stream, non-finite samples) raise ValueError.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError, soundfile.SoundFileError,
)  # fmt: skip

# Whisper (and so Uni-MoE's audio tower) hears 16 kHz mono.
AUDIO_SAMPLING_RATE = 16_000

MediaItem = Path | tuple[Path, ...]  # a file (image, audio) or the frames of a video


def decode_image(file: Path) -> None:
    """Decode every pixel of an image (`load()`, not `verify()`), raising one of `DECODE_ERRORS` if damaged."""
    with Image.open(file) as image:
        image.load()


def read_audio(file: Path, sampling_rate: int = AUDIO_SAMPLING_RATE) -> np.ndarray:
    """The whole clip as float32 mono at `sampling_rate`: (samples,); raises one of `DECODE_ERRORS` if damaged.

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
        audio = resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)
    return audio


def audio_seconds(file: Path) -> float:
    """The duration a clip's header announces (no decoding: cheap enough for every record at setup)."""
    info = soundfile.info(str(file))
    return info.frames / info.samplerate if info.samplerate else math.inf


def decode_audio(file: Path) -> None:
    """Read and resample the whole clip, raising one of `DECODE_ERRORS` if it cannot."""
    read_audio(file)


def decode_video(frames: tuple[Path, ...]) -> None:
    """Decode every frame of a video, raising one of `DECODE_ERRORS` naming the first that fails."""
    if not frames:
        raise ValueError("the video has no frames")
    for frame in frames:
        try:
            decode_image(frame)
        except DECODE_ERRORS as e:
            raise ValueError(f"frame {frame.name}: {e}") from e


def _natural_key(path: Path) -> list:
    """`frame2.png` before `frame10.png`: digit runs compare as numbers, the rest as text."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_files(directory: Path) -> tuple[Path, ...]:
    """The frames of a video directory in temporal order: its image files (by suffix), names in natural order.

    Hidden files and files of other types (a README, a `.json` of metadata) are not frames.
    """
    suffixes = {s for s, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files = [p for p in directory.iterdir() if not p.name.startswith(".") and p.suffix.lower() in suffixes]
    return tuple(sorted(files, key=_natural_key))


# modality -> a function that fully decodes one item and raises one of DECODE_ERRORS when it cannot.
MEDIA_DECODERS: dict[str, Callable[[MediaItem], None]] = {
    "image": decode_image,
    "audio": decode_audio,
    "video": decode_video,
}


def unreadable_reason(modality: str) -> str:
    """The skip reason of a file that fails to decode: `unreadable_image`, `unreadable_audio`, ..."""
    return f"unreadable_{modality}"


def decode_media(modality: str, item: MediaItem) -> None:
    """Fully decode `item` with its modality's decoder; raises `KeyError` for a modality without one."""
    if modality not in MEDIA_DECODERS:
        raise KeyError(f"no decoder registered for modality {modality!r} (known: {sorted(MEDIA_DECODERS)})")
    MEDIA_DECODERS[modality](item)
