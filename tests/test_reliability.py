"""Reliability, as users meet it: train.py killed, interrupted, diverging, out of disk, run twice.

Every resumed run here is compared with the module's uninterrupted `reference` run (the same
config and seed): the final weights must be bit-identical, and so the validation loss. Hostile
and broken inputs must give one `error:` line, a non-zero exit, and leave earlier files intact.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import forkserver
import fsspec
import pytest
import torch
from conftest import ROOT, TINY
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from micropgpt.checkpoint import load_checkpoint, read_checkpoint
from micropgpt.checkpoint_io import AtomicCheckpointIO
from micropgpt.errors import UserError
from micropgpt.files import atomic_write, claim_new_dir
from micropgpt.module import GPTModule
from micropgpt.optim import MuonWithAdamW
from micropgpt.resume import check_resumable, resolve_ckpt_path

# One thread: quicker on a shared 2-core machine, and float sums are bit-identical only between
# runs that split them over the same number of threads.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
TINY_RUN = [*TINY, "trainer.max_steps=60"]


def train_command(run_dir: Path, data_dir: Path, *overrides: str) -> list[str]:
    where = [f"hydra.run.dir={run_dir}", f"data.data_dir={data_dir}"]
    return [sys.executable, str(ROOT / "train.py"), *where, *overrides]


def train(command: list[str], env=ENV, preexec_fn=None) -> subprocess.CompletedProcess:
    if preexec_fn is None:
        return forkserver.run(command, cwd=ROOT, env=env, timeout=600)
    # A process of its own, which preexec_fn sets up.
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn
    )


def start_train(command: list[str]) -> subprocess.Popen:
    pipe = subprocess.PIPE
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=pipe, stderr=pipe, text=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, corpus):
    """`tiny(run_dir, *overrides)`: the command of a tiny 60-step run; all share one data dir."""
    data_dir = tmp_path_factory.mktemp("reliability") / "data"

    def command(run_dir: Path, *overrides: str) -> list[str]:
        return train_command(run_dir, data_dir, *TINY_RUN, f"data.path={corpus}", *overrides)

    return command


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """The uninterrupted run that every interrupted one must reproduce: its run dir."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train(tiny(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


def val_losses(run_dir: Path) -> dict[int, float]:
    """val/loss by step over every TensorBoard event file of the run (a resumed run writes two).

    Lightning logs a validation after step N at step N - 1 (its count of batches stepped before).
    """
    losses = {}
    for event_file in run_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0}).Reload()
        if "val/loss" in accumulator.Tags()["scalars"]:
            losses.update({event.step: event.value for event in accumulator.Scalars("val/loss")})
    return losses


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    def weights(run: Path) -> dict[str, torch.Tensor]:
        state_dict = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
        return {key: value for key, value in state_dict.items() if key.startswith("model.")}

    ours, theirs = weights(run_dir), weights(reference)
    assert ours.keys() == theirs.keys()
    different = [key for key in ours if not torch.equal(ours[key], theirs[key])]
    assert not different, f"weights differ from the uninterrupted run's: {different}"


def assert_one_error_line(result: subprocess.CompletedProcess, expected: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0], errors[0]
    return errors[0]


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


# --- determinism ---


def test_same_seed_and_config_give_bit_identical_val_loss_and_weights(tiny, reference, tmp_path):
    result = train(tiny(tmp_path / "again"))
    assert result.returncode == 0, result.stderr
    assert len(val_losses(reference)) == 3
    assert val_losses(tmp_path / "again") == val_losses(reference)
    assert_same_weights(tmp_path / "again", reference)


# --- SIGKILL at any moment, SIGINT and SIGTERM ---


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"train.py ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def temp_files(directory: Path) -> set[str]:
    return {name for name in os.listdir(directory) if name.endswith(".tmp")} if directory.exists() else set()


