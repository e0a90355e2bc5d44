"""DomainMixtureDataModule: mixture sampling proportions, one evaluation loader per domain, YAML configuration."""

import math
from collections import Counter

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_moe.data import DomainMixtureDataModule, DomainSpec, mixture_probabilities

# the fixture gives pope a weight, which only `weighted` uses (the module warns about it otherwise)
pytestmark = pytest.mark.filterwarnings("ignore:domain weights are only used")

DOMAINS = ("count", "colour", "pope", "position_lr", "position_tb")


def _subset(root, domain: str, n: int) -> str:
    """A train file with the first n records of a domain, to make domain sizes unequal."""
    lines = (root / domain / "train.jsonl").read_text().splitlines(keepends=True)[:n]
    name = f"{domain}/train_{n}.jsonl"
    (root / name).write_text("".join(lines))
    return name


@pytest.fixture
def uneven(tiny_shapes, tokenizer):
    """Three domains with 24, 12 and 3 train records and weights 1, 1, 6."""
    domains = {
        "count": {"train": "count/train.jsonl", "val": "count/val.jsonl", "test": "count/test.jsonl"},
        "colour": {"train": _subset(tiny_shapes, "colour", 12), "test": "colour/test.jsonl"},
        "pope": {"train": _subset(tiny_shapes, "pope", 3), "val": "pope/val.jsonl", "weight": 6.0},
    }
    return lambda **kw: DomainMixtureDataModule(domains, root=str(tiny_shapes), tokenizer=tokenizer.name_or_path, **kw)


def test_mixture_probabilities_per_mode():
    sizes, weights = {"a": 300, "b": 100}, {"a": 1.0, "b": 3.0}
    assert mixture_probabilities(sizes, weights, "proportional") == {"a": 0.75, "b": 0.25}
    assert mixture_probabilities(sizes, weights, "weighted") == {"a": 0.25, "b": 0.75}
    t2 = mixture_probabilities(sizes, weights, "temperature", temperature=2.0)
    assert t2["a"] == pytest.approx(math.sqrt(3) / (math.sqrt(3) + 1))
    assert mixture_probabilities(sizes, weights, "temperature", temperature=1.0)["a"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="sampling must be one of"):
        mixture_probabilities(sizes, weights, "uniform")


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ("proportional", {"count": 24 / 39, "colour": 12 / 39, "pope": 3 / 39}),
        ("weighted", {"count": 1 / 8, "colour": 1 / 8, "pope": 6 / 8}),
        ("temperature", {d: n**0.5 / (24**0.5 + 12**0.5 + 3**0.5) for d, n in [("count", 24), ("colour", 12), ("pope", 3)]}),
    ],
)
def test_training_sampler_draws_domains_in_expected_proportions(uneven, sampling, expected):
    n = 20000
    dm = uneven(sampling=sampling, samples_per_epoch=n, seed=1)
    dm.setup("fit")
    assert dm.domain_probabilities() == pytest.approx(expected)
    loader = dm.train_dataloader()
    datasets = loader.dataset.datasets
    domain_of = [d.domain for d in datasets for _ in range(len(d))]
    drawn = Counter(domain_of[i] for i in loader.sampler)
    assert sum(drawn.values()) == n
    for domain, p in expected.items():
        # 5 standard deviations of a binomial proportion: fails only if the sampler is wrong.
        assert abs(drawn[domain] / n - p) < 5 * math.sqrt(p * (1 - p) / n), (domain, drawn)


def test_proportional_without_epoch_size_visits_every_sample_once(uneven):
    dm = uneven()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert sorted(loader.sampler) == list(range(39))
    assert len(next(iter(loader))["id"]) == 39  # batch_size 64: one batch holds the whole epoch


def test_one_eval_loader_per_domain_in_config_order(uneven):
    dm = uneven(eval_batch_size=4, max_eval_samples_per_domain=5)
    assert dm.eval_domains("validate") == dm.eval_domains("sanity_check") == ["count", "pope"]
    assert dm.eval_domains("test") == ["count", "colour"]
    dm.setup("validate")
    dm.setup("test")
    for stage, loaders in (("validate", dm.val_dataloader()), ("test", dm.test_dataloader())):
        assert len(loaders) == len(dm.eval_domains(stage))
        for domain, loader in zip(dm.eval_domains(stage), loaders):
            assert len(loader.dataset) == 5
            batches = list(loader)
            assert [len(b["id"]) for b in batches] == [4, 1]
            assert all(b["domain"] == [domain] * len(b["id"]) for b in batches)
            # evaluation keeps file order
            assert [i for b in batches for i in b["id"]] == [f"{domain}-{'val' if stage == 'validate' else 'test'}-{k:05d}" for k in range(5)]


