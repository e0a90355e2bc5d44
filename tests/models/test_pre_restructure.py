"""Models and checkpoints written by an earlier layout of the code (`tests/fixtures/pre_restructure/`, see
make_pre_restructure.py: adapter records with every kind's fields, `MoEConfig` pickled under its old module)
load with the same logits on CPU, through every way a model is read back. The logits are compared within
float32 rounding (`STORED_LOGITS_ATOL`, tests/conftest.py): they were stored on another machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_moe.layers import LoRALinear, MoLEMLP, MoRALinear, SparseMoE
from lightning_moe.formats import load_backbone
from lightning_moe.models import MultimodalLM
from tests.conftest import TOKENIZER, assert_close_to_stored

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_restructure"
INPUTS = load_file(str(FIXTURES / "inputs.safetensors"))
EXPECTED = load_file(str(FIXTURES / "expected.safetensors"))
LAYERS = {"sparse_lora": (SparseMoE, LoRALinear), "mole": (MoLEMLP, LoRALinear), "mora": (MoRALinear,)}

pytestmark = pytest.mark.stored_numbers


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(**INPUTS).logits


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_old_save_pretrained_directories_give_the_stored_logits(name):
    model = MultimodalLM.from_pretrained(FIXTURES / name)
    kinds = {type(m) for m in model.modules()}
    assert all(kind in kinds for kind in LAYERS[name])  # the old adapter records were replayed, not skipped
    assert_close_to_stored(logits(model), EXPECTED[f"{name}.logits"])


def test_old_checkpoint_gives_the_stored_logits_as_backbone_and_as_method():
    from lightning_moe.methods import MoETuning

    ckpt = FIXTURES / "moe_tuning.ckpt"
    assert_close_to_stored(logits(load_backbone(ckpt)), EXPECTED["moe_tuning.logits"])
    # the checkpoint's hyperparameters pickle lightning_moe.models.surgery.MoEConfig (a module that no longer
    # exists: lightning_moe/safe_load.py's RENAMED_CLASSES resolves it)
    # the tokenizer path in its hyperparameters is the absolute one of the checkout that wrote it
    method = MoETuning.load_from_checkpoint(ckpt, map_location="cpu", tokenizer=TOKENIZER)
    assert method.stage == "moe" and type(method.hparams["moe"]).__module__ == "lightning_moe.models.upcycle"
    assert_close_to_stored(logits(method.model), EXPECTED["moe_tuning.logits"])


def test_old_adapter_records_read_as_the_new_ones():
    """A rule logged by the earlier layout carried every kind's fields; it reads as the rule the kind now logs."""
    import json

    from lightning_moe.models import AdapterRule, canonical_log

    old = json.loads((FIXTURES / "mora" / "multimodal_config.json").read_text())["surgery"]
    assert set(old[0]["configs"][0]) > {"num_experts", "scale_by_prob"}  # the old all-kinds record
    new = canonical_log(old)
    assert new[0]["configs"] == [AdapterRule(kind="mora", targets=["q_proj", "v_proj"], r=4, alpha=8, top_k=2).to_dict()]
    assert old[1] == {"op": "mora_add_task", "r": 4} and new[1] == {"op": "add_adapter_task", "r": 4}  # its later name
    assert MultimodalLM.from_pretrained(FIXTURES / "mora").surgery == new
    with pytest.raises(ValueError, match="unknown options \\['num_experts'\\]"):
        AdapterRule.from_dict({"kind": "mora", "targets": ["q_proj"], "num_experts": 3})  # only a full old record is lenient
