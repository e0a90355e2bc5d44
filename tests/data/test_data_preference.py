"""Preference pairs: records validated like LLaVA records, only the answer labelled, pairs collated as
chosen rows then rejected rows, and the shipped pairs consistent with the shipped records."""

import pytest
import torch

from lightning_moe.data import PreferenceDataModule, PreferenceDataset, read_llava_records
from lightning_moe.data import synthetic as S
from lightning_moe.data.preference import collate_preference
from lightning_moe.tokens import IGNORE_INDEX
from tests.data.data_helpers import SHIPPED_DATA, write_image, write_jsonl


def pair(rid, chosen="yes", rejected="no", question="Is there a circle in the image?", image="img.png"):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"}],
            "chosen": chosen, "rejected": rejected}


@pytest.fixture
def root(tmp_path):
    write_image(tmp_path / "img.png")
    return tmp_path


def test_pairs_share_prompt_and_image_and_label_only_the_answer(root, tokenizer):
    path = write_jsonl(root / "pairs.jsonl", [pair("a"), pair("b", chosen={"from": "gpt", "value": "no"}, rejected="yes")])
    dataset = PreferenceDataset(path, root, tokenizer, domain="pope")
    chosen, rejected = dataset[0]
    assert chosen["answer"] == "yes" and rejected["answer"] == "no"
    assert torch.equal(chosen["prompt_ids"], rejected["prompt_ids"])
    assert chosen["pixel_values"] is rejected["pixel_values"]
    for sample in (chosen, rejected):
        trained = sample["labels"] != IGNORE_INDEX
        assert not trained[: len(sample["prompt_ids"])].any() and trained[len(sample["prompt_ids"]):].all()
        answer_ids = sample["input_ids"][trained][:-1]  # the answer, then the end-of-turn token
        assert tokenizer.decode(answer_ids) == sample["answer"]
    batch = collate_preference([dataset[0], dataset[1]], tokenizer.pad_token_id)
    assert batch["num_pairs"] == 2 and batch["answers"] == ["yes", "no", "no", "yes"]
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape == (4, 3, 32, 32)


MISSING = object()  # the key is left out of the record


@pytest.mark.parametrize("bad, problem", [
    ({"rejected": None}, "'rejected' must be a string or one assistant turn"),
    ({"chosen": {"from": "human", "value": "yes"}}, "'chosen' must be a string or one assistant turn"),
    ({"rejected": MISSING}, "needs 'chosen' and 'rejected'; missing \\['rejected'\\]"),
    ({"rejected": "yes"}, "'chosen' and 'rejected' are the same answer"),
    ({"chosen": ""}, "'chosen' is empty"),
    ({"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "x"}]},
     "must end with the human prompt"),
    ({"image": "../outside.png"}, "leaves the dataset root"),
])
def test_bad_pairs_are_errors_naming_file_line_and_record(root, tokenizer, bad, problem):
    record = {k: v for k, v in {**pair("p7"), **bad}.items() if v is not MISSING}
    path = write_jsonl(root / "pairs.jsonl", [pair("ok"), record])
    with pytest.raises(ValueError, match=rf"pairs.jsonl:2: record 'p7':.*{problem}"):
        PreferenceDataset(path, root, tokenizer)


def test_bad_pairs_can_be_skipped_and_counted(root, tokenizer):
    path = write_jsonl(root / "pairs.jsonl", [pair("ok"), pair("same", rejected="yes")])
    dataset = PreferenceDataset(path, root, tokenizer, skip_bad_records=True)
    assert len(dataset) == 1 and dataset.report.skipped == {"malformed_record": 1}


def test_shipped_pairs_follow_the_shipped_records():
    for domain in S.SHIPPED_DOMAINS:
        info = S.DOMAINS[domain]
        for split in S.SPLITS:
            records = read_llava_records(SHIPPED_DATA / domain / f"{split}.jsonl")
            pairs = read_llava_records(SHIPPED_DATA / S.PREFERENCE_DIR / domain / f"{split}.jsonl")
            assert len(pairs) == len(records)
            for record, p in zip(records, pairs):
                assert (p["id"], p["image"], p["conversations"]) == (record["id"], record["image"], record["conversations"][:-1])
                assert p["chosen"] == record["conversations"][-1]["value"]
                assert p["rejected"] != p["chosen"] and p["rejected"] in info.answers
    pope = read_llava_records(SHIPPED_DATA / S.PREFERENCE_DIR / "pope" / "train.jsonl")
    assert all({p["chosen"], p["rejected"]} == {"yes", "no"} for p in pope)


def test_preference_datamodule_trains_on_pairs_and_evaluates_on_records(tokenizer):
    data = PreferenceDataModule({"pope": {"train": "preference/pope/val.jsonl", "val": "pope/val.jsonl"}},
                                root=str(SHIPPED_DATA), batch_size=3, max_eval_samples_per_domain=5)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["num_pairs"] == 3 and len(batch["answers"]) == 6
    assert all(c != r for c, r in zip(batch["answers"][:3], batch["answers"][3:]))
    (val,) = data.val_dataloader()
    assert "num_pairs" not in next(iter(val)) and len(val.dataset) == 5
