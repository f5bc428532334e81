"""The scripts in benchmarks/ still run against the current code (their figures are not checked:
numbers from a test run on a loaded machine would mean nothing)."""

from __future__ import annotations

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
