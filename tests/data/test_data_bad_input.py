"""Bad input: every problem raises an error naming file, line / record id and problem, or, with
skip_bad_records, is skipped and counted per reason; truncation and answerless samples are counted."""

import json

import pytest

from lightning_moe.data import BadRecordError, DomainMixtureDataModule, LlavaDataset, read_llava_records
from lightning_moe.data import records as R
from tests.data.data_helpers import record, write_image, write_jsonl


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    write_image(root / "img.png")
    (root / "garbage.png").write_bytes(b"this is not a png")
    png = (root / "img.png").read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    write_image(tmp_path / "outside.png")  # exists, but outside the root
    return root


def _load(root, rows, **kwargs):
    return LlavaDataset(write_jsonl(root / "d.jsonl", rows), root, kwargs.pop("tokenizer"), **kwargs)


BAD_RECORDS = {
    # reason: (record, words the message must contain)
    R.MISSING_FILE: (record("r-missing", images=("nope.png",)), "'nope.png' not found"),
    R.UNREADABLE_IMAGE: (record("r-garbage", images=("garbage.png",)), "unreadable image"),
    R.PATH_OUTSIDE_ROOT: (record("r-escape", images=("../outside.png",)), "leaves the dataset root"),
    R.NO_ASSISTANT_TURN: (
        {"id": "r-noanswer", "image": "img.png", "conversations": [{"from": "human", "value": "<image>\nHow many?"}]},
        "no assistant",
    ),
    R.PLACEHOLDER_MISMATCH: (
        {**record("r-more"), "conversations": record("x", images=("a", "b"))["conversations"]},
        "2 <image> placeholder(s) in the text but 1 image file(s)",
    ),
    R.MALFORMED_RECORD: ({"id": "r-noconv", "image": "img.png"}, "'conversations' must be a non-empty list"),
}


@pytest.mark.parametrize("reason", list(BAD_RECORDS))
def test_bad_record_error_names_file_line_record_and_problem(root, tokenizer, reason):
    bad, words = BAD_RECORDS[reason]
    with pytest.raises(BadRecordError) as info:
        _load(root, [record("good"), bad], tokenizer=tokenizer)
    message = str(info.value)
    assert info.value.reason == reason
    assert f"{root / 'd.jsonl'}:2:" in message and f"record {bad['id']!r}" in message and words in message


def test_fewer_placeholders_than_images(root, tokenizer):
    bad = {**record("r-fewer", images=("img.png", "img.png")), "conversations": record("x")["conversations"]}
    with pytest.raises(BadRecordError, match=r"'r-fewer': 1 <image> placeholder\(s\) in the text but 2 image"):
        _load(root, [bad], tokenizer=tokenizer)


def test_truncated_png_and_absolute_path_are_rejected(root, tokenizer):
    with pytest.raises(BadRecordError, match="'r-cut': unreadable image"):
        _load(root, [record("r-cut", images=("cut.png",))], tokenizer=tokenizer)
    outside = str(root.parent / "outside.png")
    with pytest.raises(BadRecordError, match="'r-abs': image path .* leaves the dataset root"):
        _load(root, [record("r-abs", images=(outside,))], tokenizer=tokenizer)


def test_malformed_json_line_names_file_and_line(root, tokenizer):
    path = write_jsonl(root / "d.jsonl", [record("good"), '{"id": "broken", "conversations": [', record("good2")])
    with pytest.raises(BadRecordError, match=rf"{path}:2: malformed JSON"):
        read_llava_records(path)
    with pytest.raises(BadRecordError, match=rf"{path}:2: malformed JSON"):
        LlavaDataset(path, root, tokenizer)


def test_malformed_json_file_names_file_and_line(root, tokenizer):
    path = root / "d.json"
    path.write_text(json.dumps([record("good")], indent=1)[:-3] + "\n oops", encoding="utf-8")
    with pytest.raises(BadRecordError, match=rf"{path}:\d+: malformed JSON"):
        LlavaDataset(path, root, tokenizer)


