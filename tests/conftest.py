"""Shared fixtures: the real corpus, and one tiny real training run reused by many tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import forkserver
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

# One thread per process: the tiny models gain nothing from two, and where the cores are busy
# (a shared CI machine, two DDP processes on two cores) threads waiting on each other made runs
# ten times slower. Set before torch is imported; subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = "1"

from micropgpt.data import TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, download

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
LOCAL_CORPUS = ROOT / "data" / "tinyshakespeare" / "input.txt"

# A model small enough that a few hundred steps take seconds on one CPU core.
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "data.batch_size=16",
    "trainer.val_check_interval=20",
    "trainer.log_every_n_steps=5",
    "trainer.enable_progress_bar=false",
    "callbacks.text_samples.num_chars=50",
]


def require_extra(module: str) -> None:
    """Skip a test whose optional extra is not installed, except under CI (CI=true), which installs
    every extra: there a missing one fails the test, so CI never passes by skipping."""
    if os.environ.get("CI") == "true":
        __import__(module)
    else:
        pytest.importorskip(module)


@pytest.fixture(scope="session")
def corpus() -> Path:
    """Tiny Shakespeare: the project's copy, else a shared copy beside the clone, else downloaded."""
    for path in (LOCAL_CORPUS, SHARED_CORPUS):
        if path.exists():
            return path
    download(TINY_SHAKESPEARE_URL, LOCAL_CORPUS, TINY_SHAKESPEARE_SHA256)
    return LOCAL_CORPUS


def run_train(run_dir: Path, *overrides: str, data_dir: Path | None = None, check: bool = True):
    """`python train.py` in a subprocess with an explicit run dir; returns the CompletedProcess."""
    data_dir = data_dir or run_dir.parent / "data"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"hydra.run.dir={run_dir}",
        f"data.data_dir={data_dir}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # No stdin (forkserver.run's): nothing may wait for an answer (a tracker's login prompt).
    result = forkserver.run(cmd, cwd=ROOT, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_train_without(plugin: str, *argv: str) -> subprocess.CompletedProcess:
    """`python train.py *argv` as if the optional Hydra plugin module `plugin` were not installed."""
    hide_plugin = (
        f"import runpy, sys; sys.modules[{plugin!r}] = None; sys.argv = ['train.py', *{list(argv)!r}]; "
        "runpy.run_path('train.py', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", hide_plugin], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus) -> Path:
    """A finished 60-step training run of a tiny model on Tiny Shakespeare: its run dir."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    run_train(run_dir, *TINY, "trainer.max_steps=60", f"data.path={corpus}")
    return run_dir


def tensorboard_hparams(run_dir: Path) -> dict:
    """The hyperparameters in the run's TensorBoard event file (its HParams tab), as values."""
    (event_file,) = run_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file)).Reload()
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = HParamsPluginData.FromString(content).session_start_info.hparams
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in hparams.items()}
