"""`python -m lightning_moe.experiments.continual --quick` runs end to end and writes its results."""

from __future__ import annotations

import json

from lightning_moe.experiments.continual import METHODS, main


def test_quick_continual_experiment_writes_results(tmp_path):
    main(["--out", str(tmp_path), "--quick"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [m["method"] for m in results["methods"]] == list(METHODS)
    for m in results["methods"]:
        assert len(m["accuracy"]) == len(m["tasks"]) == 3 and all(len(row) == 3 for row in m["accuracy"])
        assert {"last", "avg", "transfer", "bwt", "forgetting"} <= set(m)
    by_name = {m["method"]: m for m in results["methods"]}
    # MoRA holds three tasks' ranks and trains one task's; the task-specific oracle keeps three LoRAs
    assert by_name["mora"]["adapter_params_total"] == 3 * by_name["mora"]["adapter_params_per_task"]
    assert by_name["lora_sequential"]["adapter_params_total"] == by_name["lora_sequential"]["adapter_params_per_task"]
    assert by_name["mora"]["active_ranks_per_token"] <= 8  # the shipped budget top_k = 8
    table = (tmp_path / "results.md").read_text()
    assert "| mora |" in table and "acc[i, j]" in table
    assert list((tmp_path / "runs/mora").glob("mora/version_*/events.*"))  # TensorBoard logs
