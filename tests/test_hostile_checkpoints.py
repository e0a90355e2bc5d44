"""A checkpoint cannot widen what loading trusts, nor swap the method a command runs.

From a tiny real run, a checkpoint is tampered the way an attacker would: its hyperparameters turn on
every loading opt-in (`safe_load.LOADING_OPT_INS`) and point `backbone.pretrained` at a pickle payload
that writes a marker file, and its model record is dropped so that the method builds from `pretrained`.
`fit/validate/test/predict --ckpt_path` and `load_from_checkpoint` all refuse the payload (no marker), and the
warning names each refused setting. A checkpoint of another method, stage, surgery or trainable set stops the CLI
with one line naming both; a `--ckpt_path` holding a payload is refused naming its global.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_moe.cli import main
from lightning_moe.formats import CHECKPOINT_CONFIG_KEY
from lightning_moe.methods import MoETuning
from lightning_moe.safe_load import LOADING_OPT_INS
from tests.conftest import ROOT
from tests.test_cli import FAST
from tests.test_safe_load import write_payload_checkpoint

QUICKSTART = ["--config", str(ROOT / "configs/quickstart.yaml")]
TINY = [*FAST, "--trainer.max_steps=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
        "--data.init_args.max_train_samples_per_domain=4"]


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory) -> Path:
    """The last.ckpt of a one-step quickstart run."""
    workdir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        main(["fit", *QUICKSTART, *TINY])
    return next(workdir.rglob("last.ckpt"))


@pytest.fixture
def tampered(run_checkpoint, tmp_path) -> tuple[Path, Path]:
    """(the tampered checkpoint, the marker its payload would write)."""
    marker = tmp_path / "marker"
    evil = write_payload_checkpoint(tmp_path / "evil.ckpt", marker)
    checkpoint = torch.load(run_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["backbone"].update(pretrained=str(evil), **dict.fromkeys(LOADING_OPT_INS, True))
    del checkpoint[CHECKPOINT_CONFIG_KEY]  # no record: the method builds its model from `pretrained`
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    return tmp_path / "tampered.ckpt", marker


def refused_settings(record) -> set[str]:
    return {key for warning in record for key in LOADING_OPT_INS
            if "ignored" in str(warning.message) and f"backbone.{key}: true" in str(warning.message)}


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_ckpt_path_gives_no_loading_opt_in(tampered, subcommand, tmp_path, monkeypatch, capsys):
    ckpt, marker = tampered
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning) as record, pytest.raises(SystemExit) as exit_:
        main([subcommand, *QUICKSTART, *TINY, f"--ckpt_path={ckpt}"])
    assert not marker.exists()
    assert refused_settings(record) == set(LOADING_OPT_INS)
    assert exit_.value.code == 1
    error = capsys.readouterr().err
    assert "evil.ckpt" in error and "posix.system" in error and "Traceback" not in error


def test_load_from_checkpoint_gives_no_loading_opt_in(tampered):
    ckpt, marker = tampered
    with pytest.warns(UserWarning) as record, pytest.raises(ValueError, match="evil.ckpt holds posix.system"):
        MoETuning.load_from_checkpoint(ckpt)
    assert not marker.exists()
    assert refused_settings(record) == set(LOADING_OPT_INS)


def test_an_opt_in_the_user_gives_still_applies(tampered, tmp_path, monkeypatch):
    """The user's own `allow_unsafe_checkpoint` is theirs: the tampered `pretrained` then really runs (the opt-in
    is full pickle), which shows the checkpoint's value was dropped, not the user's."""
    ckpt, marker = tampered
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="full pickle"), pytest.raises((SystemExit, Exception)):
        main(["test", *QUICKSTART, *TINY, "--model.init_args.backbone.allow_unsafe_checkpoint=true",
              f"--ckpt_path={ckpt}"])
    assert marker.exists()


# another method than the quickstart run's: (arguments, what the error shows of the checkpoint, of the config)
OTHER_METHODS = {
    "class": (["--config", str(ROOT / "configs/mole/mole.yaml")], "MoETuning (stage 'moe'", "MoLE"),
    "stage": ([*QUICKSTART, "--model.init_args.stage=instruct"], "stage 'moe'", "stage 'instruct'"),
    # the same class and stage, another surgery (more experts, other layers upcycled) or trainable set
    "surgery": ([*QUICKSTART, "--model.init_args.moe.num_experts=8", "--model.init_args.moe.layers=all"],
                "moe.num_experts 4, moe.layers '::2'", "moe.num_experts 8, moe.layers 'all'"),
    "trainable": ([*QUICKSTART, "--model.init_args.trainable=[connector]"], "trainable ['llm', 'connector']",
                  "trainable ['connector']"),
}


@pytest.mark.parametrize("other", list(OTHER_METHODS))
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_a_checkpoint_runs_only_its_own_method(run_checkpoint, subcommand, other, tmp_path, monkeypatch, capsys):
    arguments, saved, configured = OTHER_METHODS[other]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([subcommand, *arguments, *TINY, f"--ckpt_path={run_checkpoint}"])
    assert exit_.value.code == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and len(error.strip().splitlines()) == 2  # the message, and --debug's hint
    checkpoint_part, config_part = error.split("but the config runs")
    assert "MoETuning" in checkpoint_part and saved in checkpoint_part and configured in config_part, error
    assert "backbone.pretrained" in error


def test_another_surgery_is_refused_in_one_line_by_main_py(run_checkpoint, tmp_path):
    """As the user runs it: `python main.py test ... --ckpt_path` in a subprocess."""
    from tests.test_one_line_errors import one_line_error
    from tests.test_run_safety import run_main_py

    arguments, saved, configured = OTHER_METHODS["surgery"]
    line = one_line_error(run_main_py(["test", *arguments, *TINY, f"--ckpt_path={run_checkpoint}"], tmp_path))
    assert f"error: --ckpt_path {run_checkpoint} is a checkpoint of lightning_moe.methods.MoETuning (stage 'moe', " \
           f"{saved}), but the config runs lightning_moe.methods.MoETuning (stage 'moe', {configured})" in line, line


def test_the_same_plan_given_again_is_not_a_mismatch(run_checkpoint):
    """The run's own settings, spelled as the config gives them (a list for a tuple, a parsed Namespace for a
    dataclass), are the checkpoint's: nothing differs."""
    from jsonargparse import Namespace

    from lightning_moe.cli import plan_differences

    from lightning_moe.models import MoEConfig

    hparams = torch.load(run_checkpoint, weights_only=True)["hyper_parameters"]
    moe = Namespace(**{k: hparams["moe"][k] for k in ("num_experts", "top_k", "layers")})
    same = Namespace(stage="moe", trainable=tuple(hparams["trainable"]), moe=moe, lora=None)
    as_dataclass = {**hparams, "moe": MoEConfig(**hparams["moe"])}  # as older checkpoints hold it
    assert plan_differences(hparams, same) == [] and plan_differences(as_dataclass, same) == []
    moe.top_k = 1
    assert plan_differences(hparams, same) == plan_differences(as_dataclass, same) == [("moe.top_k", 2, 1)]


def test_a_pickle_payload_as_ckpt_path_names_its_global(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    evil = write_payload_checkpoint(tmp_path / "evil.ckpt", marker)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *QUICKSTART, *TINY, f"--ckpt_path={evil}"])
    assert exit_.value.code == 1 and not marker.exists()
    error = capsys.readouterr().err
    assert "posix.system" in error and "runs whatever code the file holds" in error and "Traceback" not in error
