"""The configs mean what they meant: every shipped config's effective configuration (`main.py fit --config X
--print_config`) equals the recorded one (tests/fixtures/pre_restructure/print_config/: written by
tests/fixtures/make_pre_restructure.py when each config was a full copy; `unimoe/` by the same `--print_config`
when the backbone's encoders were flat keys), up to the two keys now printed in another form (the model's
tokenizer, linked from the data module's; the backbone's encoders, a mapping in place of flat keys), and the
tokenizer is named once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from lightning_moe.cli import LightningMoECLI, effective_config
from lightning_moe.methods.base import FLAT_NOT_GIVEN
from lightning_moe.models.encoders import FLAT_KEYS, encoder_configs, encoders_from_flat
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
BEFORE = ROOT / "tests" / "fixtures" / "pre_restructure" / "print_config"
# configs/real/ (a real pretrained LLM, docs/real_model.md) came after the restructuring: its effective configs
# as first recorded (tests/fixtures/print_config/real/, written by `--print_config`)
RECORDED = ROOT / "tests" / "fixtures" / "print_config"
REAL = "real"
# values changed on purpose since the fixtures were recorded: config -> dotted key -> (recorded, now, why)
CHANGED_ON_PURPOSE = {
    "quickstart.yaml": {"trainer.max_steps": (1500, 3000, "pope, learnt last, is learnt between steps 500 and "
                                              "2500 as the seed and the float order go (docs/quickstart.md)")},
}


# `_base/` holds parts that the others include, not runs; `strategies/` holds trainer-only parts composed after a
# method's config (tests/distributed/test_strategies.py)
PARTS = ("_base", "strategies")


def shipped_configs() -> list[Path]:
    """Every runnable shipped config."""
    return sorted(p for p in CONFIGS.rglob("*.yaml") if not set(PARTS) & set(p.relative_to(CONFIGS).parts))



def differences(before, now, key: str = "") -> list[str]:
    """Every key whose value differs. A key that exists only `now` is a new option of the code, which the
    code before could not print; every key printed before must still be there with the same value."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [d for k in before for d in (differences(before[k], now[k], f"{key}.{k}".lstrip("."))
                                            if k in now else [f"{key}.{k}".lstrip(".") + ": missing now"])]
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        return [d for i, (b, n) in enumerate(zip(before, now)) for d in differences(b, n, f"{key}[{i}]")]
    return [] if before == now else [f"{key}: {before!r} before, {now!r} now"]


def restructured_configs() -> list[Path]:
    """The shipped configs that existed before the restructuring (all but configs/real/)."""
    return [p for p in shipped_configs() if p.relative_to(CONFIGS).parts[0] != REAL]


def test_the_fixtures_cover_every_shipped_config():
    names = {p.relative_to(CONFIGS) for p in restructured_configs()}
    assert names == {p.relative_to(BEFORE) for p in BEFORE.rglob("*.yaml")}
    assert len(names) == 18
    real = {p.relative_to(CONFIGS) for p in shipped_configs()} - names
    assert real == {p.relative_to(RECORDED) for p in (RECORDED / REAL).rglob("*.yaml")} and len(real) == 3


@pytest.mark.parametrize("config", [str(p.relative_to(CONFIGS / REAL)) for p in (CONFIGS / REAL).glob("*.yaml")])
def test_real_model_config_is_as_recorded(config):
    """Parsing needs no model (the LLM loads when the run starts): these run without the `real` extra."""
    recorded = yaml.safe_load((RECORDED / REAL / config).read_text())
    assert differences(recorded, effective_config(CONFIGS / REAL / config)) == []


@pytest.mark.parametrize("config", [str(p.relative_to(CONFIGS)) for p in restructured_configs()])
def test_effective_config_is_unchanged(config):
    before = yaml.safe_load((BEFORE / config).read_text())  # its `# lightning.pytorch==` header is a comment
    now = effective_config(CONFIGS / config)
    # The model's tokenizer is linked from the data module's (lightning_moe/cli.py), and jsonargparse leaves a
    # link's target out of --print_config. The full copies named the same tokenizer twice; the link gives the
    # model that same value.
    if "tokenizer" in before["model"]["init_args"]:
        tokenizer = before["model"]["init_args"].pop("tokenizer")
        assert tokenizer == before["data"]["init_args"]["tokenizer"] == now["data"]["init_args"]["tokenizer"]
    assert "tokenizer" not in now["model"]["init_args"]
    # The backbone's encoders were flat keys (vision_tower, ..., video_pooling); a config that still writes them
    # is read by `encoders_from_flat`, which must give the mapping the shipped config now writes.
    backbone_before, backbone_now = before["model"]["init_args"]["backbone"], now["model"]["init_args"]["backbone"]
    flat = {key: backbone_before.pop(key) for key in list(backbone_before) if key in FLAT_KEYS}
    assert "vision_tower" in flat  # every config printed them
    assert encoders_from_flat(flat) == encoder_configs(backbone_now.pop("encoders"))
    # the flat keys, still read, are unset
    assert {key: backbone_now[key] for key in FLAT_KEYS} == {**dict.fromkeys(FLAT_KEYS), "vision_tower": FLAT_NOT_GIVEN}
    for dotted, (recorded, changed, _why) in CHANGED_ON_PURPOSE.get(config, {}).items():
        *parents, last = dotted.split(".")
        group_before, group_now = before, now
        for key in parents:
            group_before, group_now = group_before[key], group_now[key]
        assert (group_before[last], group_now[last]) == (recorded, changed), dotted
        group_before[last] = changed
    assert differences(before, now) == []


def test_every_config_names_the_tokenizer_once():
    named = [p for p in CONFIGS.rglob("*.yaml") if "tokenizer:" in p.read_text()]
    # the Uni-MoE chain reads data/media with its own tokenizer (docs/unimoe_data.md), named by the configs that
    # start a run on it; the others name none
    media = sorted(CONFIGS / "unimoe" / f for f in ("align.yaml", "experts.yaml", "moe.yaml"))
    # the real model's stages read the shapes data with that model's own tokenizer (docs/real_model.md)
    real = sorted((CONFIGS / REAL).glob("*.yaml"))
    assert sorted(named) == sorted([CONFIGS / "_base" / "shapes.yaml", *media, *real])


def test_the_model_gets_the_data_modules_tokenizer(tmp_path):
    tokenizer = tmp_path / "tokenizer"  # a second copy: a path that no config names
    shutil.copytree(ROOT / "data" / "tokenizer", tokenizer)
    cli = LightningMoECLI(args=["--config", str(CONFIGS / "quickstart.yaml"),
                                f"--data.init_args.tokenizer={tokenizer}"], run=False)
    assert cli.model.hparams.tokenizer == str(tokenizer) == cli.datamodule.hparams.tokenizer


def test_a_stage_overrides_single_keys_of_the_shared_parts():
    """A dotted key in a config changes that key only; the rest of the group comes from configs/_base/."""
    now = effective_config(CONFIGS / "mole" / "lora.yaml")
    assert now["trainer"]["max_steps"] == 400  # set by mole/lora.yaml
    assert now["trainer"]["gradient_clip_val"] == 1.0  # from _base/trainer.yaml
    assert now["trainer"]["logger"]["init_args"]["name"] == "lora"
    assert now["data"]["init_args"]["eval_batch_size"] == 200  # from _base/shapes.yaml
