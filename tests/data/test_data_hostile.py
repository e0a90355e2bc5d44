"""Hostile records: no record can stall setup (turn and character limits), every record that cannot be read is
named (file, line, id, reason) and counted under skip_bad_records, duplicate ids are counted or refused, and a
DataModule refuses impossible settings in one line."""

import json
import os

import pytest

from lightning_moe.cli import main
from lightning_moe.data import BadRecordError, DataError, DomainMixtureDataModule, LlavaDataset
from lightning_moe.data import records as R
from tests.conftest import ROOT
from tests.data.data_helpers import media_record, record, write_frames, write_image, write_jsonl


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    write_image(root / "img.png")
    (root / "folder.png").mkdir()
    os.mkfifo(root / "pipe.png")  # opening it to decode would block setup for ever
    write_frames(root / "clip", [(0, 0, 0), (255, 255, 255)])
    os.mkfifo(root / "clip" / "2.png")
    return root


def _load(root, rows, tokenizer, **kwargs):
    return LlavaDataset(write_jsonl(root / "d.jsonl", rows), root, tokenizer, **kwargs)


def _long_record(rid: str, turns: int) -> dict:
    return {"id": rid, "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": f"turn {i}"}
                                         for i in range(turns)]}


HOSTILE = {
    # id: (record, reason, words the problem must contain)
    "turns": (_long_record("turns", 10_000), R.TOO_MANY_TURNS, "10000 turns, more than max_turns=1000"),
    "characters": (record("characters", question="x" * 2_000_000, images=()), R.TOO_MANY_CHARACTERS,
                   "more than max_characters=1000000"),
    "nul": (record("nul", images=("img\0.png",)), R.INVALID_PATH, "holds a NUL byte"),
    "long-name": (record("long-name", images=("a" * 5000 + ".png",)), R.INVALID_PATH, "(5004 characters) cannot be read: File name too long"),
    "directory": (record("directory", images=("folder.png",)), R.NOT_A_FILE, "'folder.png' is not a regular file"),
    "fifo": (record("fifo", images=("pipe.png",)), R.NOT_A_FILE, "'pipe.png' is not a regular file"),
    "fifo-frame": (media_record("fifo-frame", video=["clip"]), R.NOT_A_FILE, "video frame 'clip/2.png' is not a regular"),
}


@pytest.mark.parametrize("rid", list(HOSTILE))
def test_hostile_record_stops_setup_naming_file_line_record_and_reason(root, tokenizer, rid):
    bad, reason, words = HOSTILE[rid]
    with pytest.raises(BadRecordError) as info:
        _load(root, [record("good"), bad], tokenizer)
    assert info.value.reason == reason
    assert f"{root / 'd.jsonl'}:2: record {rid!r}" in str(info.value) and words in str(info.value)
    assert len(str(info.value)) < 1000  # a 5,000-character name is shown cut


def test_hostile_records_are_skipped_named_and_counted(root, tokenizer):
    rows = [record("good"), *(bad for bad, _, _ in HOSTILE.values()), record("good-too")]
    dataset = _load(root, rows, tokenizer, skip_bad_records=True)
    assert [s.id for s in dataset.samples] == ["good", "good-too"]
    assert dataset.report.skipped == {R.TOO_MANY_TURNS: 1, R.TOO_MANY_CHARACTERS: 1, R.INVALID_PATH: 2, R.NOT_A_FILE: 3}
    assert [(r.line, r.id, r.reason) for r in dataset.report.skipped_records] == [
        (k + 2, rid, reason) for k, (rid, (_, reason, _)) in enumerate(HOSTILE.items())]


def test_a_ten_thousand_turn_record_trains_when_the_limit_allows_it(root, tokenizer):
    dataset = _load(root, [_long_record("long", 10_000)], tokenizer, max_turns=None, max_length=64)
    assert len(dataset) == 1 and dataset.report.truncated == 1
    assert dataset.samples[0].answer == "turn 9999"  # the last answer is the evaluation reference


def _latin1_jsonl(path, rows):
    lines = [json.dumps(r).encode() for r in rows]
    lines[1] = lines[1].replace(b"two", b"caf\xe9")  # Latin-1 "é": not UTF-8
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, len(lines[0]) + 1 + lines[1].index(b"\xe9")


def test_a_jsonl_line_that_is_not_utf8_is_a_bad_record_named_with_its_byte_offset(root, tokenizer):
    path, offset = _latin1_jsonl(root / "d.jsonl", [record("a"), record("latin"), record("b")])
    with pytest.raises(BadRecordError) as info:
        LlavaDataset(path, root, tokenizer)
    assert info.value.reason == R.INVALID_UTF8
    assert f"{path}:2: not UTF-8 at byte offset {offset}" in str(info.value)
    dataset = LlavaDataset(path, root, tokenizer, skip_bad_records=True)
    assert [s.id for s in dataset.samples] == ["a", "b"] and dataset.report.skipped == {R.INVALID_UTF8: 1}


