"""The scripts in benchmarks/ still run against the current code (their figures are not checked:
numbers from a test run on a loaded machine would mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, TINY


def run_benchmark(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_generate_benchmark_runs():
    out = run_benchmark("generate.py", "--quick")
    assert "KV cache" in out and "model.generate alone" in out and "whole generate.py command" in out


def test_train_step_benchmark_runs_on_the_composed_config(corpus):
    out = run_benchmark(
        "train_step.py",
        *("--rows", "fp32", "--repeats", "1", "--steps", "1", "--warmup", "1"),
        *TINY,
        f"data.path={corpus}",
    )
    assert "| fp32, dropout 0" in out and "MFU" in out


def test_recipe_search_times_and_trains_float32_and_bf16_candidates(corpus, tmp_path):
    tiny = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch_size": 4,
            "position": "rope", "activation": "relu2", "lr": 0.004}  # fmt: skip
    grid = tmp_path / "grid.jsonl"
    candidates = [
        {**tiny, "optimizer": "adamw"},
        {**tiny, "optimizer": "muon", "precision": "bf16", "smear": True},
    ]
    grid.write_text("".join(json.dumps(candidate) + "\n" for candidate in candidates))
    timed = tmp_path / "timed.jsonl"
    timing = ["time", "--grid", str(grid), "--budget", "0.5", "--timed-steps", "2"]
    timed.write_text(run_benchmark("recipe_search.py", "--corpus", str(corpus), *timing))
    timings = [json.loads(line) for line in timed.read_text().splitlines()]
    assert [{key: t[key] for key in candidates[i]} for i, t in enumerate(timings)] == candidates
    assert all(t["ms_per_step"] > 0 and t["steps"] >= 1 for t in timings)
    results = run_benchmark(
        "recipe_search.py", "--corpus", str(corpus), "train", str(timed), "--device", "cpu"
    )
    losses = [json.loads(line)["val_loss"] for line in results.splitlines()]
    # A few dozen steps of a tiny model: below a uniform guess over the 65 characters (ln 65 = 4.17)
    # at most a little, far from a trained model.
    assert len(losses) == 2 and all(2.0 < loss < 4.5 for loss in losses)
