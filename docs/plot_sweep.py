"""Plot best val loss against parameter count from a sweep's summary.csv (the `plot` extra).

    pip install -e ".[plot]"
    python docs/plot_sweep.py outputs/multirun/<date>/<time> --out docs/sweep_val_loss_vs_params.png

Each finished run is one point, labelled by the overrides that differ between runs (what was swept);
failed runs are left out.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter


def swept_labels(overrides: list[str]) -> list[str]:
    """Per run, the `key=value` overrides whose value varies across runs, keys without their group.

    `model.n_embd=64,trainer.max_steps=300` and `model.n_embd=128,trainer.max_steps=300`
    give `n_embd=64` and `n_embd=128`.
    """
    runs = [dict(item.split("=", 1) for item in line.split(",") if "=" in item) for line in overrides]
    keys = sorted({key for run in runs for key in run})
    swept = [key for key in keys if len({run.get(key) for run in runs}) > 1]
    return [",".join(f"{key.rsplit('.', 1)[-1]}={run.get(key)}" for key in swept) for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep dir holding summary.csv")
    parser.add_argument("--out", type=Path, default=Path("docs/sweep_val_loss_vs_params.png"))
    args = parser.parse_args()

    with open(args.sweep_dir / "summary.csv", newline="") as f:
        runs = [row for row in csv.DictReader(f) if row["status"] == "ok" and row["best_val_loss"]]
    if not runs:
        parser.exit(2, f"error: no finished run in {args.sweep_dir / 'summary.csv'}\n")

    params = [int(row["num_params"]) for row in runs]
    losses = [float(row["best_val_loss"]) for row in runs]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter(params, losses)
    labels = swept_labels([row["run"] for row in runs])
    for label, x, y in zip(labels, params, losses, strict=True):
        ax.annotate(
            label, (x, y), textcoords="offset points", xytext=(0, -8), ha="center", va="top", fontsize=8
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("parameters")
    ax.set_ylabel("best val loss (nats/char)")
    ax.set_title("Best val loss vs model size")
    ax.margins(x=0.2, y=0.2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