def test_evaluating_leaves_the_global_random_stream_alone(uneven):
    """A validation in the middle of training must not move torch's global generator (dropout, router noise):
    a run's training then does not depend on how often it validates."""
    dm = uneven(eval_batch_size=4, max_eval_samples_per_domain=5)
    dm.setup("validate")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    for loader in dm.val_dataloader():
        list(loader)
    assert torch.equal(torch.rand(4), expected)


def test_train_cap_keeps_each_domains_first_samples_and_leaves_evaluation_alone(uneven):
    dm = uneven(max_train_samples_per_domain=5, max_eval_samples_per_domain=2)
    dm.setup("fit")
    train = dm.datasets["train"]
    # 24 and 12 records cut to their first 5; pope's 3 stay 3
    assert {d: [s.id for s in ds.samples] for d, ds in train.items()} == {
        d: [f"{d}-train-{k:05d}" for k in range(n)] for d, n in (("count", 5), ("colour", 5), ("pope", 3))}
    assert dm.data_report["train"]["count"]["kept"] == 5
    assert {d: len(ds) for d, ds in dm.datasets["val"].items()} == {"count": 2, "pope": 2}


def test_tokenizer_is_ready_before_setup_and_report_after(uneven, tokenizer):
    dm = uneven()
    assert dm.tokenizer.pad_token_id == tokenizer.pad_token_id and len(dm.tokenizer) == len(tokenizer)
    assert not dm.data_report
    dm.setup("fit")
    assert set(dm.data_report) == {"train", "val"}
    assert dm.data_report["train"]["pope"] == {
        "records": 3, "kept": 3, "skipped": {}, "truncated": 0, "no_answer_tokens": 0, "cut_placeholders": 0,
        "duplicate_ids": 0, "long_audio": 0, "duplicate_ids_across": 0,
    }  # fmt: skip


def test_domains_parse_from_yaml_as_lightning_cli_does(tiny_shapes, tokenizer):
    config = f"""
data:
  class_path: lightning_moe.data.DomainMixtureDataModule
  init_args:
    root: {tiny_shapes}
    tokenizer: {tokenizer.name_or_path}
    sampling: weighted
    domains:
      count: {{train: count/train.jsonl, val: count/val.jsonl, weight: 2.0}}
      pope:
        train: [pope/train.jsonl, pope/val.jsonl]
        test: pope/test.jsonl
"""
    parser = ArgumentParser()
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    dm = parser.instantiate_classes(parser.parse_string(config)).data
    assert isinstance(dm, DomainMixtureDataModule) and dm.hparams.sampling == "weighted"
    assert dm.domains == {
        "count": DomainSpec(train="count/train.jsonl", val="count/val.jsonl", weight=2.0),
        "pope": DomainSpec(train=["pope/train.jsonl", "pope/val.jsonl"], test="pope/test.jsonl"),
    }
    dm.setup("fit")
    assert len(dm.datasets["train"]["pope"]) == 30
    # hparams stay plain YAML (Lightning writes them to hparams.yaml)
    assert dm.hparams["domains"]["pope"]["train"] == ["pope/train.jsonl", "pope/val.jsonl"]


def test_all_shipped_domains_load(tiny_shapes, tokenizer):
    domains = {d: {s: f"{d}/{s}.jsonl" for s in ("train", "val", "test")} for d in DOMAINS}
    dm = DomainMixtureDataModule(domains, root=str(tiny_shapes), tokenizer=tokenizer.name_or_path, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["image_counts"].tolist() == [1] * 8


def test_hf_image_processor_replaces_the_default_transform(tiny_shapes, tokenizer, tmp_path):
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(tmp_path)
    domains = {"count": {"val": "count/val.jsonl"}}
    dm = DomainMixtureDataModule(domains, root=str(tiny_shapes), tokenizer=tokenizer.name_or_path, image_processor=str(tmp_path))
    dm.setup("validate")
    assert next(iter(dm.val_dataloader()[0]))["pixel_values"].shape == (6, 3, 48, 48)


def test_domains_default_to_the_folders_under_root(tokenizer):
    from lightning_moe.data import DomainMixtureDataModule
    from tests.conftest import ROOT, TOKENIZER

    dm = DomainMixtureDataModule(root=str(ROOT / "data/shapes"), tokenizer=TOKENIZER)
    assert list(dm.domains) == ["colour", "count", "pope", "position_lr", "position_tb"]
    assert dm.domains["pope"].test == "pope/test.jsonl"


def test_a_root_without_domains_is_an_error(tmp_path):
    from lightning_moe.data import DomainMixtureDataModule
    from tests.conftest import TOKENIZER

    with pytest.raises(ValueError, match="no domains under"):
        DomainMixtureDataModule(root=str(tmp_path), tokenizer=TOKENIZER)
