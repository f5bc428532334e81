"""train.py through Hydra, in a subprocess: checkpoints, TensorBoard, resume, defaults, bad configs."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, run_train, tensorboard_hparams
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from micropgpt.checkpoint import load_checkpoint
from micropgpt.model import GPT, GPTConfig
from micropgpt.sampling import sample_batch


def events(run_dir: Path) -> EventAccumulator:
    """The run's one TensorBoard event file, read by TensorBoard's own reader, nothing sampled away."""
    (event_file,) = run_dir.rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "tensors": 0})
    return accumulator.Reload()


def steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def test_run_keeps_best_and_last_checkpoints_and_val_loss_decreases(tiny_run):
    assert (tiny_run / "checkpoints" / "best.ckpt").is_file()
    assert (tiny_run / "checkpoints" / "last.ckpt").is_file()
    assert (tiny_run / ".hydra" / "config.yaml").is_file()
    val_loss = [event.value for event in events(tiny_run).Scalars("val/loss")]
    assert len(val_loss) == 3  # every 20 of 60 steps
    assert all(later < earlier for earlier, later in itertools.pairwise(val_loss))
    assert val_loss[-1] < 3.9  # from ln 65 = 4.17 at the start


def test_tensorboard_has_scalars_text_samples_and_hparams(tiny_run):
    accumulator = events(tiny_run)
    for tag in ("train/loss", "val/bpc", "train/device/items_per_sec", "lr-AdamW/matrices"):
        assert steps(accumulator, tag), tag
    samples = accumulator.Tensors("samples/text_summary")
    assert [sample.step for sample in samples] == [20, 40, 60]
    text = samples[-1].tensor_proto.string_val[0].decode("utf-8")
    assert len(text.replace("\n    ", "")) >= 50

    hparams = tensorboard_hparams(tiny_run)
    assert (hparams["n_embd"], hparams["n_layer"], hparams["vocab_size"]) == (32, 2, 65)
    assert (hparams["optimizer"], hparams["scheduler"], hparams["smear"]) == ("adamw", "constant", False)
    assert "warmup_steps" not in hparams and "max_time" not in hparams  # not settings of this run


def test_text_samples_are_what_sampling_the_checkpoint_gives(tiny_run):
    # TextSamples and generate.py share micropgpt.sampling's path: the step-60 sample is last.ckpt's.
    model, tokenizer = load_checkpoint(tiny_run / "checkpoints" / "last.ckpt")
    [text] = sample_batch(model, tokenizer, "\n", 1, 0, max_new_tokens=50)
    logged = events(tiny_run).Tensors("samples/text_summary")[-1].tensor_proto.string_val[0].decode("utf-8")
    assert logged == "\n".join("    " + line for line in text.split("\n"))


def test_throughput_monitor_logs_tokens_samples_and_flops_per_second(tiny_run):
    accumulator = events(tiny_run)
    rates = {
        name: {event.step: event.value for event in accumulator.Scalars(f"train/device/{name}_per_sec")}
        for name in ("items", "samples", "flops")
    }
    # A 20-step window, then every 5 of the 60 steps; Lightning logs the n-th batch at step n - 1.
    assert (
        sorted(rates["items"]) == sorted(rates["samples"]) == sorted(rates["flops"]) == list(range(19, 60, 5))
    )
    model = GPT(GPTConfig(65, block_size=32, n_layer=2, n_head=2, n_embd=32))
    matrix_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops_per_token = 3 * (2 * matrix_weights + 4 * 2 * 32 * 32)
    for step, tokens_per_sec in rates["items"].items():
        assert tokens_per_sec > 0
        assert tokens_per_sec == pytest.approx(32 * rates["samples"][step], rel=1e-5)  # block_size 32
        assert rates["flops"][step] == pytest.approx(flops_per_token * tokens_per_sec, rel=1e-5)
    assert "train/device/mfu" not in accumulator.Tags()["scalars"]  # no known peak for a CPU


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(tiny_run):
    checkpoint = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert type(hparams["vocab"]) is list and all(type(c) is str for c in hparams["vocab"])
    assert len(hparams["vocab"]) == 65
    assert type(hparams["model"]) is dict
    assert hparams["model"]["n_embd"] == 32 and hparams["model"]["block_size"] == 32
    model = GPT(GPTConfig(vocab_size=len(hparams["vocab"]), **hparams["model"]))
    weights = {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    model.load_state_dict(weights)


def test_resume_continues_at_the_saved_global_step(tiny_run, tmp_path, corpus):
    last = tiny_run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 60
    run_dir = tmp_path / "resumed"
    run_train(
        run_dir,
        *TINY,
        "trainer.max_steps=100",
        f"data.path={corpus}",
        f"ckpt_path={last}",
        data_dir=tiny_run.parent / "data",
    )
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 100
    resumed = events(run_dir)
    assert min(steps(resumed, "train/loss")) > 60
    assert len(steps(resumed, "val/loss")) == 2  # at 80 and 100, none repeated from the first run
    assert min(steps(resumed, "val/loss")) > max(steps(events(tiny_run), "val/loss"))
    # The weights and optimizer continued: no jump back to the untrained loss of about 4.17.
    first_loss = resumed.Scalars("train/loss")[0].value
    assert first_loss < events(tiny_run).Scalars("train/loss")[0].value - 0.3


def test_a_callback_set_to_null_is_left_out(tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_train(run_dir, *TINY, "trainer.max_steps=20", f"data.path={corpus}", "callbacks.text_samples=null")
    accumulator = events(run_dir)
    assert steps(accumulator, "val/loss") and "lr-AdamW/matrices" in accumulator.Tags()["scalars"]
    assert "samples/text_summary" not in accumulator.Tags()["tensors"]


def test_logger_null_trains_and_checkpoints_without_a_logger(tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_train(run_dir, *TINY, "trainer.max_steps=20", f"data.path={corpus}", "logger=null")
    assert not list(run_dir.rglob("events.out.tfevents.*"))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["best_val_loss"] < 4.2


def test_cfg_job_shows_the_seed_defaults():
    result = subprocess.run(
        [sys.executable, "train.py", "--cfg", "job"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    expected = {
        "model.n_embd": 384,
        "model.n_head": 4,
        "model.n_layer": 4,
        "model.block_size": 128,
        "model.dropout": 0.2,
        "data.batch_size": 32,
        "data.val_fraction": 0.2,
        "optimizer.lr": 3e-4,
        "trainer.max_steps": 3000,
        "trainer.val_check_interval": 250,
        "seed": 1337,
        "ckpt_path": None,
    }
    assert {key: OmegaConf.select(cfg, key) for key in expected} == expected


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_model_shape_is_one_line(tmp_path, corpus):
    assert_one_line_error(
        tmp_path,
        ["model.n_embd=100", "model.n_head=3", f"data.path={corpus}"],
        "model.n_embd=100 is not divisible by model.n_head=3",
    )


def test_a_cosine_schedule_without_a_length_is_one_line(tmp_path, corpus):
    assert_one_line_error(
        tmp_path,
        [*TINY, "scheduler=cosine", "trainer.max_steps=-1", "trainer.max_epochs=1", f"data.path={corpus}"],
        "scheduler=cosine needs the number of steps to decay over, and scheduler.decay_steps is -1",
    )


def test_a_schedule_decayed_by_time_without_a_time_budget_is_one_line(tmp_path, corpus):
    assert_one_line_error(
        tmp_path,
        [*TINY, "scheduler=cosine", "scheduler.decay_by=time", f"data.path={corpus}"],
        "scheduler.decay_by=time decays over the training time budget, and trainer.max_time is not set",
    )


def test_an_unknown_decay_by_is_one_line(tmp_path, corpus):
    assert_one_line_error(
        tmp_path,
        [*TINY, "scheduler=cosine", "scheduler.decay_by=epochs", f"data.path={corpus}"],
        "scheduler.decay_by=epochs is not one of: steps, time",
    )


def test_missing_corpus_is_one_line(tmp_path):
    assert_one_line_error(tmp_path, ["data.path=/no/such/file"], "corpus /no/such/file does not exist")


def test_corpus_shorter_than_a_block_is_one_line(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question.\n" * 3, encoding="utf-8")
    assert_one_line_error(tmp_path, [*TINY, f"data.path={short}"], "fewer than model.block_size + 1 = 33")


def test_blocked_download_is_one_line_and_leaves_no_file(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/input.txt"
    data_dir = tmp_path / "empty"
    target = data_dir / "tinyshakespeare" / "input.txt"
    message = assert_one_line_error(tmp_path, [f"data.url={url}"], f"could not download {url}", data_dir)
    assert str(target) in message and "data.path=" in message
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


def assert_one_line_error(tmp_path: Path, overrides: list[str], expected: str, data_dir=None) -> str:
    result = run_train(tmp_path / "run", *overrides, data_dir=data_dir or tmp_path / "data", check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]
    return errors[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_embd=abc", "model.n_embd=abc: Value 'abc' of type 'str' could not be converted to Integer"),
        (
            "model.n_embdd=64",
            "no key model.n_embdd in the config; did you mean model.n_embd? (model.n_embd=64)",
        ),
        (
            "trainer.max_tim=00:00:01:00",
            "no key trainer.max_tim in the config; did you mean trainer.max_time? It is an argument of "
            "lightning.pytorch.Trainer that the config does not set, so it needs a +: "
            "+trainer.max_time=00:00:01:00",
        ),
        (
            "trainer.max_time=00:00:01:00",
            "trainer.max_time is not in the config, so it needs a +: +trainer.max_time=00:00:01:00 (it is an "
            "argument of lightning.pytorch.Trainer that the config leaves at its default)",
        ),
        (
            "max_time=00:00:01:00",  # not the HParams copy, callbacks.hparams.params.max_time
            "no key max_time in the config; did you mean trainer.max_time? It is an argument of "
            "lightning.pytorch.Trainer that the config does not set, so it needs a +: "
            "+trainer.max_time=00:00:01:00",
        ),
        ("+model.n_embd=64", "model.n_embd is already in the config: drop the +, model.n_embd=64"),
        ("~sed", "no key sed in the config to delete; did you mean ~seed?"),
        (
            "optimizer=muonn",
            "optimizer=muonn: no such option; did you mean optimizer=muon? (options: adamw, muon)",
        ),
        ("prompt=ROMEO:", "no key prompt in the config; did you mean callbacks.text_samples.prompt?"),
        (
            "model.n_layer=2,4",
            "model.n_layer=2,4: a comma separates several values; add -m to run one job for each",
        ),
    ],
)
def test_a_mistake_hydra_finds_in_composing_is_one_line_naming_the_closest_key(tmp_path, override, message):
    result = run_train(tmp_path / "run", override, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {message}")
    assert not (tmp_path / "run").exists()  # nothing ran
