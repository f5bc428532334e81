"""How often a ddp_spawn sweep job fails: one `train.py -m` sweep of N tiny jobs, each on 2 CPU processes.

    python benchmarks/ddp_spawn_repeat.py [--jobs 30] [--out DIR]

Each job is the one of tests/test_scale.py's ddp_spawn sweep test (a 1-layer model, 6 steps,
trainer.strategy=ddp_spawn on 2 CPU processes over gloo), with its own seed. The sweep goes on
past a failed job (its result.json says why), so the summary counts the failures. Prints the
failure count and rate, and whether matplotlib (imported by torchmetrics when installed, which
made such jobs abort at exit; see README, Reliability) was importable.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "tinyshakespeare" / "input.txt"
JOB = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
    "model.block_size=16",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "+trainer.limit_val_batches=2",
    "+trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false",
    "callbacks.text_samples.num_chars=5",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.strategy=ddp_spawn",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="sweep dir (default: a temporary dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ddp_spawn_repeat_"))
    sweep_dir = out / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"hydra.sweep.dir={sweep_dir}",
        f"data.path={CORPUS}",
        f"data.data_dir={out / 'data'}",
        *JOB,
        f"seed=range({args.jobs})",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    summary = sweep_dir / "summary.csv"
    if not summary.exists():
        sys.exit(f"the sweep wrote no summary (exit {result.returncode}):\n{result.stderr[-3000:]}")
    with summary.open(newline="") as f:
        rows = list(csv.DictReader(f))
    failed = [row for row in rows if row["status"] != "ok"]
    matplotlib = importlib.util.find_spec("matplotlib") is not None
    print(f"matplotlib installed: {matplotlib}")
    print(f"jobs: {len(rows)}, failed: {len(failed)} ({len(failed) / len(rows):.0%}), {elapsed:.0f} s")
    for row in failed:
        print(f"  {row['overrides']}: {row['error']}")
    print(f"sweep dir: {sweep_dir}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
