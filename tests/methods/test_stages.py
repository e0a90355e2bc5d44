"""Stages as data and the base's public hooks: every method declares its stage table, the CLI lists
and checks the stages from the `stage` parameter's `Literal`, no method overrides a private method
of the base, and a checkpoint written before stages became data still loads with the same logits."""

from __future__ import annotations

import inspect
import pkgutil
import re
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors.torch import load_file

import lightning_moe.methods as methods
from lightning_moe.cli import main
from lightning_moe.methods import MoDDistillation, MoETuning, MultimodalMethod, Stage
from tests.conftest import ROOT, TOKENIZER, assert_close_to_stored

FIXTURES = ROOT / "tests" / "fixtures" / "pre_restructure"


def method_classes() -> list[type]:
    """Every MultimodalMethod subclass defined in a module of lightning_moe.methods."""
    for info in pkgutil.iter_modules(methods.__path__):
        import_module(f"{methods.__name__}.{info.name}")
    found, todo = set(), [MultimodalMethod]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith(methods.__name__ + ".") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted(found, key=lambda c: c.__qualname__)


def test_every_shipped_method_is_found():
    names = {c.__name__ for c in method_classes()}
    assert {"MoETuning", "MoDDistillation", "LoRATuning", "MoLE", "ContinualLoRA", "MoRAContinual"} <= names


@pytest.mark.parametrize("cls", method_classes(), ids=lambda c: c.__name__)
def test_no_method_overrides_a_private_method_of_its_bases(cls):
    # the base offers public hooks for what a method adds; a private override would bypass them silently
    private = [n for n in vars(cls) if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
    overridden = [(n, base.__qualname__) for n in private for base in cls.__mro__[1:] if n in vars(base)]
    assert not overridden, f"{cls.__name__} overrides private members of its bases: {overridden}"


def test_no_method_passes_values_through_forward_attributes():
    # per-step statistics travel in StepOutput (logs / extras), not in `self._forward_*` attributes
    sources = {p.name: p.read_text() for p in Path(methods.__file__).parent.glob("*.py")}
    assert not {name for name, text in sources.items() if re.search(r"\._forward_\w", text)}


def test_stage_tables():
    assert MoETuning.STAGES == {"align": Stage(train=("connector",)), "instruct": Stage(train=("connector", "llm")),
                                "moe": Stage(train=("moe", "connector"), upcycle=True)}
    assert [n for n, s in MoDDistillation.STAGES.items() if s.upcycle] == ["mimic_sparse"]


@pytest.mark.parametrize("cls", method_classes(), ids=lambda c: c.__name__)
def test_the_stage_parameter_the_cli_reads_lists_exactly_the_table(cls):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model")
    entry = parser.format_help().split("\n  --model.stage ", 1)[1].split("\n  --")[0]  # the option's help entry
    listed = re.search(r"\(type: Literal\[([^\]]*)\]", re.sub(r"\s+", " ", entry)).group(1)
    assert sorted(listed.replace("'", "").split(", ")) == sorted(cls.STAGES)
    assert parser.get_defaults().model.stage in cls.STAGES


def test_a_table_and_a_literal_that_disagree_fail_when_the_class_is_made():
    with pytest.raises(TypeError, match="needs the `stage` parameter"):
        class NoParameter(MoETuning):
            STAGES = {"only": Stage(train=["llm"])}

    with pytest.raises(TypeError, match=r"Literal\[\.\.\.\] of exactly those names"):
        class OtherNames(MoETuning):
            STAGES = {"only": Stage(train=["llm"])}

            def __init__(self, stage: Literal["align", "only"] = "only", **kwargs: Any):
                super().__init__(stage=stage, **kwargs)

    with pytest.raises(TypeError, match="must map stage names to Stage"):
        class NotStages(MoETuning):
            STAGES = {"only": ["llm"]}

            def __init__(self, stage: Literal["only"] = "only", **kwargs: Any):
                super().__init__(stage=stage, **kwargs)


class ExpertsOnly(MoETuning):
    """A user's method: MoE-tuning plus a stage that upcycles and trains only the experts."""

    STAGES = {**MoETuning.STAGES, "experts": Stage(train=["moe"], upcycle=True)}

    def __init__(self, stage: Literal["align", "instruct", "moe", "experts"] = "experts", **kwargs: Any):
        super().__init__(stage=stage, **kwargs)


def test_a_new_stage_is_one_table_entry(tokenizer):
    method = ExpertsOnly(tokenizer=TOKENIZER, backbone=methods.BackboneConfig(
        llm_overrides={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}, encoders={}))
    assert method.model.surgery[0]["op"] == "upcycle"
    assert method.trainable_names and all(".mlp." in n for n in method.trainable_names)


def cli_output(capsys, *args: str) -> str:
    with pytest.raises(SystemExit):
        main(list(args))
    captured = capsys.readouterr()
    return captured.out + captured.err


@pytest.mark.parametrize("cls, choices", [(MoETuning, "{align,instruct,moe}"),
                                          (MoDDistillation, "{mimic_dense,mimic_sparse,preference}"),
                                          (ExpertsOnly, "{align,instruct,moe,experts}")])
def test_model_help_lists_the_stages(capsys, cls, choices):
    out = cli_output(capsys, "fit", f"--model.help={cls.__module__}.{cls.__qualname__}")
    assert f"--model.stage {choices}" in out


def test_the_cli_rejects_an_unknown_stage_and_names_the_choices(capsys, in_repo_root):
    out = cli_output(capsys, "fit", "--config", "configs/quickstart.yaml", "--model.init_args.stage=bogus",
                     "--print_config")
    assert "model.init_args.stage: expected one of 'align', 'instruct', 'moe', got 'bogus'" in out


@pytest.mark.stored_numbers
def test_a_checkpoint_written_before_stages_became_data_loads_with_the_stored_logits():
    # written by tests/fixtures/make_pre_restructure.py when stages were code (MoETuning, stage moe, one step)
    method = MoETuning.load_from_checkpoint(FIXTURES / "moe_tuning.ckpt", tokenizer=TOKENIZER, map_location="cpu")
    assert method.stage == "moe" and method.trainable == ["llm", "connector"]
    assert method.hparams["stage"] == "moe" and method.hparams["trainable"] == ["llm", "connector"]
    assert method.model.surgery[0]["op"] == "upcycle"
    assert method.trainable_names == {n for n, _ in method.model.named_parameters()
                                      if n.startswith(("llm.", "connectors."))}
    inputs = load_file(str(FIXTURES / "inputs.safetensors"))
    with torch.no_grad():
        logits = method.eval().model(**inputs).logits
    assert_close_to_stored(logits, load_file(str(FIXTURES / "expected.safetensors"))["moe_tuning.logits"])


def test_hooks_are_documented_in_the_base():
    doc = inspect.getdoc(MultimodalMethod)
    for hook in ("configure_backbone", "compute_loss", "on_eval_batch_start", "on_eval_batch", "eval_epoch_metrics",
                 "eval_step"):
        assert f"`{hook}(" in doc and callable(getattr(MultimodalMethod, hook))
