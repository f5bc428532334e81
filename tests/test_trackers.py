"""Trackers (conf/logger): CSV, TensorBoard with CSV, a real MLflow server, W&B offline, sweeps, errors."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, require_extra, run_train, run_train_without, tensorboard_hparams
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_sweep import run_sweep

# No usage reports from MLflow's client and server (they would try the network): for this process
# and every process it starts.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

# Ten steps, a validation of two batches every five: what each tracker records, in seconds.
SHORT = [
    *TINY,
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "+trainer.limit_val_batches=2",
    "+trainer.num_sanity_val_steps=0",
    "callbacks.throughput.window_size=2",  # ThroughputMonitor's rates need that many steps
]
METRICS = ("train/loss", "val/loss", "val/bpc", "lr-AdamW/matrices", "train/device/items_per_sec")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics_csv(run_dir: Path) -> list[dict]:
    (metrics_file,) = (run_dir / "csv").rglob("metrics.csv")
    with open(metrics_file, newline="") as f:
        return list(csv.DictReader(f))


def logged_steps(rows: list[dict], metric: str) -> list[int]:
    return [int(row["step"]) for row in rows if row[metric]]


def test_csv_logger_writes_metrics_and_hyperparameters(tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_train(run_dir, *SHORT, "logger=csv", f"data.path={corpus}")
    rows = read_metrics_csv(run_dir)
    for metric in METRICS:
        assert logged_steps(rows, metric), metric
    assert logged_steps(rows, "val/loss") == [4, 9]  # Lightning logs a validation at its last step's index
    assert all(0 < float(row["val/bpc"]) < 7 for row in rows if row["val/bpc"])
    (hparams_file,) = (run_dir / "csv").rglob("hparams.yaml")
    hparams = hparams_file.read_text()
    assert "n_embd: 32" in hparams and "vocab_size: 65" in hparams and "num_params:" in hparams
    assert not list(run_dir.rglob("events.out.tfevents.*"))  # TensorBoard was not chosen


def test_tensorboard_and_csv_at_once_both_get_everything(tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_train(run_dir, *SHORT, "logger=[tensorboard,csv]", f"data.path={corpus}")
    rows = read_metrics_csv(run_dir)
    for metric in METRICS:
        assert logged_steps(rows, metric), metric

    (event_file,) = run_dir.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for metric in METRICS:
        assert events.Scalars(metric), metric
    assert [sample.step for sample in events.Tensors("samples/text_summary")] == [5, 10]
    hparams = tensorboard_hparams(run_dir)
    assert hparams["n_embd"] == 32 and hparams["vocab_size"] == 65
    # The HParams tab without Lightning's placeholder points: every val/loss_best point is a real one.
    assert [event.step for event in events.Scalars("val/loss_best")] == [4, 9]


def wait_for_mlflow(server: subprocess.Popen, uri: str, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"mlflow server did not start:\n{log.read_text()}"
        time.sleep(0.5)


@contextmanager
def mlflow_server_in(root: Path):
    """A real MLflow tracking server on localhost, sqlite and artifacts under `root`: (its URI, process)."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", str(root / "artifacts")),
    ]
    with open(root / "server.log", "w") as log:
        # Its own process group, so that its workers stop with it; no job runner (7 more processes).
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            wait_for_mlflow(server, uri, root / "server.log")
            yield uri, server
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)  # its store is thrown away: no need to wait it out
                server.wait(timeout=60)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One server for the module's MLflow tests (it takes half a minute to start): its URI."""
    require_extra("mlflow")  # the [mlflow] extra, which CI installs
    with mlflow_server_in(tmp_path_factory.mktemp("mlflow")) as (uri, _):
        yield uri


def test_mlflow_run_has_metrics_params_and_text_samples(mlflow_server, tmp_path, corpus):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    run_train(run_dir, *SHORT, "logger=mlflow", f"logger.tracking_uri={mlflow_server}", f"data.path={corpus}")
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("micropgpt")
    (run,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.run_dir = '{run_dir}'")
    assert run.info.status == "FINISHED"
    assert "n_embd=32" in run.info.run_name  # named by its overrides, as TensorBoard's folder
    assert "sweep" not in run.data.tags
    for metric in METRICS:
        assert client.get_metric_history(run.info.run_id, metric), metric
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [4, 9]
    params = run.data.params
    assert params["n_embd"] == "32" and params["vocab_size"] == "65" and int(params["num_params"]) > 0
    samples = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/step_0000005.txt", "samples/step_0000010.txt"]
    sample = Path(client.download_artifacts(run.info.run_id, samples[-1], str(tmp_path))).read_text()
    assert len(sample) >= 50  # callbacks.text_samples.num_chars=50 after the prompt


def test_mlflow_sweep_makes_one_run_per_job_grouped_by_the_sweep(mlflow_server, tmp_path, corpus):
    from mlflow import MlflowClient

    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_dir, corpus, "model.n_embd=8,16", "logger=mlflow", f"logger.tracking_uri={mlflow_server}")
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("micropgpt")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.sweep = '{sweep_dir}'")
    assert len(runs) == 2
    assert sorted(run.data.params["n_embd"] for run in runs) == ["16", "8"]
    assert sorted(run.data.tags["run_dir"] for run in runs) == [str(sweep_dir / "0"), str(sweep_dir / "1")]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert f"n_embd={run.data.params['n_embd']}" in run.info.run_name
        assert client.get_metric_history(run.info.run_id, "val/loss")