def test_sigkill_even_mid_write_leaves_a_loadable_last_ckpt_and_resuming_matches(tiny, reference, tmp_path):
    """Killed three times, twice as soon as a checkpoint write starts; resumed each time with
    ckpt_path=last; the finished run has the uninterrupted run's weights, bit for bit."""
    run_dir = tmp_path / "killed"
    checkpoints, last = run_dir / "checkpoints", run_dir / "checkpoints" / "last.ckpt"
    # last.ckpt after every step: writes are a large part of the run, and kills land in them.
    every_step = "callbacks.last_checkpoint.every_n_train_steps=1"
    steps, kills_mid_write = [], 0
    for plan in ("mid-write", "anywhere", "mid-write"):
        before = last.stat().st_mtime_ns if last.exists() else None
        proc = start_train(tiny(run_dir, every_step, *(["ckpt_path=last"] if before else [])))
        wait_for(proc, lambda b=before: last.exists() and last.stat().st_mtime_ns != b, "a new last.ckpt")
        left_by_earlier_kills = temp_files(checkpoints)
        if plan == "mid-write":
            started = lambda old=left_by_earlier_kills: temp_files(checkpoints) > old  # noqa: E731
            wait_for(proc, started, "a checkpoint write")
        else:
            time.sleep(0.2)
        proc.kill()
        proc.communicate()
        # A writer killed before its rename leaves its temporary file behind, and last.ckpt whole.
        kills_mid_write += temp_files(checkpoints) > left_by_earlier_kills
        steps.append(read_checkpoint(last)["global_step"])
    assert kills_mid_write >= 1, "no kill landed in the middle of a checkpoint write"
    assert 0 < steps[0] < steps[1] < steps[2] < 60, steps

    left_by_kills = temp_files(checkpoints)
    result = train(tiny(run_dir, every_step, "ckpt_path=last"))
    assert result.returncode == 0, result.stderr
    assert read_checkpoint(last)["global_step"] == 60
    assert_same_weights(run_dir, reference)
    # Each resume removed what the kill before it left; so did the last one.
    assert temp_files(checkpoints) == set()
    assert ("note: removed" in result.stderr) == bool(left_by_kills)


def test_checkpoints_to_a_url_are_written_by_fsspec_not_into_a_local_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = {"state_dict": {"w": torch.arange(4.0)}}
    AtomicCheckpointIO().save_checkpoint(checkpoint, "memory://bucket/run/last.ckpt")
    with fsspec.open("memory://bucket/run/last.ckpt", "rb") as f:
        assert torch.equal(torch.load(f, weights_only=True)["state_dict"]["w"], torch.arange(4.0))
    assert list(tmp_path.iterdir()) == []  # no memory:/bucket/run folder

    # A whole run: the same Lightning writer for best.ckpt and last.ckpt, nothing local.
    result = train(
        tiny(tmp_path / "run", "trainer.max_steps=20", "callbacks.checkpoint.dirpath=memory://ckpts")
    )
    assert result.returncode == 0, result.stderr
    best = json.loads((tmp_path / "run" / "result.json").read_text())["best_checkpoint"]
    assert best == "memory://ckpts/best.ckpt"
    assert not (tmp_path / "run" / "checkpoints").exists() and not (ROOT / "memory:").exists()
    refused = train(tiny(tmp_path / "run", "callbacks.checkpoint.dirpath=memory://ckpts", "ckpt_path=last"))
    assert_one_error_line(refused, "ckpt_path=last: resuming reads local files only, and memory://ckpts/")


