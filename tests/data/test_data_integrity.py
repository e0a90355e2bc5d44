"""Data that cannot escape the root or crash a run: media decoded in full at setup, symbolic links
resolved, every skipped record listed in the run's folder, a sample that fails to decode while
training skipped and counted, and domain weights refused when the config is parsed."""

import json
import math
import os

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from lightning_moe.data import BadRecordError, DomainMixtureDataModule, DomainSpec, LlavaDataset
from lightning_moe.data import records as R
from lightning_moe.data.dataset import SKIPPED_RECORDS
from lightning_moe.data.preference import PreferenceDataset, collate_preference
from lightning_moe.data.skips import FILE_NAME, SkipLog
from tests.data.data_helpers import record, write_broken_zlib_png, write_image, write_jsonl, write_truncated_jpeg


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "root"
    for k in range(6):
        write_image(root / f"img{k}.png", colour=(40 * k, 0, 0))
    write_truncated_jpeg(root / "cut.jpg")
    write_broken_zlib_png(root / "broken.png")
    return root


def _load(root, rows, tokenizer, **kwargs):
    return LlavaDataset(write_jsonl(root / "d.jsonl", rows), root, tokenizer, **kwargs)


# ----- damaged images: decoded in full at setup ----------------------------------------------------------


@pytest.mark.parametrize("name", ["cut.jpg", "broken.png"])
def test_images_that_pass_verify_but_not_decoding_are_refused_at_setup(root, tokenizer, name):
    with Image.open(root / name) as image:
        image.verify()  # the header check the data layer used to rely on accepts both files
    rows = [record("good", images=("img0.png",)), record("bad", images=(name,))]
    with pytest.raises(BadRecordError, match=rf"d.jsonl:2: record 'bad': unreadable image .*{name}") as info:
        _load(root, rows, tokenizer)
    assert info.value.reason == R.UNREADABLE_IMAGE
    lenient = _load(root, rows, tokenizer, skip_bad_records=True)
    assert [s.id for s in lenient.samples] == ["good"]
    assert lenient.report.skipped == {R.UNREADABLE_IMAGE: 1}


def test_deferred_decoding_leaves_damaged_images_to_loading(root, tokenizer):
    rows = [record("good", images=("img0.png",)), record("bad", images=("cut.jpg",))]
    dataset = _load(root, rows, tokenizer, decode_media=False)
    assert len(dataset) == 2  # existence and place are checked, the pixels are not
    with pytest.raises(BadRecordError, match=r"d.jsonl:2: record 'bad': cannot decode .*cut.jpg"):
        dataset[1]


def test_a_sample_that_fails_to_decode_is_replaced_by_the_next_and_reported(root, tokenizer):
    rows = [record("a", images=("img0.png",)), record("bad", images=("broken.png",)), record("c", images=("img2.png",))]
    dataset = _load(root, rows, tokenizer, decode_media=False, skip_bad_records=True)
    item = dataset[1]
    assert item["id"] == "c"
    assert item[SKIPPED_RECORDS] == [{
        "file": str(root / "d.jsonl"), "line": 2, "id": "bad", "reason": R.UNREADABLE_IMAGE,
        "problem": item[SKIPPED_RECORDS][0]["problem"], "domain": "default",
    }]  # fmt: skip
    assert "broken.png" in item[SKIPPED_RECORDS][0]["problem"]
    assert SKIPPED_RECORDS not in dataset[0]


def test_only_damaged_samples_raise_instead_of_looping(root, tokenizer):
    rows = [record("bad1", images=("broken.png",)), record("bad2", images=("cut.jpg",))]
    dataset = _load(root, rows, tokenizer, decode_media=False, skip_bad_records=True)
    with pytest.raises(RuntimeError, match=r"2 consecutive samples of domain 'default' failed to decode.*'bad1'"):
        dataset[0]


