"""micropgpt.train, sample and evaluate, as a notebook user calls them: a fresh Python process
outside the project, whose results must be those of the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_train

from micropgpt.sampling import SEPARATOR

OVERRIDES = [*TINY, "trainer.max_steps=20", "trainer.val_check_interval=10"]


def run_python(cwd: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_train_sample_and_evaluate_from_python_outside_the_project(tmp_path, corpus):
    overrides = [*OVERRIDES, f"data.path={corpus}"]
    report = tmp_path / "report.json"
    run_python(
        tmp_path,
        f"""
        import json
        import micropgpt
        from hydra import compose, initialize_config_dir
        from micropgpt.hydra_app import CONF_DIR

        # Both configs compose after `import micropgpt` alone, their schemas in force.
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            train_cfg = compose("train", overrides=["model.n_embd=64"])
            generate_cfg = compose("generate", overrides=["max_new_tokens=7"])
        try:
            # The prompt as typed (Hydra's grammar alone would refuse its quote): only n_embd is wrong.
            micropgpt.train(["callbacks.text_samples.prompt=What's this, ROMEO?", "model.n_embd=abc"])
        except micropgpt.UserError as e:
            typed = str(e)
        first = micropgpt.train({overrides!r})
        second = micropgpt.train({overrides!r})
        options = dict(prompt="ROMEO:", max_new_tokens=40)
        samples = [micropgpt.sample(first.run_dir, seed=seed, **options) for seed in (7, 7, 8)]
        try:
            micropgpt.train([*{overrides!r}, "model.n_embd=33"])
        except micropgpt.UserError as e:
            mistake = str(e)
        report = {{
            "composed": [train_cfg.model.n_embd, generate_cfg.max_new_tokens],
            "typed": typed,
            "runs": [first.run_dir, second.run_dir],
            "best": [first.best_val_loss, second.best_val_loss],
            "samples": samples,
            "evaluated": micropgpt.evaluate(first.run_dir),
            "mistake": mistake,
        }}
        open({str(report)!r}, "w").write(json.dumps(report))
        """,
    )
    report = json.loads(report.read_text())
    assert report["composed"] == [64, 7]
    assert "Value 'abc' of type 'str' could not be converted to Integer" in report["typed"]

    # Two calls, two runs, each with what `python train.py` leaves: outputs/ below the cwd.
    runs = [Path(run) for run in report["runs"]]
    assert runs[0] != runs[1] and all(run.parent.parent == tmp_path / "outputs" for run in runs)
    for run in runs:
        assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
        assert (run / "checkpoints" / "best.ckpt").is_file() and list(run.rglob("events.out.tfevents.*"))
        assert json.loads((run / "result.json").read_text())["status"] == "ok"
    # Same seed and config, same run; the same as the command's run.
    assert report["best"][0] == report["best"][1]
    command = run_train(tmp_path / "command", *OVERRIDES, f"data.path={corpus}")
    assert command.returncode == 0
    assert (
        json.loads((tmp_path / "command" / "result.json").read_text())["best_val_loss"] == report["best"][0]
    )

    same, again, other = report["samples"]
    assert same == again != other and same.startswith("ROMEO:") and len(same) == len("ROMEO:") + 40
    printed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate.py"),
            f"ckpt={runs[0]}",
            "prompt=ROMEO:",
            "max_new_tokens=40",
            "seed=7",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert printed.stdout == same + SEPARATOR

    assert report["evaluated"]["loss"] == pytest.approx(report["best"][0], abs=1e-5)

    # The one line `python train.py` prints after "error: ".
    failed = run_train(tmp_path / "failed", *OVERRIDES, f"data.path={corpus}", "model.n_embd=33", check=False)
    assert failed.returncode == 2
    assert f"error: {report['mistake']}" in failed.stderr.splitlines()