def kill_mid_write(target: Path) -> Path:
    """SIGKILLs an atomic_write of `target` while it writes; returns the temporary file it left."""
    write = "lambda f: (f.write(b'partial'), f.flush(), print(flush=True), time.sleep(600))"
    code = f"import sys, time, micropgpt.files as m\nm.atomic_write(m.Path(sys.argv[1]), {write})"
    target.parent.mkdir(parents=True, exist_ok=True)
    before = set(target.parent.iterdir())
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE)
    proc.stdout.readline()  # the write has begun
    proc.kill()
    proc.communicate()
    (left,) = set(target.parent.iterdir()) - before
    return left


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomically_written_files_get_the_mode_that_open_gives(tmp_path, umask):
    """Checkpoints, caches and result files, in a dir shared by a group (umask 002) too."""
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "atomic.json", lambda f: f.write(b"{}"))
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(previous)
    modes = {stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("atomic.json", "plain.json")}
    assert modes == {0o666 & ~umask}


def test_a_run_starting_in_a_run_dir_removes_only_the_temporary_files_of_killed_writes(tiny, tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    stale = [kill_mid_write(checkpoints / "last.ckpt"), kill_mid_write(run_dir / "result.json")]
    assert all(path.name.startswith(".") and path.name.endswith(".micropgpt.tmp") for path in stale)
    look_alikes = [
        checkpoints / ".last.ckpt.abcd1234.tmp",  # another program's temporary file
        checkpoints / "last.ckpt.abcd1234.micropgpt.tmp",  # not hidden
        checkpoints / ".last.ckpt.abc123.micropgpt.tmp",  # not 8 random characters
        checkpoints / ".last.ckpt.ABCD1234.micropgpt.tmp",
        run_dir / ".micropgpt.tmp",
        run_dir / "notes.tmp",
    ]
    for path in look_alikes:
        path.write_text("keep me")
    look_alike_dir = checkpoints / ".best.ckpt.abcd1234.micropgpt.tmp"
    look_alike_dir.mkdir()

    result = train(tiny(run_dir, "trainer.max_steps=20"))
    assert result.returncode == 0, result.stderr
    (note,) = [line for line in result.stderr.splitlines() if line.startswith("note: removed")]
    assert note.startswith("note: removed 2 temporary file(s) of killed writes: ")
    assert all(str(path) in note for path in stale)
    assert not any(path.exists() for path in stale)
    assert all(path.read_text() == "keep me" for path in look_alikes) and look_alike_dir.is_dir()
    assert {p.name for p in checkpoints.iterdir()} >= {"best.ckpt", "last.ckpt"}


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """The environment of a SLURM job step, with a stand-in `scontrol` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)
    job = {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "host"}
    ranks = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    return {**ENV, **job, **ranks, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def wait_for_step(proc: subprocess.Popen, last: Path, step: int) -> None:
    """Until last.ckpt holds `step` or a later one; it is read again only when it was replaced."""
    seen = {"mtime": None}

    def reached() -> bool:
        mtime = last.stat().st_mtime_ns if last.exists() else None
        if mtime == seen["mtime"]:
            return False
        seen["mtime"] = mtime
        return read_checkpoint(last)["global_step"] >= step

    wait_for(proc, reached, f"the last.ckpt of step {step}")


def stop_with(proc: subprocess.Popen, signal_name: str, last: Path) -> list[str]:
    """Sends the signal; checks the exit, the message and last.ckpt; returns the resume command."""
    proc.send_signal(getattr(signal, signal_name))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + getattr(signal, signal_name), err
    assert "Traceback" not in out + err
    step = read_checkpoint(last)["global_step"]
    assert f"{signal_name}: stopped at step {step}, checkpoint saved to {last}" in err
    [hint] = [line for line in err.splitlines() if line.startswith("resume with: ")]
    command = shlex.split(hint.removeprefix("resume with: "))
    assert command[:2] == ["python", "train.py"]
    assert f"hydra.run.dir={last.parent.parent}" in command and command[-1] == "ckpt_path=last"
    return [sys.executable, str(ROOT / "train.py"), *command[2:]]


def test_sigterm_and_sigint_save_last_ckpt_and_the_printed_command_resumes_exactly(tiny, reference, tmp_path):
    """In a SLURM job: after step 20, SLURM's SIGUSR1 (Lightning saves hpc_ckpt_1 and requeues)
    then its SIGTERM; resume; Ctrl-C after step 40; resume: the finished run is the reference."""
    env = fake_slurm(tmp_path)
    run_dir = tmp_path / "interrupted"
    last = run_dir / "checkpoints" / "last.ckpt"
    pipe = subprocess.PIPE

    proc = subprocess.Popen(tiny(run_dir), cwd=ROOT, env=env, stdout=pipe, stderr=pipe, text=True)
    wait_for_step(proc, last, 20)
    proc.send_signal(signal.SIGUSR1)
    requeued = tmp_path / "scontrol.args"
    wait_for(proc, lambda: requeued.exists() and requeued.read_text().strip(), "the requeue")
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    resume = stop_with(proc, "SIGTERM", last)
    stops = [read_checkpoint(last)["global_step"]]
    hpc_step = read_checkpoint(run_dir / "hpc_ckpt_1.ckpt")["global_step"]
    assert 20 <= hpc_step <= stops[0] < 60
    result = json.loads((run_dir / "result.json").read_text())
    assert (result["status"], result["steps"]) == ("interrupted", stops[0])

    proc = subprocess.Popen(resume, cwd=ROOT, env=env, stdout=pipe, stderr=pipe, text=True)
    wait_for_step(proc, last, 40)
    resume = stop_with(proc, "SIGINT", last)
    stops.append(read_checkpoint(last)["global_step"])
    assert json.loads((run_dir / "result.json").read_text())["steps"] == stops[1]

    result = train(resume, env=env)
    assert result.returncode == 0, result.stderr
    # The values, not their steps: resumed from a stop between two validations, Lightning counts
    # one batch fewer and logs one step lower than the uninterrupted run.
    losses, expected = val_losses(run_dir).values(), val_losses(reference).values()
    assert set(expected) <= set(losses)  # at steps 20, 40 and 60
    assert len(losses) == len(expected) + sum(step % 20 != 0 for step in stops)  # each stop's own
    assert_same_weights(run_dir, reference)


# --- the end of training ---


@pytest.mark.parametrize(
    "stop",
    [["trainer.max_steps=30"], ["trainer.max_steps=100000", "+trainer.max_time=00:00:00:04"]],
    ids=["max_steps", "max_time"],
)
def test_the_final_weights_are_validated_and_saved_whatever_step_training_stops_at(tiny, tmp_path, stop):
    run_dir = tmp_path / "run"
    result = train(tiny(run_dir, "trainer.val_check_interval=20", *stop))
    assert result.returncode == 0, result.stderr
    final = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert final == 30 if stop == ["trainer.max_steps=30"] else 0 < final < 100000
    losses = {step + 1: loss for step, loss in val_losses(run_dir).items()}  # by the step validated
    assert max(losses) == final
    best = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert best["global_step"] == min(losses, key=losses.get)
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["steps"] == final
    assert summary["best_val_loss"] == pytest.approx(min(losses.values()))
    assert f"last val/loss: {losses[final]:.4f} (step {final})" in result.stdout


def test_a_schedule_decayed_by_time_ends_its_decay_with_the_time_budget(tiny, tmp_path):
    """scheduler.decay_by=time: a 100,000-step cosine that a 4-second max_time stops still decays to
    its final lr, following the time spent rather than the steps taken."""
    run_dir = tmp_path / "run"
    schedule = ["scheduler=cosine", "scheduler.warmup_steps=2", "scheduler.min_lr_ratio=0.1"]
    stop = ["trainer.max_steps=100000", "+trainer.max_time=00:00:00:04", "trainer.val_check_interval=100000"]
    by_time = ["scheduler.decay_by=time", "optimizer.lr=1e-3", "trainer.log_every_n_steps=1"]
    result = train(tiny(run_dir, *schedule, *stop, *by_time))
    assert result.returncode == 0, result.stderr
    lrs = scalars(run_dir, "lr-AdamW/matrices")
    steps = sorted(step for step in lrs if step >= 2)
    assert len(steps) > 10 and steps[-1] < 99_999  # stopped by time, before decay_steps
    decay = [lrs[step] for step in steps]
    assert decay == sorted(decay, reverse=True) and decay[0] > 9e-4
    # The last step starts within a few steps' time of the budget's end: the lr is nearly the final one.
    assert 1e-4 <= decay[-1] < 1.05e-4
    halfway = [lr for lr in decay if lr < 5.5e-4]  # the cosine's midpoint, at half the time
    assert 0.3 < len(halfway) / len(decay) < 0.7


# --- divergence ---


def test_non_finite_loss_stops_with_one_line_and_saves_no_nan_weights(tiny, tmp_path):
    # AdamW with lr x weight_decay = 11 multiplies the weights by -10 every step: they overflow.
    run_dir = tmp_path / "diverged"
    overrides = ["trainer.val_check_interval=5", "optimizer.lr=0.1", "optimizer.weight_decay=110"]
    result = train(tiny(run_dir, *overrides))
    last = run_dir / "checkpoints" / "last.ckpt"
    line = assert_one_error_line(result, "training diverged: the loss is not finite from step ")
    first_bad = int(line.split("from step ")[1].split()[0])
    assert f"at step {first_bad - 1})" in line and "last finite loss " in line
    assert f"go back to {last} (ckpt_path=last)" in line
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = read_checkpoint(run_dir / "checkpoints" / name)
        assert checkpoint["global_step"] < first_bad
        assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


# --- resume: which checkpoint, and refusing the wrong ones ---


def test_ckpt_path_last_and_auto_find_last_ckpt_and_only_auto_may_start_afresh(reference, tmp_path):
    checkpoints, empty = reference / "checkpoints", tmp_path / "checkpoints"
    assert resolve_ckpt_path("last", checkpoints) == checkpoints / "last.ckpt"
    assert resolve_ckpt_path("auto", checkpoints) == checkpoints / "last.ckpt"
    assert resolve_ckpt_path("auto", empty) is None
    assert resolve_ckpt_path(None, checkpoints) is None
    missing = re.escape(f"ckpt_path=last but {empty / 'last.ckpt'} does not exist; pass hydra.run.dir=")
    with pytest.raises(UserError, match=missing):
        resolve_ckpt_path("last", empty)
    with pytest.raises(UserError, match=re.escape("is not a file; pass a .ckpt file, last or auto")):
        resolve_ckpt_path(str(tmp_path / "nowhere.ckpt"), checkpoints)


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """`tag` by step over every TensorBoard event file of the run (a resumed run writes two)."""
    values = {}
    for event_file in run_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0}).Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values


def test_an_extended_run_follows_the_resumed_commands_schedule_and_says_what_changed(tiny, tmp_path):
    """Trained 40 steps of a 40-step cosine, then resumed to 80 with another lr: from step 40 the lr
    is the 80-step schedule's at the new lr, as in a run configured so from the start."""
    cosine = ["scheduler=cosine", "scheduler.warmup_steps=10"]
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    assert train(tiny(extended, *cosine, "optimizer.lr=1e-3", "trainer.max_steps=40")).returncode == 0
    new_config = [*cosine, "optimizer.lr=2e-3", "trainer.max_steps=80"]
    result = train(tiny(extended, *new_config, "ckpt_path=last"))
    assert result.returncode == 0, result.stderr
    [note] = [line for line in result.stderr.splitlines() if line.startswith("note: resuming with")]
    assert "decay_steps 40 -> 80" in note and "lr 0.001 -> 0.002" in note, note
    assert train(tiny(fresh, *new_config)).returncode == 0

    tag = "lr-AdamW/matrices"
    resumed = {step: lr for step, lr in scalars(extended, tag).items() if step > 40}
    assert len(resumed) >= 7 and len(set(resumed.values())) == len(resumed)  # still decaying
    assert resumed == {step: lr for step, lr in scalars(fresh, tag).items() if step > 40}


def test_an_unchanged_resume_prints_no_note(reference, tiny, tmp_path):
    run_dir = shutil.copytree(reference, tmp_path / "run")
    result = train(tiny(run_dir, "trainer.max_steps=61", "ckpt_path=last"))
    assert result.returncode == 0, result.stderr
    assert "note: resuming with" not in result.stderr


def test_ckpt_path_last_and_auto_take_the_newest_of_last_ckpt_and_slurms_hpc_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    hpc = [run_dir / "hpc_ckpt_1.ckpt", run_dir / "hpc_ckpt_2.ckpt"]
    last = checkpoints / "last.ckpt"

    def write(path: Path, mtime: int) -> None:
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))

    write(hpc[0], 1000)  # Lightning's on SLURM's SIGUSR1, before the requeue
    write(hpc[1], 2000)
    for ckpt_path in ("last", "auto"):
        assert resolve_ckpt_path(ckpt_path, checkpoints, hpc_dir=run_dir) == hpc[1]
    write(last, 1500)  # older than hpc_ckpt_2: the validation before the SIGUSR1
    assert resolve_ckpt_path("last", checkpoints, hpc_dir=run_dir) == hpc[1]
    write(last, 3000)  # newer, as StopOnSignal writes it on the SIGTERM that follows
    for ckpt_path in ("last", "auto"):
        assert resolve_ckpt_path(ckpt_path, checkpoints, hpc_dir=run_dir) == last


class CallsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resuming_from_a_pickle_that_runs_code_refuses_it_and_runs_nothing(tiny, reference, tmp_path):
    checkpoint = read_checkpoint(reference / "checkpoints" / "last.ckpt")
    checkpoint["payload"] = CallsCode(tmp_path / "pwned")
    hostile = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, hostile)

    result = train(tiny(tmp_path / "run", f"ckpt_path={hostile}"))
    assert_one_error_line(result, f"{hostile} is untrusted: its pickle would import")
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def module_like(reference: Path, optimizer=torch.optim.AdamW, **model) -> GPTModule:
    """A GPTModule as train.py builds it for the reference's config, changed by `model`."""
    hparams = read_checkpoint(reference / "checkpoints" / "last.ckpt")["hyper_parameters"]
    return GPTModule(hparams["vocab"], {**hparams["model"], **model}, optimizer=optimizer)


def test_truncated_checkpoint_is_refused_for_resume_and_for_sampling(reference, tmp_path):
    data = (reference / "checkpoints" / "last.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is not a PyTorch checkpoint"):
        check_resumable(truncated, module_like(reference))
    with pytest.raises(UserError, match="is not a PyTorch checkpoint"):
        load_checkpoint(truncated)


def test_checkpoint_of_another_architecture_is_refused_for_resume_and_for_sampling(reference, tmp_path):
    last = reference / "checkpoints" / "last.ckpt"
    check_resumable(last, module_like(reference))
    with pytest.raises(UserError, match=r"trained with model\.n_embd=32, this run has model\.n_embd=64"):
        check_resumable(last, module_like(reference, n_embd=64))
    # For sampling: a file whose hyperparameters claim another shape than its weights have.
    mislabelled = read_checkpoint(last)
    mislabelled["hyper_parameters"]["model"]["n_layer"] = 3
    torch.save(mislabelled, tmp_path / "mislabelled.ckpt")
    with pytest.raises(UserError, match="weights do not fit its own model hyperparameters"):
        load_checkpoint(tmp_path / "mislabelled.ckpt")