def test_preference_pair_with_a_damaged_image_is_replaced_and_reported(root, tokenizer):
    def pair(rid, image):
        return {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nIs there a circle?"}],
                "chosen": "yes", "rejected": "no"}

    path = write_jsonl(root / "p.jsonl", [pair("p0", "img0.png"), pair("bad", "cut.jpg"), pair("p2", "img2.png")])
    dataset = PreferenceDataset(path, root, tokenizer, decode_media=False, skip_bad_records=True)
    batch = collate_preference([dataset[0], dataset[1]], tokenizer.pad_token_id)
    assert batch["id"] == ["p0", "p2", "p0", "p2"] and batch["num_pairs"] == 2
    assert [(r["id"], r["reason"]) for r in batch[SKIPPED_RECORDS]] == [("bad", R.UNREADABLE_IMAGE)]


# ----- symbolic links: the real path must stay under the root ------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A folder beside the root, with an image in it."""
    write_image(tmp_path / "outside" / "secret.png")
    return tmp_path / "outside"


def test_symlinked_file_leading_out_of_the_root_is_refused(root, outside, tokenizer):
    os.symlink(outside / "secret.png", root / "link.png")
    with pytest.raises(BadRecordError, match=r"record 'r-link': image path 'link.png' is a symbolic link") as info:
        _load(root, [record("r-link", images=("link.png",))], tokenizer)
    assert info.value.reason == R.LINK_OUTSIDE_ROOT and str(outside / "secret.png") in str(info.value)


def test_symlinked_directory_leading_out_of_the_root_is_refused(root, outside, tokenizer):
    os.symlink(outside, root / "linked_dir", target_is_directory=True)
    with pytest.raises(BadRecordError, match=r"record 'r-dir': image path 'linked_dir/secret.png' is a symbolic link") as info:
        _load(root, [record("r-dir", images=("linked_dir/secret.png",))], tokenizer)
    assert info.value.reason == R.LINK_OUTSIDE_ROOT


def test_symlink_to_a_system_file_is_never_opened(root, tokenizer, monkeypatch):
    os.symlink("/etc/passwd", root / "passwd.png")
    opened = []
    monkeypatch.setattr(Image, "open", lambda f, *a, **k: opened.append(f))
    dataset = _load(root, [record("r-passwd", images=("passwd.png",))], tokenizer, skip_bad_records=True)
    assert dataset.report.skipped == {R.LINK_OUTSIDE_ROOT: 1} and opened == []


def test_links_inside_the_root_and_a_linked_root_are_followed(root, tokenizer, tmp_path):
    os.symlink(root / "img1.png", root / "alias.png")
    dataset = _load(root, [record("r-alias", images=("alias.png",))], tokenizer)
    assert dataset.samples[0].media["image"] == [(root / "img1.png").resolve()]  # reads open the checked file
    os.symlink(root, tmp_path / "root_link", target_is_directory=True)
    linked = LlavaDataset(root / "d.jsonl", tmp_path / "root_link", tokenizer)
    assert len(linked) == 1


def test_data_files_named_in_the_config_may_live_outside_the_root(root, tokenizer, tmp_path):
    """The config is trusted, records are not: images elsewhere work with the root set to their folder."""
    data_file = write_jsonl(tmp_path / "elsewhere" / "train.jsonl", [record("r0", images=("img0.png",))])
    dm = DomainMixtureDataModule({"a": {"train": str(data_file)}}, root=str(root), tokenizer=tokenizer.name_or_path)
    dm.setup("fit")
    assert dm.datasets["train"]["a"].samples[0].media["image"] == [(root / "img0.png").resolve()]


# ----- the skip report: counts per reason, and every record in the run's folder ------------------------