def test_json_list_files_are_read_like_jsonl(root, tokenizer):
    path = root / "d.json"
    path.write_text(json.dumps([record("a"), record("b")]), encoding="utf-8")
    assert [r["id"] for r in read_llava_records(path)] == ["a", "b"]
    assert len(LlavaDataset(path, root, tokenizer)) == 2


def test_skip_bad_records_skips_counts_per_reason_and_keeps_the_good_ones(root, tokenizer):
    rows = [record("good1"), *(bad for bad, _ in BAD_RECORDS.values()), "{not json", record("good2")]
    dataset = _load(root, rows, tokenizer=tokenizer, skip_bad_records=True)
    assert [s.id for s in dataset.samples] == ["good1", "good2"]
    report = dataset.report.as_dict()
    assert report["records"] == len(rows) and report["kept"] == 2
    assert report["skipped"] == {reason: 1 for reason in BAD_RECORDS} | {R.MALFORMED_JSON: 1}
    # every skipped record is kept (not only the first few), with its file, line, id and reason
    assert [(r.line, r.reason) for r in dataset.report.skipped_records] == [
        (i + 2, reason) for i, reason in enumerate([*BAD_RECORDS, R.MALFORMED_JSON])
    ]


def test_long_samples_are_truncated_and_answerless_ones_skipped_and_counted(root, tokenizer):
    long_answer = record("long", answer="one two three four " * 4)
    long_question = record("no-answer", question="How many shapes are there? " * 10)
    dataset = _load(root, [record("ok"), long_answer, long_question], tokenizer=tokenizer, max_length=20)
    assert [s.id for s in dataset.samples] == ["ok", "long"]
    assert len(dataset.samples[1].input_ids) == 20
    assert dataset.report.truncated == 1 and dataset.report.no_answer_tokens == 1


def test_truncation_that_cuts_an_image_placeholder_skips_and_counts(root, tokenizer):
    row = {
        "id": "two-images",
        "image": ["img.png", "img.png"],
        "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes are there?"},
            {"from": "gpt", "value": "two"},
            {"from": "human", "value": "<image>\nIs there a circle in the image?"},
            {"from": "gpt", "value": "yes"},
        ],
    }
    # "<s> <|user|> <image> how many shapes are there ? <|end|> <|assistant|> two <|end|>" is 13 tokens,
    # then "<|user|> <image>": max_length = 14 cuts the second placeholder, which would leave an image unmatched.
    dataset = _load(root, [record("ok"), row], tokenizer=tokenizer, max_length=14)
    assert [s.id for s in dataset.samples] == ["ok"]
    assert dataset.report.cut_placeholders == 1 and dataset.report.truncated == 0
    assert len(_load(root, [row], tokenizer=tokenizer, max_length=15)) == 1  # both placeholders fit


def test_image_after_the_last_answer_is_rejected(root, tokenizer):
    row = record("late-image")
    row["conversations"].append({"from": "human", "value": "<image>\nAnd this one?"})
    row["image"] = ["img.png", "img.png"]
    with pytest.raises(BadRecordError, match="'late-image': 2 image.*1 before the last answer"):
        _load(root, [row], tokenizer=tokenizer)


def test_datamodule_reports_at_setup_or_raises_early(root, tokenizer):
    write_jsonl(root / "good.jsonl", [record("g1"), record("g2")])
    write_jsonl(root / "bad.jsonl", [record("g3"), record("r-missing", images=("nope.png",))])
    domains = {"a": {"train": "good.jsonl", "val": "bad.jsonl"}}
    strict = DomainMixtureDataModule(domains, root=str(root), tokenizer=tokenizer.name_or_path)
    with pytest.raises(BadRecordError, match="bad.jsonl:2: record 'r-missing'"):
        strict.setup("fit")  # eager: the validation split fails at setup, not in a worker
    lenient = DomainMixtureDataModule(domains, root=str(root), tokenizer=tokenizer.name_or_path, skip_bad_records=True)
    with pytest.warns(UserWarning, match="skipped or truncated in val/a"):
        lenient.setup("fit")
    assert lenient.data_report["val"]["a"]["skipped"] == {R.MISSING_FILE: 1}
    assert lenient.data_report["train"]["a"]["kept"] == 2
