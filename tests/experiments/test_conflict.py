"""The data-conflict experiment's smoke version runs end to end through the CLI's classes and
writes its results, its per-run configs, adapters and TensorBoard logs; the base is reused."""

from __future__ import annotations

import json

from lightning_moe.experiments import conflict


def test_quick_conflict_experiment_writes_results_and_reuses_the_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = conflict.main(["--out", str(tmp_path / "out"), "--quick"])
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["runs"]]
    domains = results["plan"]["domains"]
    assert names == ["base"] + [f"lora_{d}" for d in domains] + ["lora_mixture", "lora4x_mixture", "mole3_mixture"]
    runs = {r["name"]: r for r in results["runs"]}
    # trainable parameters: 4x rank = 4x LoRA parameters; MoLE between LoRA and E x LoRA on the MLPs
    assert runs["lora4x_mixture"]["trainable_params"] == 4 * runs["lora_mixture"]["trainable_params"]
    assert runs["lora_mixture"]["trainable_params"] < runs["mole3_mixture"]["trainable_params"] \
        < 3 * runs["lora_mixture"]["trainable_params"] + 10_000
    assert all(set(r["accuracy"]) == set(domains) for r in results["runs"])
    assert all(r["step_time_ms"] > 0 for r in results["runs"])
    assert results["verdict"] and summary["verdict"] == results["verdict"]
    table = (out / "results.md").read_text()
    assert "| MoLE 3 experts r=1, mixture | mixture |" in table and "Verdict" in table
    assert (out / "configs" / "mole3_mixture.yaml").is_file()
    assert (out / "adapters" / "mole3_mixture" / "adapter_config.json").is_file()
    assert list((out / "tensorboard" / "mole3_mixture").glob("events.out.tfevents.*"))

    # a second invocation with the same base plan reuses the saved base instead of training it again
    base_weights = out / "base" / "model" / "model.safetensors"
    stamp = base_weights.stat().st_mtime_ns
    conflict.train_base(conflict.QUICK, out / "base", out)
    assert base_weights.stat().st_mtime_ns == stamp