class TinyModel(L.LightningModule):
    """Just enough to run the data through a Trainer: one weight, fed the mean pixel of each batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.batches: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.batches.append({"id": list(batch["id"]), "keys": set(batch)})
        return (self.w - batch["pixel_values"].mean()) ** 2

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, **kwargs):
    return L.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), accelerator="cpu",
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _read_skip_file(trainer):
    path = os.path.join(trainer.log_dir, FILE_NAME)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_skipped_record_is_written_to_the_run_folder_and_counted_per_reason(root, tokenizer, tmp_path, caplog):
    missing = [record(f"m{k}", images=(f"nope{k}.png",)) for k in range(6)]
    write_jsonl(root / "val.jsonl", [record("v0", images=("img0.png",)), *missing, record("bad", images=("cut.jpg",))])
    dm = DomainMixtureDataModule({"a": {"val": "val.jsonl"}}, root=str(root), tokenizer=tokenizer.name_or_path,
                                 skip_bad_records=True)
    trainer = _trainer(tmp_path)
    with caplog.at_level("INFO"), pytest.warns(UserWarning, match="skipped or truncated in val/a"):
        trainer.validate(TinyModel(), datamodule=dm)
    written = _read_skip_file(trainer)
    # all 7, not the first five, each with file, line, id and reason
    assert [(r["file"], r["line"], r["id"], r["reason"]) for r in written] == [
        *((str(root / "val.jsonl"), k + 2, f"m{k}", R.MISSING_FILE) for k in range(6)),
        (str(root / "val.jsonl"), 8, "bad", R.UNREADABLE_IMAGE),
    ]
    assert {(r["split"], r["domain"], r["stage"]) for r in written} == {("val", "a", "setup")}
    report = caplog.text
    assert f"skipped {R.MISSING_FILE}=6, {R.UNREADABLE_IMAGE}=1" in report
    assert os.path.join(trainer.log_dir, FILE_NAME) in report


def test_a_clean_run_writes_no_skip_file(root, tokenizer, tmp_path):
    write_jsonl(root / "val.jsonl", [record("v0", images=("img0.png",))])
    dm = DomainMixtureDataModule({"a": {"val": "val.jsonl"}}, root=str(root), tokenizer=tokenizer.name_or_path)
    trainer = _trainer(tmp_path)
    trainer.validate(TinyModel(), datamodule=dm)
    assert not os.path.exists(os.path.join(trainer.log_dir, FILE_NAME))


def test_skip_log_other_ranks_list_only_what_they_skipped_while_loading(tmp_path):
    log = SkipLog()
    log.set_directory(tmp_path, rank=1)
    log.add([{"file": "f", "line": 1, "id": "a", "reason": "x", "problem": "p"}], stage="setup")
    log.add([{"file": "f", "line": 2, "id": "b", "reason": "y", "problem": "p"}], stage="loading", step=3)
    lines = (tmp_path / "skipped_records.rank1.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["b"]
    assert log.counts() == {"x": 1, "y": 1} and log.counts("loading") == {"y": 1}


# ----- a sample that fails to decode while training: skipped and counted, never a crash --------------


def _train_module(root, tokenizer, **kwargs):
    rows = [record(f"g{k}", images=(f"img{k}.png",)) for k in range(3)]
    rows += [record("bad", images=("broken.png",))]
    rows += [record(f"g{k}", images=(f"img{k}.png",)) for k in range(3, 6)]
    write_jsonl(root / "train.jsonl", rows)
    return DomainMixtureDataModule({"a": {"train": "train.jsonl"}}, root=str(root), tokenizer=tokenizer.name_or_path,
                                   batch_size=4, **kwargs)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_sample_during_training_is_skipped_counted_and_listed(root, tokenizer, tmp_path, num_workers):
    dm = _train_module(root, tokenizer, defer_train_decoding=True, skip_bad_records=True, num_workers=num_workers)
    model = TinyModel()
    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match=r"a train sample failed to decode .*train.jsonl:4: record 'bad'"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4  # 7 samples in batches of 4: two steps per epoch, none lost
    assert [len(b["id"]) for b in model.batches] == [4, 3, 4, 3]
    assert all(SKIPPED_RECORDS not in b["keys"] for b in model.batches)  # the model never sees the bookkeeping
    seen = [i for b in model.batches for i in b["id"]]
    assert "bad" not in seen and len(seen) == 14
    # one skip per epoch (the bad sample is drawn once per epoch), counted in the main process
    assert dm.skip_log.counts("loading") == {R.UNREADABLE_IMAGE: 2}
    written = _read_skip_file(trainer)
    assert [(r["line"], r["id"], r["reason"], r["split"], r["stage"]) for r in written] == [
        (4, "bad", R.UNREADABLE_IMAGE, "train", "loading")
    ] * 2
    assert all(r["file"] == str(root / "train.jsonl") and 0 <= r["step"] < 4 for r in written)


def test_bad_sample_during_training_without_skipping_stops_naming_the_record(root, tokenizer, tmp_path):
    dm = _train_module(root, tokenizer, defer_train_decoding=True)
    with pytest.raises(BadRecordError, match=r"train.jsonl:4: record 'bad': cannot decode .*broken.png"):
        _trainer(tmp_path, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0).fit(TinyModel(), datamodule=dm)


def test_without_deferral_the_bad_training_sample_is_caught_at_setup(root, tokenizer, tmp_path):
    dm = _train_module(root, tokenizer)
    with pytest.raises(BadRecordError, match=r"train.jsonl:4: record 'bad': unreadable image"):
        dm.setup("fit")
    lenient = _train_module(root, tokenizer, skip_bad_records=True)
    with pytest.warns(UserWarning, match="skipped or truncated in train/a"):
        lenient.setup("fit")
    assert lenient.data_report["train"]["a"]["skipped"] == {R.UNREADABLE_IMAGE: 1}


# ----- domain weights: refused when the config is parsed, naming the key --------------------------------


BAD_WEIGHTS = {"zero": "0", "negative": "-1.5", "nan": ".nan", "infinite": ".inf"}


def _weights_config(root, tokenizer, weight: str) -> str:
    return f"""
