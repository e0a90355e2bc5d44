"""Placeholder tokens and the label mask shared by `data/` and `models/`.

This is the only module the two layers share (DESIGN.md): the data side writes one
placeholder token per modality item into `input_ids`; the model side replaces each with the
projected encoder features.
"""

IGNORE_INDEX = -100

IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"
VIDEO_TOKEN = "<video>"

# modality name -> placeholder text; the order fixes the order of special tokens.
PLACEHOLDERS: dict[str, str] = {"image": IMAGE_TOKEN, "audio": AUDIO_TOKEN, "video": VIDEO_TOKEN}

# modality name -> the batch key that carries its raw inputs (collate writes it, the model reads it)
MODALITY_INPUTS: dict[str, str] = {"image": "pixel_values", "audio": "audio_values", "video": "video_values"}
