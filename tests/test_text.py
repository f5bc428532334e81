"""Text as people type it: prompts and paths verbatim through train.py and generate.py, a quiet
console that names the run dir, run names, and the resume command as it would be typed."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import forkserver
import pytest
import torch
from conftest import ROOT, TINY
from test_generate import run_generate, samples_of

from micropgpt.hydra_app import typed_override, verbatim_overrides

# Every character class a prompt may hold, appended to the corpus so the model knows them.
PROMPTS = [
    "To be, or not to be",
    "What's this?",
    'He said "no"',
    "'quoted'",
    "a=b",
    "=starts with =",
    "x[1]",
    "[1,2]",
    "{a: 1}",
    "${oops}",
    "${now:%Y}",
    "\\${escaped}",
    "back\\slash",
    "ends in \\",
    "tab\there",
    "line\nbreak",
    "Привет, мир",
    "你好",
    "🙂 emoji",
    "null",
    "choice(a,b)",
    "+x=1 ~y",
]
EXTRA_TEXT = "".join(PROMPTS) + " %:()+~"
NOISES = ("litlogger", "LeafSpec", "srun")


def fake_srun(tmp_path: Path) -> dict[str, str]:
    """An environment with an `srun` on PATH, as on a machine with SLURM's tools installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHONUNBUFFERED": "1"}