def test_unreachable_mlflow_server_is_one_line_and_training_does_not_start(tmp_path, corpus):
    require_extra("mlflow")  # the [mlflow] extra, which CI installs
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    result = run_train(
        run_dir, *SHORT, "logger=mlflow", f"logger.tracking_uri={uri}", f"data.path={corpus}", check=False
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: MLflow tracking server {uri} does not answer (Connection refused); start it "
        "(mlflow server --host 127.0.0.1 --port 5000) or pass logger.tracking_uri=<its address>"
    ]
    assert not (run_dir / "checkpoints").exists()


def test_mlflow_server_lost_during_training_is_one_warning_and_training_goes_on(tmp_path, corpus):
    require_extra("mlflow")  # the [mlflow] extra, which CI installs
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    with mlflow_server_in(tmp_path) as (uri, server):
        overrides = [*TINY, "trainer.max_steps=200", "+trainer.limit_val_batches=2", f"data.path={corpus}"]
        command = [sys.executable, "train.py", f"hydra.run.dir={run_dir}", f"data.data_dir={tmp_path}/data"]
        # MLflow's own setting, so that the first send after the loss fails at once, not in minutes.
        env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        training = subprocess.Popen(
            [*command, *overrides, "logger=mlflow", f"logger.tracking_uri={uri}"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not last.exists() and training.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # the server dies after the first validation at step 20
        server.wait(timeout=30)
        stdout, stderr = training.communicate(timeout=600)
    assert training.returncode == 0, stderr
    assert torch.load(last, weights_only=True)["global_step"] == 200  # checkpoints went on
    lost = [line for line in stderr.splitlines() if "stopped answering" in line]
    assert len(lost) == 1
    # Refused, or reset on the connection kept open: whichever the first send after the loss met.
    causes = "Connection refused|Connection reset by peer|Remote end closed connection without response"
    assert re.search(f"MLflow tracking server {re.escape(uri)} stopped answering \\(({causes})\\)", lost[0])
    assert "Traceback" not in stdout + stderr


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_without_its_extra_says_which_extra_to_install(tracker, tmp_path, corpus):
    result = run_train_without(
        tracker,
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.data_dir={tmp_path / 'data'}",
        f"data.path={corpus}",
        f"logger=[tensorboard,{tracker}]",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: logger={tracker} needs {tracker}, an optional extra: pip install -e '.[{tracker}]'"
    )


def wandb_without_account(monkeypatch, home: Path) -> None:
    """No W&B account, key or settings: W&B's own files in `home` (and run_train gives no stdin)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(home / variable.lower()))


def test_wandb_without_a_login_is_one_line_and_training_does_not_start(tmp_path, corpus, monkeypatch):
    require_extra("wandb")  # the [wandb] extra, which CI installs
    wandb_without_account(monkeypatch, tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    result = run_train(run_dir, *SHORT, "logger=wandb", f"data.path={corpus}", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: logger=wandb: No API key configured. Use `wandb login` to log in; "
        "or log offline with WANDB_MODE=offline and `wandb sync` the run later"
    ]
    assert not (run_dir / "checkpoints").exists()


def wandb_records(run_file: Path):
    """The records of a W&B run file (`run-<id>.wandb`), the log `wandb sync` uploads.

    Its format is LevelDB's log format after a 7-byte header: 32 KiB blocks of chunks, each with a
    7-byte header (checksum, length, type: 1 whole, 2 first, 3 middle, 4 last), every record one of
    wandb's public protobuf `Record`s.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, offset, chunks = 32 * 1024, 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a chunk header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunks += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            yield Record.FromString(chunks)
            chunks = b""


def wandb_offline_run(run_dir: Path) -> dict:
    """What one offline W&B run under `run_dir` recorded: its run record, config and history rows."""
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run, config, history = None, {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append(
                {
                    item.key or ".".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return {"run": run, "config": config, "history": history, "files": run_file.parent / "files"}


def test_wandb_offline_sweep_makes_one_run_per_job_with_metrics_config_and_samples(
    tmp_path, corpus, monkeypatch
):
    require_extra("wandb")  # the [wandb] extra, which CI installs
    wandb_without_account(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network
    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_dir, corpus, "model.n_embd=8,16", "logger=wandb")
    runs = [wandb_offline_run(sweep_dir / job) for job in ("0", "1")]
    assert runs[0]["run"].run_id != runs[1]["run"].run_id  # the second job did not log into the first's run
    for run, n_embd in zip(runs, (8, 16), strict=True):
        assert run["run"].run_group == str(sweep_dir)
        assert run["run"].project == "micropgpt"
        assert f"n_embd={n_embd}" in run["run"].display_name
        assert run["config"]["n_embd"] == n_embd and run["config"]["vocab_size"] == 65
        for metric in METRICS:
            assert any(metric in row for row in run["history"]), metric
        assert [row["trainer/global_step"] for row in run["history"] if "val/loss" in row] == [2, 5]
        assert len(list((run["files"] / "media" / "table").glob("samples_*.table.json"))) == 2
