"""`python -m lightning_moe.experiments.continual --quick` runs end to end and writes its results."""

from __future__ import annotations

import json

from lightning_moe.experiments.continual import METHODS, main


def test_quick_continual_experiment_writes_results(tmp_path):
    main(["--out", str(tmp_path), "--quick", "--threads", "1"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["pretrain", *METHODS]
    methods = [r for r in results["runs"] if r["name"] != "pretrain"]
    for m in methods:
        d = m["details"]
        assert len(d["accuracy"]) == len(d["tasks"]) == 3 and all(len(row) == 3 for row in d["accuracy"])
        assert {"last", "avg", "transfer", "bwt", "forgetting"} <= set(d)
        assert (tmp_path / "figures" / f"{m['name']}_accuracy.png").is_file()
        assert (tmp_path / "logs" / f"{m['name']}_seed0.log").is_file()
    by_name = {m["name"]: m["details"] for m in methods}
    # MoRA holds three tasks' ranks and trains one task's; the task-specific oracle keeps three LoRAs
    assert by_name["mora"]["adapter_params_total"] == 3 * by_name["mora"]["adapter_params_per_task"]
    assert by_name["lora_sequential"]["adapter_params_total"] == by_name["lora_sequential"]["adapter_params_per_task"]
    assert by_name["mora"]["active_ranks_per_token"] <= 8  # the shipped budget top_k = 8
    assert results["environment"]["torch_threads"] == 1
    table = (tmp_path / "results.md").read_text()
    assert "| mora |" in table and "acc[i, j]" in table and "1 threads" in table
    assert list((tmp_path / "runs/mora").glob("mora/version_*/events.*"))  # TensorBoard logs
