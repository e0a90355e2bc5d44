"""Proving at setup that a record's modality files are usable: each item decoded in full by its modality's decoder.

A header check is not enough: PIL's `verify()` reads a file's structure but decodes no pixel, so
a truncated JPEG or a PNG whose zlib stream is corrupt (with valid chunk checksums) passes it and
then fails when a training step draws it; a cut FLAC file opens and fails halfway. Setup therefore
decodes every item of a record in full with the decoder its modality registers (`ModalitySpec.decode`,
`lightning_moe/modalities/`); a modality registered later has its files checked at setup with no change
here. A failure is counted under `unreadable_<modality>` (`unreadable_reason`).

What one placeholder stands for (`records.parse_record` resolves them) is the modality's `item`: one file
(an image, an audio clip), or the frame files of a video in temporal order.
"""

from lightning_moe.modalities import MediaItem, modality

__all__ = ["decode_media", "unreadable_reason"]


def unreadable_reason(modality_name: str) -> str:
    """The skip reason of a file that fails to decode: `unreadable_image`, `unreadable_audio`, ..."""
    return f"unreadable_{modality_name}"


def decode_media(modality_name: str, item: MediaItem) -> None:
    """Fully decode `item` with its modality's decoder; raises one of `decode_errors()` if it is damaged, and a
    ValueError for a modality that is not registered."""
    modality(modality_name).decode(item)
