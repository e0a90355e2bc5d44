"""Audio and video: reading (mono, 16 kHz), Whisper log-mel chunks with their mask, video frames with
theirs, the batch contract of `collate_batch` for several modalities in one conversation, and bad
audio / video inputs refused with named errors or skipped and counted, as images are."""

import os

import numpy as np
import pytest
import torch
from scipy.signal import resample_poly
from transformers import WhisperFeatureExtractor

from lightning_moe.data import BadRecordError, DomainMixtureDataModule, LlavaDataset, collate_batch
from lightning_moe.data import records as R
from lightning_moe.data.dataset import SKIPPED_RECORDS
from lightning_moe.modalities import AudioFeatures, NormalizeImage, VideoFrames, modalities, modality
from lightning_moe.modalities.audio import read_audio
from tests.data.data_helpers import media_record, tone, write_audio, write_frames, write_image, write_jsonl

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    write_audio(root / "a1.flac", tone(0.6, 440))  # one 1 s window
    write_audio(root / "a2.flac", tone(1.5, 880))  # two windows
    write_audio(root / "long.wav", tone(3.2, 300))  # four windows
    write_frames(root / "v_rgb", [RED, GREEN, BLUE])
    write_frames(root / "v_w", [WHITE, RED])
    write_image(root / "img.png", GREEN)
    (root / "garbage.flac").write_bytes(b"this is not audio")
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 16_000).astype(np.float32)  # noise: data is most of the file
    cut = write_audio(root / "cut_full.flac", noise).read_bytes()
    (root / "cut.flac").write_bytes(cut[: len(cut) // 2])
    write_frames(root / "v_bad", [RED, GREEN])
    (root / "v_bad" / "1.png").write_bytes(b"not a png")
    (root / "v_empty").mkdir()
    return root


def _audio(**kwargs):
    return AudioFeatures(n_mels=80, chunk_seconds=1.0, max_chunks=kwargs.pop("max_chunks", 3), **kwargs)


def _load(root, rows, tokenizer, transforms=None, **kwargs):
    transforms = {"audio": _audio(), "video": VideoFrames(NormalizeImage(32), num_frames=4), **(transforms or {})}
    return LlavaDataset(write_jsonl(root / "d.jsonl", rows), root, tokenizer, transforms=transforms, **kwargs)


# ----- reading and features ---------------------------------------------------------------------


def test_audio_is_mixed_down_to_mono_and_resampled_to_16khz(tmp_path):
    left, right = tone(1.0, 440, rate=44_100), tone(1.0, 1000, rate=44_100, amplitude=0.2)
    path = write_audio(tmp_path / "stereo.wav", np.stack([left, right], axis=1), rate=44_100, fmt="WAV")
    audio = read_audio(path)
    assert audio.dtype == np.float32 and audio.shape == (16_000,)
    # the oracle: the same mixture sampled at 16 kHz directly (away from the filter's edge effects)
    expected = (tone(1.0, 440) + tone(1.0, 1000, amplitude=0.2)) / 2
    np.testing.assert_allclose(audio[400:-400], expected[400:-400], atol=2e-3)
    assert np.allclose(read_audio(write_audio(tmp_path / "a.flac", tone(0.5))), tone(0.5), atol=1e-4)  # 16 kHz: as is


def test_two_chunk_clip_gives_whisper_features_per_chunk_and_a_chunk_mask():
    clip = tone(1.5, 880)
    values, mask = _audio()(clip)
    assert values.shape == (3, 80, 100) and values.dtype == torch.float32
    assert mask.tolist() == [True, True, False]
    # the oracle: transformers' extractor with a 1 s window, on each second of the clip
    reference = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
    for k in range(2):
        expected = reference(clip[16_000 * k : 16_000 * (k + 1)], sampling_rate=16_000, return_tensors="np")
        np.testing.assert_allclose(values[k].numpy(), expected["input_features"][0], atol=1e-5)
    assert not values[2].any()  # the padded window is zeros


def test_audio_longer_than_max_chunks_keeps_its_first_windows_and_is_counted(root, tokenizer):
    values, mask = _audio(max_chunks=2)(tone(3.2, 300))
    assert mask.tolist() == [True, True] and values.shape == (2, 80, 100)
    dataset = _load(root, [media_record("long", audio=["long.wav"]), media_record("short", audio=["a1.flac"])],
                    tokenizer, transforms={"audio": _audio(max_chunks=2)})
    assert dataset.report.long_items["audio"] == 1 and len(dataset) == 2


def test_audio_window_must_be_a_whole_number_of_frames():
    with pytest.raises(ValueError, match="chunk_seconds must be a positive multiple of 0.01 s"):
        AudioFeatures(chunk_seconds=0.0125)
    assert AudioFeatures(chunk_seconds=0.5).frames == 50


def test_video_frames_keep_order_pad_short_videos_and_sample_long_ones_uniformly(tmp_path):
    video = VideoFrames(NormalizeImage(32), num_frames=4)
    # natural order: 2 before 10, a README is not a frame
    colours = [(k * 20, 0, 0) for k in range(12)]
    directory = write_frames(tmp_path / "v", colours)
    (directory / "README.txt").write_text("not a frame")
    from lightning_moe.modalities import frame_files

    frames = frame_files(directory)
    assert [f.name for f in frames] == [f"{k}.png" for k in range(12)]
    values, mask = video(frames)
    assert video.select(12) == [0, 4, 7, 11] and mask.tolist() == [True] * 4
    red = (values[:, 0, 0, 0] + 1) / 2 * 255  # undo the (x - 0.5) / 0.5 normalisation
    assert red.round().tolist() == [0, 80, 140, 220]
    values, mask = video(frames[:3])
    assert mask.tolist() == [True, True, True, False] and not values[3].any()


# ----- the batch contract ------------------------------------------------------------------------


def test_image_audio_and_video_in_one_conversation_go_through_dataset_and_collate(root, tokenizer):
    rows = [
        media_record("all", image=["img.png"], audio=["a2.flac"], video=["v_rgb"]),
        media_record("text"),
        media_record("two-audio", audio=["a1.flac", "a2.flac"]),
        media_record("frames", video=[["v_w/1.png", "v_w/0.png"]], audio=["a1.flac"]),
    ]
    dataset = _load(root, rows, tokenizer)
    batch = collate_batch([dataset[i] for i in range(4)], pad_token_id=tokenizer.pad_token_id)
    assert batch["image_counts"].tolist() == [1, 0, 0, 0]
    assert batch["audio_counts"].tolist() == [1, 0, 2, 1] and batch["video_counts"].tolist() == [1, 0, 0, 1]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["audio_values"].shape == (4, 3, 80, 100) and batch["audio_values"].dtype == torch.float32
    # placeholder order across the batch: all's a2, two-audio's a1 then a2, frames' a1
    assert batch["audio_chunk_mask"].tolist() == [[True, True, False], [True, False, False],
                                                  [True, True, False], [True, False, False]]
    assert batch["audio_chunk_mask"].dtype == torch.bool
    assert torch.equal(batch["audio_values"][0], batch["audio_values"][2])  # the same clip, the same features
    assert batch["video_values"].shape == (2, 4, 3, 32, 32)
    assert batch["video_frame_mask"].tolist() == [[True, True, True, False], [True, True, False, False]]
    red = batch["video_values"][:, :, 0, 0, 0]
    # v_rgb in name order (red, green, blue); the frame list in ITS order (red, then white)
    assert red[0, :3].tolist() == [1, -1, -1] and batch["video_values"][1, :2, 1, 0, 0].tolist() == [-1, 1]
    for spec in modalities():
        token = tokenizer.convert_tokens_to_ids(spec.placeholder)
        assert (batch["input_ids"] == token).sum(1).tolist() == batch[spec.counts_key].tolist(), spec.name


def test_a_batch_without_a_modality_has_no_values_or_mask_for_it(root, tokenizer):
    dataset = _load(root, [media_record("text"), media_record("img", image=["img.png"])], tokenizer)
    batch = collate_batch([dataset[0], dataset[1]], pad_token_id=tokenizer.pad_token_id)
    for spec in (modality("audio"), modality("video")):
        assert spec.values_key not in batch and spec.mask_key not in batch
        assert batch[spec.counts_key].tolist() == [0, 0]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_a_flat_list_is_several_directories_or_the_frames_of_one_video(root, tokenizer):
    two = media_record("two", video=["v_rgb", "v_w"])
    two["conversations"][0]["value"] = "<video>\n<video>\nWhich way?"
    dataset = _load(root, [two, media_record("one", video=[["v_rgb/0.png", "v_rgb/2.png"]])], tokenizer)
    assert [len(v) for v in dataset.samples[0].media["video"]] == [3, 2]
    one_flat = media_record("flat", video=[["v_rgb/0.png", "v_rgb/2.png"]])
    one_flat["video"] = ["v_rgb/0.png", "v_rgb/2.png"]  # a flat list of files: ONE video
    assert [len(v) for v in _load(root, [one_flat], tokenizer).samples[0].media["video"]] == [2]
    mixed = {**one_flat, "id": "mixed", "video": ["v_rgb", "v_w/0.png"]}
    with pytest.raises(BadRecordError, match="'mixed': 'video' mixes directories and files"):
        _load(root, [mixed], tokenizer)


def test_datamodule_passes_audio_and_video_options_to_its_batches(root, tokenizer):
    write_jsonl(root / "train.jsonl", [media_record(f"r{k}", audio=["a2.flac"], video=["v_rgb"]) for k in range(3)])
    dm = DomainMixtureDataModule({"a": {"train": "train.jsonl"}}, root=str(root), tokenizer=tokenizer.name_or_path,
                                 batch_size=3, audio_n_mels=40, audio_chunk_seconds=0.5, audio_max_chunks=4,
                                 video_num_frames=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["audio_values"].shape == (3, 4, 40, 50) and batch["audio_chunk_mask"][0].tolist() == [True] * 3 + [False]
    assert batch["video_values"].shape == (3, 2, 3, 32, 32) and batch["video_frame_mask"].all()


# ----- bad audio and video: the same named errors and counted skips as images ----------------------


@pytest.fixture
def outside(tmp_path):
    write_audio(tmp_path / "outside" / "secret.flac", tone(0.5))
    write_frames(tmp_path / "outside" / "frames", [RED, GREEN])
    return tmp_path / "outside"


def _links(root, outside):
    os.symlink(outside / "secret.flac", root / "link.flac")
    os.symlink(outside / "frames", root / "linked_frames", target_is_directory=True)
    write_frames(root / "v_link", [RED])
    os.symlink(outside / "frames" / "0.png", root / "v_link" / "1.png")  # one frame inside leads out


BAD_MEDIA = {
    # id: (record, reason, words the message must contain)
    "audio-missing": (media_record("audio-missing", audio=["nope.flac"]), R.MISSING_FILE, "audio file 'nope.flac' not found"),
    "audio-garbage": (media_record("audio-garbage", audio=["garbage.flac"]), "unreadable_audio", "unreadable audio"),
    "audio-cut": (media_record("audio-cut", audio=["cut.flac"]), "unreadable_audio", "unreadable audio"),
    "audio-escape": (media_record("audio-escape", audio=["../outside/secret.flac"]), R.PATH_OUTSIDE_ROOT,
                     "audio path '../outside/secret.flac' leaves the dataset root"),
    "audio-link": (media_record("audio-link", audio=["link.flac"]), R.LINK_OUTSIDE_ROOT,
                   "audio path 'link.flac' is a symbolic link"),
    "audio-count": ({**media_record("audio-count", audio=["a1.flac", "a2.flac"]),
                     "conversations": media_record("x", audio=["a1.flac"])["conversations"]},
                    R.PLACEHOLDER_MISMATCH, "1 <audio> placeholder(s) in the text but 2 audio file(s)"),
    "video-missing": (media_record("video-missing", video=["no_dir"]), R.MISSING_FILE, "video path 'no_dir' not found"),
    "video-empty": (media_record("video-empty", video=["v_empty"]), R.MISSING_FILE, "'v_empty' holds no frame images"),
    "video-frame": (media_record("video-frame", video=["v_bad"]), "unreadable_video", "unreadable video"),
    "video-escape": (media_record("video-escape", video=["../outside/frames"]), R.PATH_OUTSIDE_ROOT,
                     "video path '../outside/frames' leaves the dataset root"),
    "video-link-dir": (media_record("video-link-dir", video=["linked_frames"]), R.LINK_OUTSIDE_ROOT,
                       "video path 'linked_frames' is a symbolic link"),
    "video-link-frame": (media_record("video-link-frame", video=["v_link"]), R.LINK_OUTSIDE_ROOT,
                         "video path 'v_link/1.png' is a symbolic link"),
    "video-count": ({**media_record("video-count"), "video": ["v_rgb", "v_w"]}, R.PLACEHOLDER_MISMATCH,
                    "0 <video> placeholder(s) in the text but 2 video(s)"),
}


@pytest.mark.parametrize("case", list(BAD_MEDIA))
def test_bad_audio_or_video_error_names_file_line_record_and_problem(root, outside, tokenizer, case):
    _links(root, outside)
    bad, reason, words = BAD_MEDIA[case]
    with pytest.raises(BadRecordError) as info:
        _load(root, [media_record("good", audio=["a1.flac"]), bad], tokenizer)
    message = str(info.value)
    assert info.value.reason == reason
    assert f"{root / 'd.jsonl'}:2:" in message and f"record {bad['id']!r}" in message and words in message


def test_skip_bad_records_counts_every_bad_audio_and_video_per_reason(root, outside, tokenizer):
    _links(root, outside)
    rows = [media_record("good1", audio=["a1.flac"]), *(bad for bad, _, _ in BAD_MEDIA.values()),
            media_record("good2", video=["v_rgb"])]
    dataset = _load(root, rows, tokenizer, skip_bad_records=True)
    assert [s.id for s in dataset.samples] == ["good1", "good2"]
    expected: dict[str, int] = {}
    for _, reason, _ in BAD_MEDIA.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert dataset.report.skipped == expected
    assert dataset.report.skipped == {R.MISSING_FILE: 3, "unreadable_audio": 2, "unreadable_video": 1,
                                      R.PATH_OUTSIDE_ROOT: 2, R.LINK_OUTSIDE_ROOT: 3, R.PLACEHOLDER_MISMATCH: 2}
    assert [r.id for r in dataset.report.skipped_records] == list(BAD_MEDIA)


def test_damaged_audio_and_video_found_while_loading_are_skipped_and_reported(root, tokenizer):
    rows = [media_record("a", audio=["a1.flac"]), media_record("bad-audio", audio=["cut.flac"]),
            media_record("bad-video", video=["v_bad"]), media_record("d", video=["v_rgb"])]
    strict = _load(root, rows, tokenizer, decode_media=False)
    with pytest.raises(BadRecordError, match=r"d.jsonl:2: record 'bad-audio': cannot decode .*cut.flac"):
        strict[1]
    with pytest.raises(BadRecordError, match=r"d.jsonl:3: record 'bad-video': cannot decode video of 2 frame"):
        strict[2]
    lenient = _load(root, rows, tokenizer, decode_media=False, skip_bad_records=True)
    item = lenient[1]
    assert item["id"] == "d"
    assert [(r["id"], r["reason"]) for r in item[SKIPPED_RECORDS]] == [("bad-audio", "unreadable_audio"),
                                                                       ("bad-video", "unreadable_video")]


def test_a_whisper_checkpoints_feature_extractor_loads_by_path(tmp_path):
    """`audio_processor`: a real checkpoint's extractor, saved locally, brings its own window and mel count."""
    WhisperFeatureExtractor(feature_size=64, chunk_length=2).save_pretrained(tmp_path / "whisper")
    audio = AudioFeatures(n_mels=80, chunk_seconds=1.0, max_chunks=2, processor=str(tmp_path / "whisper"))
    assert (audio.n_mels, audio.frames, audio.chunk_seconds) == (64, 200, 2.0)
    values, mask = audio(tone(3.0))
    assert values.shape == (2, 64, 200) and mask.tolist() == [True, True]
