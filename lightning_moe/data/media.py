"""Decoding modality files (images now; audio and video plug in the same way) to prove they are usable.

A header check is not enough: PIL's `verify()` reads a file's structure but decodes no pixel, so
a truncated JPEG or a PNG whose zlib stream is corrupt (with valid chunk checksums) passes it and
then fails when a training step draws it. Setup therefore decodes every file of a record in full
with the decoder its modality registers here; a modality the datasets learn to load adds one
entry to `MEDIA_DECODERS` and its files are checked at setup with no other change.
"""

import zlib
from collections.abc import Callable
from pathlib import Path

from PIL import Image

# What decoding a damaged file raises: PIL's errors are OSError (UnidentifiedImageError, "image file
# is truncated", "broken data stream"), plus SyntaxError / EOFError from some plugins, zlib.error from
# raw streams, ValueError from transforms and DecompressionBombError (an Exception) for huge images.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError,
)  # fmt: skip


def decode_image(file: Path) -> None:
    """Decode every pixel of an image (`load()`, not `verify()`), raising one of `DECODE_ERRORS` if damaged."""
    with Image.open(file) as image:
        image.load()


# modality -> a function that fully decodes one file and raises one of DECODE_ERRORS when it cannot.
MEDIA_DECODERS: dict[str, Callable[[Path], None]] = {"image": decode_image}


def unreadable_reason(modality: str) -> str:
    """The skip reason of a file that fails to decode: `unreadable_image`, `unreadable_audio`, ..."""
    return f"unreadable_{modality}"


def decode_media(modality: str, file: Path) -> None:
    """Fully decode `file` with its modality's decoder; raises `KeyError` for a modality without one."""
    if modality not in MEDIA_DECODERS:
        raise KeyError(f"no decoder registered for modality {modality!r} (known: {sorted(MEDIA_DECODERS)})")
    MEDIA_DECODERS[modality](file)
