"""The scripts in benchmarks/ still run against the current code (their figures are not checked:
numbers from a test run on a loaded machine would mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import forkserver
import pytest
from conftest import ROOT, TINY


def run_benchmark(script: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_generate_benchmark_runs():
    out = run_benchmark("generate.py", "--quick")
    assert "KV cache" in out and "model.generate alone" in out and "whole generate.py command" in out


def test_train_step_benchmark_runs_on_the_composed_config_and_leaves_no_files(corpus, tmp_path):
    out = run_benchmark(
        "train_step.py",
        *("--rows", "fp32", "--repeats", "1", "--steps", "1", "--warmup", "1"),
        *TINY,
        f"data.path={corpus}",
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert "| fp32, dropout 0" in out and "MFU" in out
    assert list(tmp_path.iterdir()) == []  # Lightning's logs and checkpoints went with its temporary dir


# Stands in for nanoGPT's train.py where its interface matters to the benchmark: the config
# globals it declares (its default values, so its configurator's type check applies), --key=value
# overrides of existing keys only, the data layout it reads, and its per-iteration log line. Each
# iteration "takes" 10 ms x (its number + 1), so the timed median is known.
NANOGPT_STAND_IN = """
import os, pickle, sys
from ast import literal_eval
import numpy as np

out_dir = "out"; eval_interval = 2000; log_interval = 1; eval_iters = 200
always_save_checkpoint = True; dataset = "openwebtext"; gradient_accumulation_steps = 40
batch_size = 12; block_size = 1024; n_layer = 12; n_head = 12; n_embd = 768; dropout = 0.0
bias = False; learning_rate = 6e-4; max_iters = 600000; weight_decay = 1e-1; beta1 = 0.9
beta2 = 0.95; grad_clip = 1.0; decay_lr = True; device = "cuda"; dtype = "bfloat16"; compile = True
exec(open("configurator.py").read())
assert (n_layer, n_head, n_embd, block_size, batch_size) == (2, 2, 32, 32, 16), "model or batch"
assert (dropout, bias, beta2, grad_clip, decay_lr, compile) == (0.0, True, 0.99, 1.0, False, False)
data_dir = os.path.join("data", dataset)
vocab_size = pickle.load(open(os.path.join(data_dir, "meta.pkl"), "rb"))["vocab_size"]
for split in ("train", "val"):
    ids = np.memmap(os.path.join(data_dir, split + ".bin"), dtype=np.uint16, mode="r")
    assert len(ids) > block_size and ids.max() < vocab_size, split
for it in range(max_iters + 1):
    print(f"iter {it}: loss 4.1000, time {10 * (it + 1):.2f}ms, mfu -100.00%")
"""

# nanoGPT's configurator contract: only keys train.py declares, values of the declared type.
CONFIGURATOR_STAND_IN = """
for arg in sys.argv[1:]:
    key, value = arg[2:].split("=", 1)
    assert key in globals(), f"Unknown config key: {key}"
    try:
        value = literal_eval(value)
    except (SyntaxError, ValueError):
        pass
    assert type(value) == type(globals()[key]), key
    globals()[key] = value
