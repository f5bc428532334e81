"""Hydra sweeps through `train.py -m`: one run dir each, run names, HParams, the summary, failures."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import forkserver
import pytest
from conftest import ROOT, run_train_without, tensorboard_hparams
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Fixed settings of a tiny, seconds-long run. Run names leave them out: they carry only what varies.
FIXED = {
    "model.n_head": "2",
    "model.block_size": "16",
    "data.batch_size": "8",
    "trainer.max_steps": "6",
    "trainer.val_check_interval": "3",
    "+trainer.limit_val_batches": "2",
    "+trainer.num_sanity_val_steps": "0",
    "trainer.log_every_n_steps": "2",
    "trainer.enable_progress_bar": "false",
    "callbacks.text_samples.num_chars": "5",
    "callbacks.throughput.window_size": "2",  # tokens/s in summary.csv after 6 steps
}


def run_sweep(
    sweep_dir: Path, corpus: Path, *overrides: str, returncode: int = 0
) -> subprocess.CompletedProcess:
    """`python train.py -m` in a subprocess with tiny fixed settings; fails the test on another exit."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"hydra.sweep.dir={sweep_dir}",
        f"data.path={corpus}",
        f"data.data_dir={sweep_dir.parent / 'data'}",
        *(f"{key}={value}" for key, value in FIXED.items()),
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = forkserver.run(cmd, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == returncode, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def read_summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, corpus) -> tuple[Path, subprocess.CompletedProcess]:
    sweep_dir = tmp_path_factory.mktemp("grid") / "sweep"
    result = run_sweep(sweep_dir, corpus, "model.n_embd=8,16", "model.n_layer=1,2")
    return sweep_dir, result


def test_grid_sweep_leaves_one_run_dir_per_combination(grid_sweep):
    sweep_dir, _ = grid_sweep
    for job in ("0", "1", "2", "3"):
        run_dir = sweep_dir / job
        assert (run_dir / ".hydra" / "config.yaml").is_file()
        assert (run_dir / "checkpoints" / "best.ckpt").is_file()
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"


def test_run_names_carry_what_the_sweep_varies_and_hparams_reach_tensorboard(grid_sweep):
    sweep_dir, _ = grid_sweep
    # TensorBoard names a run by its event files' folder relative to --logdir.
    names = {}
    for event_file in sweep_dir.rglob("events.out.tfevents.*"):
        run_dir = event_file.parent
        names[run_dir.relative_to(sweep_dir).as_posix()] = run_dir
    # The swept keys, without their group; none of the fixed overrides.
    assert sorted(names) == [
        "0/n_embd=8,n_layer=1",
        "1/n_embd=8,n_layer=2",
        "2/n_embd=16,n_layer=1",
        "3/n_embd=16,n_layer=2",
    ]
    for name, run_dir in names.items():
        hparams = tensorboard_hparams(run_dir)
        for key in ("n_embd", "n_layer", "n_head", "block_size", "lr", "dropout", "batch_size", "num_params"):
            assert key in hparams, (name, key)
        assert {key: hparams[key] for key in ("optimizer", "position", "activation", "precision")} == {
            "optimizer": "adamw",
            "position": "learned",
            "activation": "gelu",
            "precision": "32-true",
        }
        assert name.endswith(f"/n_embd={hparams['n_embd']:.0f},n_layer={hparams['n_layer']:.0f}")
        accumulator = EventAccumulator(str(run_dir)).Reload()
        assert "val/loss_best" in accumulator.Tags()["scalars"], name


def test_summary_has_one_row_per_run_sorted_by_val_loss_and_is_printed(grid_sweep):
    sweep_dir, result = grid_sweep
    rows = read_summary(sweep_dir)
    assert len(rows) == 4
    losses = [float(row["best_val_loss"]) for row in rows]
    assert losses == sorted(losses)
    assert {row["job"] for row in rows} == {"0", "1", "2", "3"}
    for row in rows:
        assert row["status"] == "ok"
        assert row["run"].startswith("n_embd=")
        assert (row["optimizer"], row["position"], row["activation"], row["precision"]) == (
            "adamw",
            "learned",
            "gelu",
            "32-true",
        )
        assert int(row["num_params"]) > 0
        assert float(row["tokens_per_sec"]) > 0
        assert float(row["wall_time_s"]) > 0
        assert (sweep_dir / row["best_checkpoint"]).is_file()
    # Bigger models have more parameters: the summary reads each run's own numbers.
    params = {row["run"]: int(row["num_params"]) for row in rows}
    assert params["n_embd=8,n_layer=1"] < params["n_embd=16,n_layer=2"]
    markdown = (sweep_dir / "summary.md").read_text()
    assert len(markdown.strip().splitlines()) == 2 + 4
    assert markdown in result.stdout


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, corpus):
    sweep_dir = tmp_path / "sweep"
    # n_embd=25 does not split into model.n_head=2 heads; 24 does.
    run_sweep(sweep_dir, corpus, "model.n_embd=25,24", "model.n_layer=1")
    rows = read_summary(sweep_dir)
    assert [(row["run"], row["status"]) for row in rows] == [("n_embd=24", "ok"), ("n_embd=25", "failed")]
    failed = rows[1]
    assert "model.n_embd=25 is not divisible by model.n_head=2" in failed["error"]
    assert failed["best_val_loss"] == ""
    assert (sweep_dir / "1" / "checkpoints" / "best.ckpt").is_file()