data:
  class_path: lightning_moe.data.DomainMixtureDataModule
  init_args:
    root: {root}
    tokenizer: {tokenizer.name_or_path}
    sampling: weighted
    domains:
      count: {{train: count/train.jsonl, weight: 2.0}}
      pope: {{train: pope/train.jsonl, weight: {weight}}}
"""


@pytest.mark.parametrize("weight", list(BAD_WEIGHTS.values()), ids=list(BAD_WEIGHTS))
def test_bad_domain_weight_is_refused_when_the_config_is_parsed(tiny_shapes, tokenizer, weight):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    with pytest.raises(Exception) as info:  # jsonargparse's ArgumentError, raised by parse_string: nothing built
        parser.parse_string(_weights_config(tiny_shapes, tokenizer, weight))
    message = str(info.value)
    assert 'Parser key "domains"' in message and 'Parser key "weight"' in message
    assert "does not conform to restriction v>0 and v<inf" in message
    # the domain that failed is the one left unparsed in the reported value
    assert "'pope': {'train': 'pope/train.jsonl', 'weight':" in message


class BuildRecorder(L.LightningModule):
    built = 0

    def __init__(self):
        super().__init__()
        BuildRecorder.built += 1


def test_bad_domain_weight_stops_lightning_cli_before_the_model_is_built(tiny_shapes, tokenizer, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(_weights_config(tiny_shapes, tokenizer, "-1.0"))
    BuildRecorder.built = 0
    with pytest.raises(SystemExit):
        LightningCLI(BuildRecorder, L.LightningDataModule, subclass_mode_data=True, run=False,
                     args=["--config", str(config)])
    assert BuildRecorder.built == 0
    err = capsys.readouterr().err
    assert 'Parser key "weight"' in err and "-1.0 does not conform to restriction v>0" in err


@pytest.mark.parametrize("weight", [0, -1.5, math.nan, math.inf], ids=list(BAD_WEIGHTS))
def test_bad_domain_weight_from_python_names_the_key(tiny_shapes, tokenizer, weight):
    domains = {"count": {"train": "count/train.jsonl"}, "pope": {"train": "pope/train.jsonl", "weight": weight}}
    with pytest.raises(ValueError, match=r"domains\.pope\.weight must be a finite number > 0, got .*drop its `train` files"):
        DomainMixtureDataModule(domains, root=str(tiny_shapes), tokenizer=tokenizer.name_or_path, sampling="weighted")
    with pytest.raises(ValueError, match="weight must be a finite number > 0"):
        DomainSpec(train="pope/train.jsonl", weight=weight)


def test_good_domain_weights_stay_plain_floats(tiny_shapes, tokenizer):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    dm = parser.instantiate(parser.parse_string(_weights_config(tiny_shapes, tokenizer, "3"))).data
    assert dm.domains["pope"].weight == 3.0 and type(dm.domains["pope"].weight) is float  # YAML-friendly hparams
    assert type(dm.hparams["domains"]["pope"]["weight"]) is float