"""


@pytest.fixture
def nanogpt_stand_in(tmp_path):
    checkout = tmp_path / "nanoGPT"
    checkout.mkdir()
    (checkout / "train.py").write_text(NANOGPT_STAND_IN)
    (checkout / "configurator.py").write_text(CONFIGURATOR_STAND_IN)
    (checkout / "model.py").write_text("")
    return checkout


def test_train_step_benchmark_runs_nanogpts_train_py_on_the_same_model(corpus, nanogpt_stand_in, tmp_path):
    records = tmp_path / "records.jsonl"
    out = run_benchmark(
        "train_step.py",
        *("--rows", "fp32", "--repeats", "2", "--steps", "3", "--warmup", "1"),
        # Relative to the benchmark's working dir, as a user types it; nanoGPT runs from another.
        *("--nanogpt", nanogpt_stand_in.name, "--json-out", str(records)),
        *TINY,
        f"data.path={corpus}",
        cwd=nanogpt_stand_in.parent,
    )
    record = json.loads(records.read_text().splitlines()[1])
    # Iterations 0 (with its evaluation) and 1 (untimed) are left out: the median of 30, 40, 50 ms.
    assert record["nanogpt"]["ms_per_step_each"] == [40.0, 40.0]
    assert record["ratio_b_c"] > 0 and "nanoGPT ms/step" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.position=rope", "nanoGPT's train.py has no model.position=rope; compare on"),
        (None, "no train.py, model.py, configurator.py there"),
    ],
)
def test_train_step_benchmark_says_what_nanogpt_cannot_compare(corpus, nanogpt_stand_in, override, message):
    checkout = nanogpt_stand_in if override else nanogpt_stand_in.parent / "empty"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--rows", "fp32",
         "--nanogpt", str(checkout), *TINY, f"data.path={corpus}", *([override] if override else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert message in result.stderr.strip().splitlines()[-1]


def test_recipe_search_times_and_trains_float32_bf16_and_batch_scheduled_candidates(corpus, tmp_path):
    tiny = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch_size": 4,
            "position": "rope", "activation": "relu2", "lr": 0.004}  # fmt: skip
    grid = tmp_path / "grid.jsonl"
    candidates = [
        {**tiny, "optimizer": "adamw"},
        {**tiny, "optimizer": "muon", "precision": "bf16", "smear": True},
        # batch 2 for the first half of the budget, then 4
        {**tiny, "optimizer": "muon", "unet_skips": True, "batch_schedule": [[0, 2], [0.5, 4]], "seed": 7},
    ]
    grid.write_text("".join(json.dumps(candidate) + "\n" for candidate in candidates))
    timed = tmp_path / "timed.jsonl"
    timing = ["time", "--grid", str(grid), "--budget", "0.5", "--timed-steps", "2"]
    timed.write_text(run_benchmark("recipe_search.py", "--corpus", str(corpus), *timing))
    timings = [json.loads(line) for line in timed.read_text().splitlines()]
    assert [{key: t[key] for key in candidates[i]} for i, t in enumerate(timings)] == candidates
    # `train` also takes a hand-written line with its steps and no timing.
    timings.append({**tiny, "optimizer": "adamw", "steps": 20})
    assert all(t["ms_per_step"] > 0 and t["steps"] >= 1 for t in timings[:2])
    scheduled = timings[2]  # each stage's steps from its own batch size's step time
    assert len(scheduled["ms_per_step"]) == len(scheduled["stage_steps"]) == 2
    assert sum(scheduled["stage_steps"]) == scheduled["steps"] and min(scheduled["stage_steps"]) >= 1
    timed.write_text("".join(json.dumps(t) + "\n" for t in timings))
    results = run_benchmark(
        "recipe_search.py", "--corpus", str(corpus), "train", str(timed), "--device", "cpu"
    )
    losses = [json.loads(line)["val_loss"] for line in results.splitlines()]
    # A few dozen steps of a tiny model: below a uniform guess over the 65 characters (ln 65 = 4.17)
    # at most a little, far from a trained model.
    assert len(losses) == 4 and all(2.0 < loss < 4.5 for loss in losses)


@pytest.mark.parametrize("schedule", [[[0.2, 8]], [[0, 8], [0.6, 16], [0.4, 32]], [[0, 8], [1.0, 16]]])
def test_recipe_search_refuses_a_batch_schedule_not_rising_from_0_in_one_line(corpus, tmp_path, schedule):
    grid = tmp_path / "grid.jsonl"
    grid.write_text(json.dumps({"n_layer": 1, "batch_size": 8, "batch_schedule": schedule}) + "\n")
    script = [sys.executable, str(ROOT / "benchmarks" / "recipe_search.py"), "--corpus", str(corpus)]
    command = [*script, "time", "--grid", str(grid)]
    result = forkserver.run(command, cwd=ROOT, env=dict(os.environ), timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: batch_schedule {schedule}: the stages' shares of the budget must start at 0 and rise "
        "below 1, e.g. [[0, 8], [0.3, 16]]"
    ]
