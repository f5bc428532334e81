"""Sweep results: each run leaves a result.json in its run dir, a sweep gets one table over them.

Every run writes its result at its end, success or failure, so the table is built from files on
disk: it needs no state from the sweeper, and works the same for grid sweeps and Optuna searches.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from micropgpt.files import atomic_write

RESULT_FILE = "result.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"


@dataclass
class RunResult:
    """One run's outcome. `run` is its name in TensorBoard (micropgpt.hydra_app.run_name).

    `run_dir` is where the result was read from (`read_result`); result.json does not hold it.
    """

    run: str
    status: str  # "ok", "failed" or "interrupted" (Ctrl-C, SIGTERM: resumable from last.ckpt)
    optimizer: str | None = None
    position: str | None = None
    activation: str | None = None
    precision: str | None = None
    num_params: int | None = None
    steps: int | None = None  # optimizer steps trained, the resumed ones included
    best_val_loss: float | None = None
    tokens_per_sec: float | None = None
    wall_time_s: float | None = None
    best_checkpoint: str | None = None
    error: str | None = None
    run_dir: str | None = None

    @property
    def best_val_bpc(self) -> float | None:
        return None if self.best_val_loss is None else self.best_val_loss / math.log(2)


def _stored(result: RunResult) -> dict:
    fields = asdict(result)
    del fields["run_dir"]
    return fields


def write_result(run_dir: Path, result: RunResult) -> None:
    text = json.dumps(_stored(result), indent=2) + "\n"
    atomic_write(Path(run_dir) / RESULT_FILE, lambda f: f.write(text.encode()))


def read_result(run_dir: Path) -> RunResult:
    """The result.json of the run in `run_dir`, with its run_dir."""
    fields = json.loads((Path(run_dir) / RESULT_FILE).read_text())
    return RunResult(**fields, run_dir=str(run_dir))


def read_results(sweep_dir: Path) -> list[tuple[str, RunResult]]:
    """(job dir relative to `sweep_dir`, result) of every run below `sweep_dir`, best val loss first.

    Failed runs and runs without a validation come last, in job order.
    """
    sweep_dir = Path(sweep_dir)
    runs = [
        (path.parent.relative_to(sweep_dir).as_posix(), RunResult(**json.loads(path.read_text())))
        for path in sweep_dir.rglob(RESULT_FILE)
    ]

    def rank(run: tuple[str, RunResult]):
        job, result = run
        loss = result.best_val_loss
        order = int(job) if job.isdigit() else math.inf
        return (loss is None, loss if loss is not None else 0.0, order, job)

    return sorted(runs, key=rank)


COLUMNS = (
    "job",
    "run",
    "optimizer",
    "position",
    "activation",
    "precision",
    "num_params",
    "steps",
    "best_val_loss",
    "best_val_bpc",
    "tokens_per_sec",
    "wall_time_s",
    "status",
    "best_checkpoint",
    "error",
)


def _row(job: str, result: RunResult, sweep_dir: Path) -> dict:
    checkpoint = result.best_checkpoint
    if checkpoint and Path(checkpoint).is_relative_to(sweep_dir):
        checkpoint = Path(checkpoint).relative_to(sweep_dir).as_posix()
    return {
        **_stored(result),
        "job": job,
        "best_val_bpc": result.best_val_bpc,
        "best_checkpoint": checkpoint,
    }


def _markdown_cell(column: str, value) -> str:
    if value is None:
        return ""
    if column == "num_params":
        return f"{value:,}"
    if column in ("best_val_loss", "best_val_bpc"):
        return f"{value:.4f}"
    if column == "tokens_per_sec":
        return f"{value:,.0f}"
    if column == "wall_time_s":
        return f"{value:.1f}"
    return str(value).replace("|", "\\|")


def write_summary(sweep_dir: Path) -> str:
    """Write summary.csv and summary.md into `sweep_dir`, one row per run; returns the Markdown."""
    sweep_dir = Path(sweep_dir).resolve()
    rows = [_row(job, result, sweep_dir) for job, result in read_results(sweep_dir)]

    csv_text = io.StringIO()
    writer = csv.DictWriter(csv_text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(sweep_dir / SUMMARY_CSV, lambda f: f.write(csv_text.getvalue().encode()))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(_markdown_cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    atomic_write(sweep_dir / SUMMARY_MD, lambda f: f.write(markdown.encode()))
    return markdown