def test_a_json_file_that_is_not_utf8_stops_naming_the_file_and_offset_even_when_skipping(root, tokenizer):
    path = root / "d.json"
    text = json.dumps([record("a"), record("latin")], indent=1).encode()
    path.write_bytes(text.replace(b"two", b"caf\xe9", 2))
    offset = text.index(b"two") + 3
    with pytest.raises(BadRecordError, match=f"d.json:.*not UTF-8 at byte offset {offset}") as info:
        LlavaDataset(path, root, tokenizer, skip_bad_records=True)
    assert info.value.reason == R.INVALID_UTF8


def test_duplicate_ids_are_kept_and_counted_or_refused(root, tokenizer):
    rows = [record("a"), record("b"), record("a"), record("a")]
    kept = _load(root, rows, tokenizer)
    assert len(kept) == 4 and kept.report.duplicate_ids == 2
    with pytest.raises(BadRecordError, match=r"d.jsonl:3: record 'a': the id of an earlier record \(.*d.jsonl:1\)"):
        _load(root, rows, tokenizer, duplicate_ids="error")
    skipped = _load(root, rows, tokenizer, duplicate_ids="error", skip_bad_records=True)
    assert [s.id for s in skipped.samples] == ["a", "b"] and skipped.report.skipped == {R.DUPLICATE_ID: 2}


def _shared_ids(root, tokenizer, **kwargs) -> DomainMixtureDataModule:
    """Domain a: train x, y and test y, z; domain b: train x, w and val w, v: x is in two domains' train, y in
    a's train and test (a leak), w in b's train and val."""
    write_jsonl(root / "a_train.jsonl", [record("x"), record("y")])
    write_jsonl(root / "a_test.jsonl", [record("y"), record("z")])
    write_jsonl(root / "b_train.jsonl", [record("x"), record("w")])
    write_jsonl(root / "b_val.jsonl", [record("w"), record("v")])
    domains = {"a": {"train": "a_train.jsonl", "test": "a_test.jsonl"}, "b": {"train": "b_train.jsonl", "val": "b_val.jsonl"}}
    return DomainMixtureDataModule(domains, root=str(root), tokenizer=tokenizer.name_or_path, **kwargs)


def test_ids_shared_across_splits_and_domains_are_counted_in_the_data_report(root, tokenizer):
    dm = _shared_ids(root, tokenizer)
    with pytest.warns(UserWarning, match=r"records in train/b, val/b have the id of a record of another split"):
        dm.setup("fit")
    across = {(split, name): r["duplicate_ids_across"] for split, domains in dm.data_report.items()
              for name, r in domains.items()}
    assert across == {("train", "a"): 0, ("train", "b"): 1, ("val", "b"): 1}
    with pytest.warns(UserWarning, match=r"records in test/a have the id"):  # y: in a's train, a leak into test
        dm.setup("test")
    assert dm.data_report["test"]["a"]["duplicate_ids_across"] == 1 and dm.data_report["test"]["a"]["kept"] == 2
    assert dm.data_report["train"]["b"]["duplicate_ids_across"] == 1  # counted once, not again at the next setup


def test_ids_shared_across_splits_and_domains_are_refused_or_skipped_with_duplicate_ids_error(root, tokenizer):
    with pytest.raises(BadRecordError, match=r"b_train.jsonl:1: record 'x': the id of a record of train/a "
                                             r"\(\S*a_train.jsonl:1\); ids must be unique across") as info:
        _shared_ids(root, tokenizer, duplicate_ids="error").setup("fit")
    assert info.value.reason == R.DUPLICATE_ID
    dm = _shared_ids(root, tokenizer, duplicate_ids="error", skip_bad_records=True)
    with pytest.warns(UserWarning, match="skipped or truncated in train/b, val/b"):
        dm.setup("fit")
    dm.setup("test")
    kept = {f"{split}/{name}": [s.id for s in d.samples] for split, ds in dm.datasets.items() for name, d in ds.items()}
    assert kept == {"train/a": ["x", "y"], "train/b": ["w"], "val/b": ["v"], "test/a": ["z"]}
    assert dm.data_report["train"]["b"]["skipped"] == {R.DUPLICATE_ID: 1} and dm.data_report["train"]["b"]["kept"] == 1
    assert [(r["split"], r["id"], r["reason"]) for r in dm.skip_log.records] == [
        ("train", "x", R.DUPLICATE_ID), ("val", "w", R.DUPLICATE_ID), ("test", "y", R.DUPLICATE_ID)]


