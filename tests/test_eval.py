"""eval.py as users run it: loss and bpc of a real checkpoint, on its run's split or on any text."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import forkserver
import pytest
import torch
from conftest import ROOT
from torch.nn import functional as F

from micropgpt.checkpoint import load_checkpoint

RESULT_KEYS = {"loss", "bpc", "characters", "windows", "checkpoint"}


def run_eval(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "eval.py"), "trainer.accelerator=cpu", *overrides]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return forkserver.run(cmd, cwd=cwd, env=env, timeout=600)


def evaluated(cwd: Path, *overrides: str) -> dict:
    """The JSON eval.py writes with out=, checked against the line it prints."""
    out = cwd / "result.json"
    result = run_eval(cwd, *overrides, f"out={out}")
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert written.keys() == RESULT_KEYS
    assert f"loss {written['loss']:.6f}  bpc {written['bpc']:.6f}" in result.stdout
    assert written["bpc"] == pytest.approx(written["loss"] / math.log(2), rel=1e-12)
    return written


def direct_loss(ckpt: Path, text: str, stride: int) -> tuple[float, int, int]:
    """(mean loss, scored characters, windows) computed here, window by window, on the GPT itself."""
    model, tokenizer = load_checkpoint(ckpt)
    ids = torch.tensor(tokenizer.encode(text))
    block = model.config.block_size
    losses, windows = [], 0
    with torch.no_grad():
        for start in range(0, len(ids) - block, stride):
            window = ids[start : start + block + 1]
            logits, _ = model(window[None, :-1])
            loss = F.cross_entropy(logits[0], window[1:], reduction="none")
            losses.append(loss if start == 0 else loss[block - stride :])
            windows += 1
    scored = torch.cat(losses).double()
    return scored.mean().item(), len(scored), windows


def test_a_run_dir_gives_back_its_best_val_loss(tiny_run, tmp_path):
    # From another working directory: the run's own data settings come from its .hydra/.
    result = evaluated(tmp_path / "elsewhere", f"ckpt={tiny_run}")
    best = json.loads((tiny_run / "result.json").read_text())["best_val_loss"]
    assert result["loss"] == pytest.approx(best, abs=1e-5)
    assert result["checkpoint"] == str(tiny_run / "checkpoints" / "best.ckpt")
    # Every non-overlapping window of block_size 32 of the validation split, the last 20%.
    split = 1_115_394 - int(1_115_394 * 0.8)
    assert result["windows"] == (split - 1) // 32
    assert result["characters"] == 32 * result["windows"]
    # The batch size changes how windows are grouped, not the result.
    assert evaluated(tmp_path, f"ckpt={tiny_run}", "data.batch_size=7")["loss"] == pytest.approx(
        result["loss"], abs=1e-6
    )


def test_another_text_file_is_scored_whole(tiny_run, corpus, tmp_path):
    text = corpus.read_text()[:5_000]
    other = tmp_path / "other.txt"
    other.write_text(text)
    result = evaluated(tmp_path, f"ckpt={tiny_run}", f"data.path={other}")
    loss, characters, windows = direct_loss(tiny_run / "checkpoints" / "best.ckpt", text, 32)
    assert result["characters"] == characters == (5_000 - 1) // 32 * 32
    assert result["windows"] == windows
    assert result["loss"] == pytest.approx(loss, abs=1e-5)


def test_stride_scores_each_character_once_with_more_context(tiny_run, corpus, tmp_path):
    text = corpus.read_text()[:5_000]
    other = tmp_path / "other.txt"
    other.write_text(text)
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    result = evaluated(tmp_path, f"ckpt={ckpt}", f"data.path={other}", "stride=8")
    loss, characters, windows = direct_loss(ckpt, text, 8)
    assert result["windows"] == windows == (5_000 - 33) // 8 + 1
    assert result["characters"] == characters == 32 + 8 * (windows - 1)
    assert result["loss"] == pytest.approx(loss, abs=1e-5)
    whole = evaluated(tmp_path, f"ckpt={ckpt}", f"data.path={other}", "stride=32")
    assert whole == evaluated(tmp_path, f"ckpt={ckpt}", f"data.path={other}")


def test_two_processes_give_the_one_process_result(tiny_run, tmp_path):
    one = evaluated(tmp_path, f"ckpt={tiny_run}")
    two = evaluated(tmp_path, f"ckpt={tiny_run}", "trainer.devices=2")
    assert two["characters"] == one["characters"] and two["windows"] == one["windows"]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.path={tmp}/odd.txt", "vocabulary lacks: 'é', 'ö', '☃'; evaluate on text written in its 65"),
        ("data.path=/no/such.txt", "corpus /no/such.txt does not exist"),
        ("stride=0", "stride=0 must be between 1 and block_size=32"),
    ],
)
def test_a_mistake_fails_in_one_line(tiny_run, tmp_path, override, expected):
    (tmp_path / "odd.txt").write_text("ROMEO: héllo, wörld ☃\n" * 10)
    out = tmp_path / "result.json"
    result = run_eval(tmp_path, f"ckpt={tiny_run}", override.format(tmp=tmp_path), f"out={out}")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and expected in line, line
    assert not out.exists()


def test_a_checkpoint_outside_a_run_dir_needs_a_text(tiny_run, tmp_path):
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes((tiny_run / "checkpoints" / "best.ckpt").read_bytes())
    result = run_eval(tmp_path, f"ckpt={loose}")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {loose} is not inside a run dir with .hydra/config.yaml, so its validation split is "
        "unknown; pass data.path= a text file to evaluate on"
    )
