"""The benchmarks' smoke runs check what their rows mean, not only that they run: EdgeMoE's speed table
(each configuration in its own process: what it read, what it guessed), its quality table, and the
parity checks of the speed scripts (same weights, same answer) that the timings rest on."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow  # seven processes (one per configuration), forked from a server that imports torch once
def test_edge_offload_quick_speed_table(tmp_path):
    run_script(str(ROOT / "benchmarks/edge_offload.py"), "--quick", "--only", "speed", "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())["speed"]["results"]
    assert list(results) == ["in memory", "on demand (no cache)", "LRU cache", "EdgeMoE",
                             "EdgeMoE, frequency/distance eviction", "EdgeMoE, packed cache",
                             "EdgeMoE, lookahead prediction"]
    for name, r in results.items():
        assert r["decode_tokens_per_second"] > 0 and r["peak_rss"] > r["runtime_rss"] > 0, name
    # each configuration in a process of its own that starts at the runtime, as a fresh interpreter would: the
    # forkserver's resident set (a fork alone leaves out its ~100 MiB of library pages), OMP_NUM_THREADS threads
    assert len({r["pid"] for r in results.values()}) == len(results)
    for name, r in results.items():
        assert abs(r["runtime_rss"] - r["server_rss"]) < 8 * 2**20 and r["torch_threads"] == 1, name
    memory = results["in memory"]
    assert memory["bytes_read"] == 0 and memory["stats"] is None and memory["hit_rate"] is None

    # expert files: float32 ones all one size; the planned store's at their bitwidths
    f32_file = {p.stat().st_size for p in (tmp_path / "speed_f32/experts").iterdir()}
    planned_files = [p.stat().st_size for p in (tmp_path / "speed_planned/experts").iterdir()]
    assert len(f32_file) == 1
    f32_file = f32_file.pop()
    offloaded = {name: r["stats"] for name, r in results.items() if name != "in memory"}
    for name, s in offloaded.items():
        needed = s["hits"] + s["misses"]
        assert needed > 0 and 0 <= s["hit_rate"] <= 1 and s["hit_rate"] == pytest.approx(s["hits"] / needed), name
        assert results[name]["hit_rate"] == s["hit_rate"] and results[name]["bytes_read"] == s["bytes_read"], name
        assert 0 <= s["prefetch_hits"] <= s["prefetch_issued"] and 0 <= s["guesses_right"] <= s["guesses"], name
        if name in ("on demand (no cache)", "LRU cache"):  # float32 store, no prefetch: one file read per miss
            assert s["bytes_read"] == s["misses"] * f32_file and s["guesses"] == s["prefetch_issued"] == 0, name
        else:  # the planned store: misses and prefetched loads, each one file of the planned bitwidths
            assert s["misses"] * min(planned_files) <= s["bytes_read"], name
            assert s["bytes_read"] <= (s["misses"] + s["prefetch_issued"]) * max(planned_files), name
            assert s["guesses"] > 0, name  # every EdgeMoE row predicts
    demand, lru = offloaded["on demand (no cache)"], offloaded["LRU cache"]
    # on demand reads every routed expert: the same routing as the cached float32 row, every use a read;
    # at least top-2 of each decoder layer for each decoded token
    assert demand["hits"] == 0 and demand["misses"] == lru["hits"] + lru["misses"]
    assert demand["misses"] >= 2 * 2 * 2 * 3  # 2 layers x top-2 x 2 prompts (warm-up + 1) x 3 decode steps
    assert lru["hits"] > 0 and lru["bytes_read"] < demand["bytes_read"]  # the cache saves reads
    assert "| EdgeMoE |" in (tmp_path / "results.md").read_text()


def test_edge_offload_quick_quality_table(tmp_path, tokenizer):
    """The quality table on a small saved sparse model (--checkpoint: no training in the test)."""
    from tests.inference.conftest import make_sparse_model

    make_sparse_model(tokenizer).save_pretrained(tmp_path / "model")
    run_script(str(ROOT / "benchmarks/edge_offload.py"), "--quick", "--only", "quality", "--checkpoint",
               str(tmp_path / "model"), "--max-eval-samples", "2", "--out", str(tmp_path / "out"))
    quality = json.loads((tmp_path / "out/results.json").read_text())["quality"]
    results = quality["results"]
    assert list(results) == ["float32", "int8", "int4", "int2", "planned"]
    sizes = [results[n]["expert_bytes"] for n in ("float32", "int8", "int4", "int2")]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4  # fewer bits, fewer bytes
    assert sizes[-1] <= results["planned"]["expert_bytes"] <= sizes[1]  # planned: int2 to int8
    assert all(0 <= r["exact_match"] <= 100 for r in results.values())
    assert quality["goals"]["int8 within 1 point of float32"] == (
        abs(results["int8"]["exact_match"] - results["float32"]["exact_match"]) <= 1.0)
    assert "| int8 |" in (tmp_path / "out/results.md").read_text()


def run_text_quality(tmp_path: Path, monkeypatch, calibration: list[dict]) -> dict:
    """The quality table's text-set route, in this process, on a small saved sparse model whose experts are made
    large (x4: their output dominates the residual stream, so their quantisation shows in the logits)."""
    from lightning_moe.inference.store import expert_layers
    from lightning_moe.tokens import load_tokenizer
    from tests.inference.conftest import make_sparse_model
    from tests.test_retention import RECORDS

    tokenizer = load_tokenizer(ROOT / "data/tokenizer")
    model = make_sparse_model(tokenizer)
    with torch.no_grad():
        for _, moe in expert_layers(model):
            moe.w_in.mul_(4)
            moe.down_proj.mul_(4)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")  # the route reads the model's own tokenizer
    for name, records in (("set", RECORDS), ("calibration", calibration)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(sys, "argv", [
        "edge_offload.py", "--quick", "--only", "quality", "--checkpoint", str(tmp_path / "model"),
        "--quality-set", str(tmp_path / "set.jsonl"), "--calibration-set", str(tmp_path / "calibration.jsonl"),
        "--out", str(tmp_path / "out")])
    runpy.run_path(str(ROOT / "benchmarks/edge_offload.py"), run_name="__main__")
    return {"model": model, "tokenizer": tokenizer, **json.loads((tmp_path / "out/results.json").read_text())}


CALIBRATION = [{"id": "x", "question": "is there a blue cross?", "answers": ["yes"]},
               {"id": "y", "question": "how many circles are there?", "answers": ["three"]}]


def test_edge_offload_text_quality_table(tmp_path, monkeypatch):
    """--quality-set: each store scored against float32 on a text set; the float32 row against the resident model
    scored without any store (the oracle), each row's count of kept answers recounted here, and int2's large
    quantisation error moving the answers' NLL far beyond int8's."""
    from lightning_moe.retention import evaluate_retention
    from tests.test_retention import RECORDS

    run = run_text_quality(tmp_path, monkeypatch, CALIBRATION)
    results = run["quality"]["results"]
    assert list(results) == ["float32", "int8", "int4", "int2", "planned"]
    resident = evaluate_retention(run["model"], run["tokenizer"], RECORDS)
    f32 = results["float32"]
    assert f32["answers"] == resident.answers and f32["retained"] == f32["questions"] == len(RECORDS)
    # the same float32 weights, offloaded: only the order of the expert sums differs (float32 rounding, ~1e-7 relative)
    assert f32["answer_nll"] == pytest.approx(resident.answer_nll, rel=1e-5)
    for name, r in results.items():
        assert r["retained"] == sum(a == b for a, b in zip(r["answers"], resident.answers)), name
    change = {name: abs(r["answer_nll"] - f32["answer_nll"]) for name, r in results.items()}
    # an int2 step is 85x an int8 step (range / 3 against range / 255): its NLL change is far beyond int8's
    assert change["int2"] > 5 * change["int8"] > 0
    assert run["quality"]["goals"]["int8 answers every question as float32 does"] == (results["int8"]["retained"] == 3)
    text = (tmp_path / "out/results.md").read_text()
    assert "answers as float32" in text and f"--quality-set {tmp_path / 'set.jsonl'}" in text and "commit " in text


def test_edge_offload_text_quality_refuses_to_calibrate_on_scored_questions(tmp_path, monkeypatch):
    from tests.test_retention import RECORDS

    with pytest.raises(ValueError, match="1 calibration question.*in the scored set"):
        run_text_quality(tmp_path, monkeypatch, [*CALIBRATION, {**RECORDS[1], "id": "again"}])


# moe_layer.py is slow: its --quick run compiles the layer (aot_eager) for several shapes; the run is shared with the
# report's test. The others run in this process (the imports they would pay in a fresh one are most of their time).
@pytest.mark.parametrize("script", [pytest.param("moe_layer.py", marks=pytest.mark.slow), "lora_experts.py", "mole_step.py",
                                    "template_overhead.py"])
def test_speed_script_parity_checks_run(script, quick_outputs, monkeypatch, capsys):
    """Each script's --quick run asserts, before timing, that the implementations it compares compute the
    same thing on the same weights, and prints its table."""
    if script == "moe_layer.py":
        stdout = quick_outputs.console("moe_layer").stdout
    else:
        monkeypatch.setattr(sys, "argv", [script, "--quick"])
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
        stdout = capsys.readouterr().out
    assert "parity: ok" in stdout, stdout[-2000:]
    assert "|---" in stdout
    if script != "lora_experts.py":  # the stamp names the commit the run started from
        assert "commit " in stdout, stdout[-2000:]


@pytest.mark.slow  # compiles the layer (aot_eager) for two shapes
def test_moe_layer_cuda_mode_runs_on_the_cpu_and_says_what_it_skips():
    """`--device cuda`, what a GPU machine runs, falls back to the CPU here: the bfloat16 dispatch table with its
    parity checks, and the CUDA-only host-synchronisation count skipped with its reason."""
    stdout = run_script(str(ROOT / "benchmarks/moe_layer.py"), "--quick", "--only", "bf16", "--device", "cuda").stdout
    if "no CUDA device here" in stdout:
        assert "host synchronisations per step: not counted" in stdout
    assert "(grouped) | " in stdout and "(sorted) | " in stdout  # both eager dispatches timed
    assert "parity: ok (in bfloat16" in stdout, stdout[-2000:]


@pytest.mark.slow  # fresh processes (one, then one per seed), each importing the project
def test_seed_processes_benchmark_checks_that_weights_do_not_move_with_jobs(tmp_path):
    """benchmarks/seed_processes.py --quick: every seed's trained weights are bit for bit the same whether the
    seeds run one at a time or at once (with more threads than the cores, up to 4 cores); it writes the table with
    its commit."""
    stdout = run_script(str(ROOT / "benchmarks/seed_processes.py"), "--quick", "--out", str(tmp_path)).stdout
    assert "parity: ok" in stdout and "|---" in stdout and "commit " in stdout, stdout[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["parity"] and [row["weights_equal"] for row in results["rows"][:2]] == [True] * 2
    from lightning_moe.experiments import available_cores, seed_process_environment

    # PASSIVE up to 4 cores (as many seeds as cores at 2 threads each), unless the environment sets a policy
    policy = seed_process_environment(results["seeds"], 2, available_cores()).get("OMP_WAIT_POLICY", "unchanged")
    assert results["rows"][1]["way"] == f"b. at once, map_seeds: wait policy {policy}"