def test_datamodule_counts_hostile_records_in_its_report_and_sets_up(root, tokenizer):
    write_jsonl(root / "train.jsonl", [record("t1"), record("t1"), HOSTILE["nul"][0], HOSTILE["turns"][0]])
    _latin1_jsonl(root / "val.jsonl", [record("v1"), record("v2"), record("v3")])
    domains = {"a": {"train": "train.jsonl", "val": "val.jsonl"}}
    dm = DomainMixtureDataModule(domains, root=str(root), tokenizer=tokenizer.name_or_path, skip_bad_records=True)
    with pytest.warns(UserWarning, match="skipped or truncated in train/a, val/a"):
        dm.setup("fit")
    train, val = dm.data_report["train"]["a"], dm.data_report["val"]["a"]
    assert train["skipped"] == {R.INVALID_PATH: 1, R.TOO_MANY_TURNS: 1} and train["duplicate_ids"] == 1
    assert val["skipped"] == {R.INVALID_UTF8: 1} and val["kept"] == 2
    assert {(r["line"], r["reason"]) for r in dm.skip_log.records} == {(3, R.INVALID_PATH), (4, R.TOO_MANY_TURNS),
                                                                       (2, R.INVALID_UTF8)}
    assert len(next(iter(dm.train_dataloader()))["id"]) == 2


@pytest.mark.parametrize("rows, why", [
    ([], "its data files hold no records"),
    ([record("x", images=("nope.png",)), record("y", images=("img\0.png",))],
     "all 2 records of .* were skipped as bad \\(invalid_path=1, missing_file=1\\); the first: .*train.jsonl:1: "
     "record 'x'"),
])
def test_a_training_domain_without_usable_samples_says_why(root, tokenizer, rows, why):
    write_jsonl(root / "train.jsonl", rows)
    dm = DomainMixtureDataModule({"shapes": {"train": "train.jsonl"}}, root=str(root),
                                 tokenizer=tokenizer.name_or_path, skip_bad_records=True)
    with pytest.raises(DataError, match=f"domain 'shapes' has no usable train samples: {why}"):
        dm.setup("fit")


@pytest.mark.parametrize("key, value", [("batch_size", -3), ("eval_batch_size", 0), ("max_length", 0),
                                        ("num_workers", -1), ("samples_per_epoch", 0), ("max_turns_per_record", 0)])
def test_an_impossible_datamodule_setting_is_one_line_naming_it(tmp_path, capsys, monkeypatch, key, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--data.init_args.{key}={value}"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Namespace(" not in err
    message = err[err.index("error: "):]
    assert message.startswith(f"error: {key} must be") and f"got {value}" in message.splitlines()[0]


def test_a_data_file_that_is_a_fifo_or_a_directory_is_named_not_read(root, tokenizer):
    os.mkfifo(root / "pipe.jsonl")
    for name in ("pipe.jsonl", "folder.png"):
        with pytest.raises(FileNotFoundError, match=f"LLaVA data file is not a regular file: .*{name}"):
            LlavaDataset(root / name, root, tokenizer, skip_bad_records=True)


@pytest.mark.parametrize("rows, words, extra", [
    ([], "domain 'shapes' has no usable train samples: its data files hold no records", []),
    ([record("x", images=("img\0.png",))], "train.jsonl:1: record 'x'", []),  # a bad record, not skipped
    ([record("v")], "val.jsonl:1: record 'v': the id of a record of train/shapes", ["--data.init_args.duplicate_ids=error"]),
], ids=["empty", "bad-record", "id-in-train-and-val"])
def test_a_data_error_at_setup_is_one_line_through_the_cli(root, tmp_path, capsys, monkeypatch, rows, words, extra):
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "val.jsonl", [record("v")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--data.init_args.root={root}",
              '--data.init_args.domains={"shapes": {"train": "train.jsonl", "val": "val.jsonl"}}',
              "--trainer.max_steps=1", "--trainer.logger=false", *extra])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert words in err[err.index("error: "):].splitlines()[0]


def test_the_documentation_lists_every_reason():
    reasons = {value for name, value in vars(R).items() if name.isupper() and isinstance(value, str)}  # the constants
    assert R.DUPLICATE_ID in reasons and R.UNREADABLE_IMAGE in reasons and len(reasons) == 15
    table = (ROOT / "docs/data_validation.md").read_text()
    assert sorted(r for r in reasons if f"| `{r}` |" not in table) == []
    assert "`unreadable_<modality>`" in table  # the other modalities' unreadable reasons