def train(run_dir: Path, data_dir: Path, *overrides: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", f"data.data_dir={data_dir}"]
    result = forkserver.run([*cmd, *TINY, *overrides], cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def unicode_run(tmp_path_factory, corpus):
    """A 20-step run whose corpus, data dir and run dir have spaces, non-ASCII letters, = and commas
    in their names, on a corpus that holds every character of PROMPTS: (run dir, corpus, result)."""
    root = tmp_path_factory.mktemp("text")
    text_dir = root / "корпус dir, 1=a"
    text_dir.mkdir()
    text = root / text_dir / "текст ${v}, v=2.txt"
    text.write_text(corpus.read_text(encoding="utf-8")[:100_000] + EXTRA_TEXT * 20, encoding="utf-8")
    run_dir = root / "run dir ü" / "прогон 1"
    overrides = [
        f"data.path={text}",
        "trainer.max_steps=20",
        "callbacks.text_samples.prompt=What's ${x}, a=b",
    ]
    result = train(run_dir, root / "data dir", *overrides, env=fake_srun(root))
    return run_dir, text, result


def test_train_output_names_the_run_dir_first_and_has_no_noise(unicode_run):
    run_dir, _, result = unicode_run
    first = result.stdout.splitlines()[0]
    assert first == f"run dir: {run_dir}   (watch it: tensorboard --logdir {shlex.quote(str(run_dir))})"
    output = result.stdout + result.stderr
    for noise in NOISES:
        assert noise not in output, output
    # The sample command at the end, quoted for a shell, names this run.
    command = result.stdout.splitlines()[-1].removeprefix("sample with:   ")
    assert shlex.split(command) == [
        "python",
        "generate.py",
        f"ckpt={run_dir}",
        "prompt=ROMEO:",
        "max_new_tokens=500",
    ]


def test_the_text_sample_prompt_reaches_tensorboard_verbatim(unicode_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = unicode_run
    [event_file] = run_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file.parent), size_guidance={"tensors": 0})
    accumulator.Reload()
    samples = [
        event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors("samples/text_summary")
    ]
    assert samples and all(sample.startswith("    What's ${x}, a=b") for sample in samples)


def test_the_srun_hint_shows_inside_a_slurm_allocation(tmp_path, unicode_run):
    _, text, _ = unicode_run
    env = {**fake_srun(tmp_path), "SLURM_JOB_ID": "4242"}
    result = train(tmp_path / "run", tmp_path / "data", f"data.path={text}", "trainer.max_steps=1", env=env)
    assert "prepend your python command with `srun`" in result.stderr


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_prompt_is_taken_verbatim(unicode_run, tmp_path, prompt):
    run_dir, _, _ = unicode_run
    result = run_generate(tmp_path, f"ckpt={run_dir}", f"prompt={prompt}", "max_new_tokens=10")
    assert result.returncode == 0, result.stderr
    [sample] = samples_of(result.stdout, prompt)
    assert len(sample) == 10


def test_a_character_outside_the_vocabulary_is_one_line_naming_it(unicode_run, tmp_path):
    run_dir, _, _ = unicode_run
    result = run_generate(tmp_path, f"ckpt={run_dir}", "prompt=snow, ☃ = cold", "max_new_tokens=10")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: characters not in the vocabulary: '☃' (U+2603)")


def test_prompt_file_and_out_take_any_path(unicode_run, tmp_path):
    run_dir, _, _ = unicode_run
    where = tmp_path / "dir, with=odd ü"
    where.mkdir()
    prompt_file = where / "prompt ${not}, é=1.txt"
    prompt_file.write_text("Привет ${x}, a=b", encoding="utf-8")
    out = where / "out dir ü" / "samples, 1=2.txt"
    result = run_generate(
        tmp_path / "cwd", f"ckpt={run_dir}", f"prompt_file={prompt_file}", f"out={out}", "max_new_tokens=10"
    )
    assert result.returncode == 0, result.stderr
    samples_of(result.stdout, "Привет ${x}, a=b")
    assert out.read_text(encoding="utf-8") == result.stdout


def test_a_run_in_such_dirs_resumes(unicode_run, tmp_path):
    run_dir, text, _ = unicode_run
    resumed = tmp_path / "copy ü, a=b" / "прогон"
    shutil.copytree(run_dir, resumed)
    result = train(
        resumed,
        tmp_path / "data",
        f"data.path={text}",
        "trainer.max_steps=40",
        "ckpt_path=last",
        env=fake_srun(tmp_path),
    )
    assert "Restoring states from the checkpoint path" in result.stdout + result.stderr
    last = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 40


@pytest.mark.parametrize(
    "arg",
    [
        "prompt=To be, or not",
        "+prompt=What's ${x} \\${y} \\",
        "callbacks.text_samples.prompt=a=b [1] {c}",
        "data.path=/корпус dir/текст ${v} a=b.txt",
        "hydra.run.dir=outputs/a b/${now:%H}",
        "ckpt=/runs/it's here",
        "out=x\\'y",
    ],
)
def test_the_resume_command_gives_back_what_was_typed(arg):
    [override] = verbatim_overrides([arg])
    assert override != arg
    assert typed_override(override) == arg


def test_what_stays_hydras(tmp_path):
    existing = tmp_path / "a,b.txt"
    existing.write_text("x")
    args = [
        "-m",
        "model.n_embd=16,32",
        "+trainer.max_time=00:00:01:00",
        "data.path=choice(a.txt,b.txt)",
        "ckpt=null",
        "hydra.run.dir='already quoted'",
        'hydra.run.dir="as Lightning passes it"',
        "~callbacks.text_samples",
    ]
    assert verbatim_overrides(args) == args
    assert verbatim_overrides([f"data.path={existing}"]) == [f"data.path='{existing}'"]
    # No such file: a comma separates the paths of a sweep, each taken whole.
    assert verbatim_overrides(["data.path=a b.txt,ü.txt"]) == ["data.path='a b.txt','ü.txt'"]


def test_a_long_single_run_name_is_cut_with_a_stable_hash(unicode_run):
    run_dir, _, _ = unicode_run
    [event_file] = run_dir.rglob("events.out.tfevents.*")
    name = event_file.parent.name
    # TINY's keys without their groups and the paths left out, cut to 60 characters with a hash.
    assert len(name) == 60 and name[-7] == "~"
    assert name[:53] == "n_layer=2,n_head=2,n_embd=32,block_size=32,batch_size=16,val_check_interval=20"[:53]


def test_a_sweep_over_two_paths_runs_one_job_each_named_by_the_file(tmp_path, unicode_run):
    from test_sweep import FIXED, read_summary

    _, text, _ = unicode_run
    first, second = tmp_path / "один.txt", tmp_path / "два.txt"
    first.write_text(text.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    second.write_text(text.read_text(encoding="utf-8")[50_000:], encoding="utf-8")
    sweep_dir = tmp_path / "sweep dir ü"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}"]
    cmd += [f"data.data_dir={tmp_path / 'data'}", *(f"{k}={v}" for k, v in FIXED.items()), "model.n_embd=8"]
    result = subprocess.run(
        [*cmd, "data.path=один.txt,два.txt"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert sorted(row["run"] for row in read_summary(sweep_dir)) == ["path=два.txt", "path=один.txt"]