def test_checkpoint_of_another_optimizer_or_without_one_is_refused_for_resume(reference, tmp_path):
    last = reference / "checkpoints" / "last.ckpt"  # trained with AdamW
    with pytest.raises(UserError, match=r"holds the state of another optimizer .*resume with the optimizer="):
        check_resumable(last, module_like(reference, optimizer=MuonWithAdamW))
    weights_only = read_checkpoint(last)
    del weights_only["optimizer_states"]
    torch.save(weights_only, tmp_path / "weights.ckpt")
    with pytest.raises(UserError, match="holds weights but no optimizer state"):
        check_resumable(tmp_path / "weights.ckpt", module_like(reference))


# --- disk full, read-only output ---


def limit_file_size(max_bytes: int):
    def apply() -> None:
        # Writes past the limit then fail with EFBIG (File too large) instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tiny, reference, tmp_path):
    run_dir = shutil.copytree(reference, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    before = file_bytes(checkpoints)
    assert min(len(data) for data in before.values()) > 200_000  # so the limit stops every checkpoint
    command = tiny(run_dir, "trainer.max_steps=80", "ckpt_path=last")
    result = train(command, preexec_fn=limit_file_size(200_000))
    line = assert_one_error_line(result, f"could not write checkpoint {checkpoints}/")
    assert "(File too large); the previous one is kept" in line
    assert file_bytes(checkpoints) == before  # unchanged, and no temporary file left


def without_root_override() -> None:
    """Makes root obey file permissions: drops CAP_DAC_OVERRIDE, which lets root write anywhere,
    from the capabilities that the exec'd process gets."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override = 24, 1  # from <linux/prctl.h>, <linux/capability.h>
    if libc.prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


def test_read_only_run_dir_is_one_line_and_changes_nothing(tiny, reference, tmp_path):
    run_dir = shutil.copytree(reference, tmp_path / "run")
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = file_bytes(run_dir / "checkpoints")
    try:
        as_root = os.geteuid() == 0
        result = train(tiny(run_dir, "ckpt_path=last"), preexec_fn=without_root_override if as_root else None)
        assert_one_error_line(result, f"run directory {run_dir} cannot be written (Permission denied)")
        assert file_bytes(run_dir / "checkpoints") == before
    finally:
        for path in [run_dir, *run_dir.rglob("*")]:
            path.chmod(0o755)


# --- concurrent runs ---


def test_claim_new_dir_gives_every_concurrent_caller_its_own_directory(tmp_path):
    claimed = []

    def claim() -> None:
        claimed.append(claim_new_dir(tmp_path / "12-00-00").name)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(["12-00-00", *(f"12-00-00-{n}" for n in range(1, 8))])


def test_two_runs_started_together_get_their_own_run_dirs(tmp_path):
    # ${now:%Y}: one time-based name for both, as two runs started in the same second get.
    runs = tmp_path / "outputs"
    procs = [
        start_train([sys.executable, "train.py", f"hydra.run.dir={runs}/${{now:%Y}}", seed, "data.path=/no"])
        for seed in ("seed=1", "seed=2")
    ]
    for proc in procs:
        proc.communicate(timeout=300)
        assert proc.returncode == 2  # the missing corpus, found after the run dir was made
    year = time.strftime("%Y")
    assert sorted(run.name for run in runs.iterdir()) == [year, f"{year}-1"]
    overrides = sorted((run / ".hydra" / "overrides.yaml").read_text() for run in runs.iterdir())
    assert ["seed=1" in text for text in overrides] == [True, False]  # each kept its own config


# --- generate.py: a prompt longer than the model's context ---


def test_prompt_longer_than_block_size_is_cropped_with_a_note(reference, tmp_path):
    prompt = "First Citizen: Before we proceed any further, hear me speak."
    command = [sys.executable, str(ROOT / "generate.py"), f"ckpt={reference}", f"prompt={prompt}"]
    result = subprocess.run([*command, "max_new_tokens=9"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"note: the prompt has {len(prompt)} characters, more than block_size 32" in result.stderr
    assert result.stdout.startswith(prompt)