def test_a_sweep_whose_every_run_failed_exits_non_zero(tmp_path, corpus):
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(sweep_dir, corpus, "model.n_embd=25,27", "model.n_layer=1", returncode=1)
    assert [row["status"] for row in read_summary(sweep_dir)] == ["failed", "failed"]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: every run of the sweep in {sweep_dir} failed: see the table"
    )


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="needs the [sweep] extra (hydra-optuna-sweeper): pip install -e '.[sweep]'",
)
def test_optuna_search_runs_its_trials(tmp_path, corpus):
    sweep_dir = tmp_path / "sweep"
    run_sweep(
        sweep_dir,
        corpus,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        # A tiny search space replacing the config's, same keys.
        "model.n_embd=choice(8,16)",
        "model.n_layer=range(1,2)",
        "optimizer.lr=tag(log,interval(1e-3,1e-2))",
        "model.dropout=interval(0.0,0.2)",
    )
    rows = read_summary(sweep_dir)
    assert len(rows) == 3
    assert all(row["status"] == "ok" for row in rows)
    # Named by the search space's keys alone.
    assert all(
        sorted(item.split("=")[0] for item in row["run"].split(",")) == ["dropout", "lr", "n_embd", "n_layer"]
        for row in rows
    )
    results = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_params" in results
    assert f"best_value: {float(rows[0]['best_val_loss'])}" in results


def test_a_missing_sweep_extra_names_the_extra_to_install():
    result = run_train_without("hydra_plugins.hydra_optuna_sweeper", "hparams_search=optuna")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: hparams_search needs the Optuna sweeper, an optional extra: pip install -e '.[sweep]'"
    )


def test_two_sweeps_started_together_get_their_own_sweep_dirs_jobs_and_summaries(tmp_path, corpus):
    # ${now:%Y}: one time-based name for both, as two sweeps started in the same second get. The
    # working directory is tmp_path, where the relative sweep dir lands, as outputs/multirun/... would.
    def sweep(seeds: str) -> subprocess.Popen:
        command = [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "hydra.sweep.dir=multirun/${now:%Y}",
            f"data.path={corpus}",
            f"data.data_dir={tmp_path / 'data'}",
            *(f"{key}={value}" for key, value in FIXED.items()),
            "model.n_embd=8",
            "model.n_layer=1",
            f"seed={seeds}",
        ]
        pipe = subprocess.PIPE
        return subprocess.Popen(command, cwd=tmp_path, stdout=pipe, stderr=pipe, text=True)

    sweeps = [sweep("1,2"), sweep("3,4")]
    for process in sweeps:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{out}\n{err}"
    year = time.strftime("%Y")
    sweep_dirs = [tmp_path / "multirun" / year, tmp_path / "multirun" / f"{year}-1"]
    assert sorted((tmp_path / "multirun").iterdir()) == sweep_dirs
    seeds = set()
    for sweep_dir in sweep_dirs:
        rows = read_summary(sweep_dir)
        assert sorted(row["job"] for row in rows) == ["0", "1"]
        assert all(row["status"] == "ok" for row in rows)
        for job in ("0", "1"):
            assert (sweep_dir / job / "checkpoints" / "best.ckpt").is_file()
            job_config = (sweep_dir / job / ".hydra" / "hydra.yaml").read_text()
            assert f"output_dir: {sweep_dir / job}" in job_config
        # Each sweep ran its own two seeds, not the other's.
        sweep_seeds = {row["run"] for row in rows}  # named by the seed alone, what the sweep varies
        assert sweep_seeds in ({"seed=1", "seed=2"}, {"seed=3", "seed=4"})
        seeds |= sweep_seeds
    assert seeds == {"seed=1", "seed=2", "seed=3", "seed=4"}
