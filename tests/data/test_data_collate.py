"""collate_batch: right padding for training, left padding for generation prompts, images in placeholder order."""

import torch
from tests.data.data_helpers import record, write_image, write_jsonl

from lightning_moe.data import LlavaDataset, collate_batch
from lightning_moe.tokens import IGNORE_INDEX


def _dataset(tmp_path, tokenizer):
    write_image(tmp_path / "a.png", (255, 0, 0))
    write_image(tmp_path / "b.png", (0, 255, 0))
    write_image(tmp_path / "c.png", (0, 0, 255))
    rows = [
        record("short", images=("a.png",)),
        record("text", question="Where is the red shape?", answer="top left", images=()),
        record("two-images", question="What colour is the shape at the top left?", images=("b.png", "c.png")),
    ]
    return LlavaDataset(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path, tokenizer, domain="d")


def test_collate_pads_right_for_training_and_left_for_prompts(tmp_path, tokenizer):
    dataset = _dataset(tmp_path, tokenizer)
    samples = [dataset[i] for i in range(3)]
    batch = collate_batch(samples, pad_token_id=tokenizer.pad_token_id)
    lengths = [len(s["input_ids"]) for s in samples]
    B, T = 3, max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (B, T)
    assert batch["input_ids"].dtype == torch.long
    for i, (sample, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][i, :n], sample["input_ids"])
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (T - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        # prompts: left padded, the real tokens flush right where generation continues.
        p = len(sample["prompt_ids"])
        P = batch["prompt_input_ids"].shape[1]
        assert torch.equal(batch["prompt_input_ids"][i, P - p :], sample["prompt_ids"])
        assert (batch["prompt_input_ids"][i, : P - p] == tokenizer.pad_token_id).all()
        assert batch["prompt_attention_mask"][i].tolist() == [0] * (P - p) + [1] * p
    assert batch["answers"] == ["two", "top left", "two"]
    assert batch["domain"] == ["d"] * 3 and batch["id"] == ["short", "text", "two-images"]


def test_collate_stacks_images_in_placeholder_order(tmp_path, tokenizer):
    dataset = _dataset(tmp_path, tokenizer)
    batch = collate_batch([dataset[i] for i in range(3)], pad_token_id=tokenizer.pad_token_id)
    assert batch["image_counts"].tolist() == [1, 0, 2]
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    # red, green, blue images normalised with mean = std = 0.5: the bright channel is +1, the others -1.
    assert batch["pixel_values"][:, :, 0, 0].tolist() == [[1, -1, -1], [-1, 1, -1], [-1, -1, 1]]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [1, 0, 2]


def test_text_only_batch_has_no_pixel_values(tmp_path, tokenizer):
    dataset = _dataset(tmp_path, tokenizer)
    batch = collate_batch([dataset[1]], pad_token_id=tokenizer.pad_token_id)
    assert "pixel_values" not in batch and batch["image_counts"].tolist() == [0]
