"""The ready strategy files parse with every method config, and the FSDP wrap policy makes one unit per
transformer block with each SparseMoE inside exactly one unit (FSDP1 itself needs a GPU in Lightning:
docs/running_at_scale.md; FSDP2 trains on CPU in test_data_parallel.py)."""

from __future__ import annotations

import pytest

from lightning_moe.cli import main
from lightning_moe.layers import SparseMoE
from lightning_moe.strategies import decoder_layer_policy
from tests.conftest import ROOT, TINY_LLM, TINY_VISION, tiny_encoders

STRATEGIES = sorted((ROOT / "configs/strategies").glob("*.yaml"))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.stem)
def test_strategy_files_compose_with_a_method_config(strategy, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(strategy), "--print_config"])
    assert exit_info.value.code == 0
    assert "strategy:" in capsys.readouterr().out


def test_fsdp_policy_wraps_each_block_and_keeps_every_sparse_moe_whole(tokenizer):
    from lightning_moe.models import MoEConfig, build_multimodal, upcycle

    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1))
    upcycle(model, MoEConfig(num_experts=4, top_k=2, layers="::1"))
    units = {name for name, m in model.named_modules() if decoder_layer_policy(m, recurse=False, nonwrapped_numel=0)}
    decoder = {f"llm.model.layers.{i}" for i in range(TINY_LLM["num_hidden_layers"])}
    assert decoder <= units and len(units) == len(decoder) + TINY_VISION["num_hidden_layers"]
    assert not any(a != b and b.startswith(a + ".") for a in units for b in units)  # no unit inside another
    moes = [name for name, m in model.named_modules() if isinstance(m, SparseMoE)]
    assert moes and all(sum(moe.startswith(unit + ".") for unit in units) == 1 for moe in moes)
    assert all(decoder_layer_policy(m, recurse=True, nonwrapped_numel=0) for m in model.modules())
