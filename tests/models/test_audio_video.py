"""Audio and video in `MultimodalLM` (Uni-MoE): the Whisper tower and a CLIP tower loaded by path against
Hugging Face, the query connector, slot masks, video pooling, and the save/load round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, WhisperConfig, WhisperModel

from lightning_moe.models import MultimodalLM, build_multimodal
from lightning_moe.models.connectors import QueryConnector
from lightning_moe.modalities.audio import build_audio_tower
from lightning_moe.modalities.image import build_vision_tower
from lightning_moe.modalities import modality_names
from lightning_moe.models.multimodal import batch_inputs
from tests.conftest import QUERIES, TINY_LLM, TINY_VISION, TINY_WHISPER, tiny_encoders


def build(tokenizer, video_pooling="concat"):
    return build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1, audio=True, video=video_pooling)).eval()


def ids(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def batch(tokenizer, frames=3, windows=2):
    image, audio, video = ids(tokenizer, "<image>", "<audio>", "<video>")
    input_ids = torch.tensor([[20, image, audio, video, 21, 22], [20, audio, 23, 24, 25, 26]])
    return {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 3, 32, 32),
        "audio_values": torch.randn(2, windows, 80, 40),
        "audio_chunk_mask": torch.tensor([[True, True], [True, False]]),
        "video_values": torch.randn(1, frames, 3, 32, 32),
        "video_frame_mask": torch.tensor([[True] * (frames - 1) + [False]]),
    }


def test_whisper_and_clip_saved_locally_load_by_path(tmp_path):
    whisper = WhisperModel(WhisperConfig(num_mel_bins=80, **TINY_WHISPER, decoder_layers=1, decoder_attention_heads=2,
                                         decoder_ffn_dim=64)).eval()
    whisper.save_pretrained(tmp_path / "whisper")
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **TINY_VISION, num_attention_heads=4)).eval()
    clip.save_pretrained(tmp_path / "clip")

    audio = build_audio_tower(str(tmp_path / "whisper")).eval()
    mel = torch.randn(2, 80, 40)
    torch.testing.assert_close(audio(mel), whisper.encoder(mel).last_hidden_state)
    assert audio(mel).shape == (2, 20, 32)  # Whisper's convolutions halve the frames

    vision = build_vision_tower(str(tmp_path / "clip"), feature_layer=-2).eval()
    pixels = torch.randn(2, 3, 32, 32)
    expected = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # CLS dropped
    torch.testing.assert_close(vision(pixels), expected)


def test_audio_tower_refuses_a_non_whisper_checkpoint(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **TINY_VISION, num_attention_heads=4)).save_pretrained(
        tmp_path / "clip")
    with pytest.raises(ValueError, match="Whisper"):
        build_audio_tower(str(tmp_path / "clip"))


def test_query_connector_gives_a_fixed_token_count_whatever_the_length():
    connector = QueryConnector(16, 24, num_queries=5, num_layers=2, num_heads=4)
    assert connector(torch.randn(3, 7, 16)).shape == (3, 5, 24)
    assert connector(torch.randn(3, 50, 16)).shape == (3, 5, 24)
    with pytest.raises(ValueError, match="divisible"):
        QueryConnector(10, 24, num_heads=4)


def test_spliced_lengths_masks_and_modalities(tokenizer):
    model = build(tokenizer)
    inputs = batch(tokenizer)
    embeds, mask, _ = model.embed(inputs.pop("input_ids"), inputs.pop("attention_mask"), **inputs)
    patches = 16
    # row 0: 3 text + 16 image + 2 windows x 3 queries + 3 frames x 16 patches; row 1: 5 text + 2 x 3 audio
    assert embeds.shape[1] == 3 + patches + 2 * QUERIES + 3 * patches
    modality = model.last_token_modality
    assert (modality[0] == modality_names().index("image")).sum() == patches
    assert (modality[0] == modality_names().index("audio")).sum() == 2 * QUERIES
    assert (modality[0] == modality_names().index("video")).sum() == 3 * patches
    # the padded window of clip 1 and the padded frame are masked out; everything else attends
    assert mask[0].sum() == embeds.shape[1] - patches
    assert mask[1].sum() == 5 + QUERIES


def test_padded_windows_and_frames_do_not_change_the_output(tokenizer):
    model = build(tokenizer)
    inputs = batch(tokenizer)
    reference = model(**inputs)
    changed = dict(inputs)
    changed["audio_values"] = inputs["audio_values"].clone()
    changed["audio_values"][1, 1] = 100.0  # the padded window
    changed["video_values"] = inputs["video_values"].clone()
    changed["video_values"][0, 2] = 100.0  # the padded frame
    out = model(**changed)
    real = reference.attention_mask.bool()
    torch.testing.assert_close(out.logits[real], reference.logits[real])
    changed["audio_values"][0, 1] = 100.0  # a real window: the output must change
    assert not torch.allclose(model(**changed).logits[real], reference.logits[real])


def test_video_mean_pools_encoder_features_over_real_frames(tokenizer):
    model = build(tokenizer, video_pooling="mean")
    values, mask = torch.randn(2, 4, 3, 32, 32), torch.tensor([[True, True, True, False], [True, False, False, False]])
    features, feature_mask = model.encode_items("video", values, mask)
    tower, connector = model.encoders["image"], model.connectors["image"]
    expected = torch.stack([tower(values[0, :3]).mean(0), tower(values[1, :1]).mean(0)])
    torch.testing.assert_close(features, connector(expected))
    assert feature_mask.all()
    # mean pooling forgets frame order; concat keeps it
    reversed_frames = torch.cat([values[:, :3].flip(1), values[:, 3:]], dim=1)
    torch.testing.assert_close(model.encode("video", reversed_frames[:1], mask[:1]), features[:1])
    model.pooling["video"] = "concat"
    concat = model.encode("video", values[:1], mask[:1])
    assert concat.shape[1] == 4 * 16
    assert not torch.allclose(model.encode("video", reversed_frames[:1], mask[:1]), concat)


def test_round_trip_keeps_audio_and_video(tokenizer, tmp_path):
    model = build(tokenizer, video_pooling="mean")
    inputs = batch(tokenizer)
    model.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path).eval()
    assert loaded.pooling == {"audio": "concat", "video": "mean"} and set(loaded.encoders) == {"image", "audio"}
    assert loaded.connector_options["audio"]["num_queries"] == QUERIES
    torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_batch_inputs_carry_the_slot_masks(tokenizer):
    inputs = batch_inputs({**batch(tokenizer), "labels": None, "domain": ["a", "b"]})
    assert {"audio_chunk_mask", "video_frame_mask", "audio_values", "video_values"} <= set(inputs)


def test_generation_reads_audio_and_video(tokenizer):
    model = build(tokenizer)
    inputs = batch(tokenizer)
    new = model.generate(inputs.pop("input_ids"), inputs.pop("attention_mask"), max_new_tokens=3,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=None, **inputs)
    assert new.shape == (2, 3)
