"""Val loss per CPU budget: runs the time-budgeted recipe and prints its final val loss and tokens seen.

    python benchmarks/quality.py [--experiment cpu_2min] [--run-dir DIR] [OVERRIDE ...]

Runs `python train.py experiment=cpu_2min data.val_fraction=0.1` (Tiny Shakespeare, the last
10% of characters validate: nanoGPT's split) in a subprocess, then reads the run's last
checkpoint, written at the end of the final validation: the steps trained, the val loss of that
validation (a full pass over the validation split), and Lightning's Timer, which counts from the
first training batch to there. trainer.max_time stops training when the Timer passes it, so the
final validation comes after the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="cpu_2min")
    parser.add_argument("--run-dir", type=Path, help="default: a new temporary directory")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for train.py")
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="quality_")) / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        f"experiment={args.experiment}",
        "data.val_fraction=0.1",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]
    print("$", " ".join(command[1:]), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
        sys.exit("error: the training run failed (its output is above)")

    # last.ckpt is written at the end of the final validation.
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    steps = checkpoint["global_step"]
    tokens = steps * cfg.data.batch_size * cfg.model.block_size * cfg.trainer.accumulate_grad_batches
    states = checkpoint["callbacks"]
    timer = next((v for k, v in states.items() if k.startswith("Timer")), None)
    train_seconds = timer["time_elapsed"]["train"] if timer else None
    val_loss = next(v["current_score"] for k, v in states.items() if k.startswith("ModelCheckpoint")).item()
    result = {
        "experiment": args.experiment,
        "val_loss": round(val_loss, 4),
        "steps": steps,
        "tokens_seen": tokens,
        "seconds_to_end_of_validation": None if train_seconds is None else round(train_seconds, 1),
        "max_time": cfg.trainer.max_time,
        "run_dir": str(run_dir),
    }
    print(json.dumps(result))
    print(
        f"\n{args.experiment}: val loss {val_loss:.4f} after {steps:,} steps, {tokens:,} tokens seen, "
        f"{result['seconds_to_end_of_validation']} s from the first batch to the end of the final validation "
        "(README, Performance, compares it with nanoGPT's recipe on the same budget)"
    )


if __name__ == "__main__":
    main()
