"""Scaling by config, on CPU: bf16-mixed, DDP and torchrun (gloo), sweeps with several devices,
the SLURM and FSDP configs, a 200 MB corpus in bounded memory, a directory corpus in any script."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, require_extra, run_train, run_train_without, tensorboard_hparams
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from rank_report import read_reports
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_sweep import read_summary, run_sweep

from micropgpt.data import DOCUMENT_SEPARATOR, encode_corpus
from micropgpt.errors import UserError
from micropgpt.model import Block
from micropgpt.sampling import SEPARATOR as SAMPLE_SEPARATOR

# Validation on a few batches and no sanity check: these runs test processes, not learning.
QUICK = [*TINY, "+trainer.limit_val_batches=4", "+trainer.num_sanity_val_steps=0"]
ON_CPU_TWICE = ["trainer.accelerator=cpu", "trainer.devices=2"]


RANK_REPORT = "+callbacks.rank_report._target_=rank_report.RankReport"


@contextlib.contextmanager
def reporting_to(out_dir: Path):
    """Environment for train.py subprocesses given RANK_REPORT: tests/rank_report.py importable,
    each process's report written to `out_dir`."""
    with pytest.MonkeyPatch.context() as patch:
        paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, paths)))
        patch.setenv("RANK_REPORT_DIR", str(out_dir))
        yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_folder(run_dir: Path) -> Path:
    (event_file,) = run_dir.rglob("events.out.tfevents.*")
    return event_file.parent


def assert_written_by_rank_zero_only(run_dir: Path, *logs: str) -> None:
    """The run dir holds one set of run files: one event file, one pair of checkpoints, one result."""
    tensorboard = tensorboard_folder(run_dir)
    assert {p.name for p in run_dir.iterdir()} == {
        ".hydra",
        "checkpoints",
        tensorboard.name,
        "result.json",
        *logs,
    }
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert {p.name for p in (run_dir / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}


# --- DDP: two processes on the CPU through train.py --------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, corpus) -> tuple[Path, Path, list[dict]]:
    root = tmp_path_factory.mktemp("ddp")
    outputs = root / "outputs"
    # Microseconds in the run dir: a process that computed its own run dir would make a second one.
    with reporting_to(root / "reports"):
        run_train(
            outputs / "${now:%H-%M-%S-%f}",
            *QUICK,
            "trainer.max_steps=40",
            f"data.path={corpus}",
            *ON_CPU_TWICE,
            "trainer.strategy=ddp",
            RANK_REPORT,
            data_dir=root / "data",
        )
    (run_dir,) = outputs.iterdir()
    return outputs, run_dir, read_reports(root / "reports")


def assert_process_group_ended(reports: list[dict]) -> None:
    """No process takes a process group or gloo's C++ threads into its exit (micropgpt.process_group)."""
    for report in reports:
        assert not report["process_group_alive"]
        assert not [name for name in report["native_threads"] if "gloo" in name], report["native_threads"]


def test_ddp_makes_one_run_dir_and_only_rank_zero_writes_to_it(ddp_run):
    _, run_dir, reports = ddp_run
    assert [r["global_rank"] for r in reports] == [0, 1]
    assert_process_group_ended(reports)
    assert {r["run_dir"] for r in reports} == {str(run_dir)}
    # Lightning re-runs train.py for rank 1 with the run dir and hydra.job.name=train_ddp_process_1.
    assert_written_by_rank_zero_only(run_dir, "train.log", "train_ddp_process_1.log")
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"


def test_ddp_ranks_agree_on_validation_and_train_on_different_windows(ddp_run):
    _, run_dir, (rank0, rank1) = ddp_run
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["val_loss"]) == 2  # at steps 20 and 40
    assert rank0["val_loss"] == rank1["val_loss"]  # exactly: torchmetrics synchronised them
    for rank, report in enumerate((rank0, rank1)):
        assert report["sampler"] == {"type": "RandomWindowSampler", "num_replicas": 2, "rank": rank}
        assert report["batch_shape"] == [16, 32]  # data.batch_size is per device
    assert rank0["first_batch"] != rank1["first_batch"]
    assert rank0["dropout_mask"] != rank1["dropout_mask"]  # each rank its own seed + rank
    logged = EventAccumulator(str(tensorboard_folder(run_dir))).Reload().Scalars("val/loss")
    assert [e.value for e in logged] == pytest.approx(rank0["val_loss"])


def test_a_ddp_run_resumed_on_two_processes_ends_with_the_uninterrupted_runs_weights(
    ddp_run, tmp_path, corpus
):
    """Trained to step 20, then resumed to 40: each rank's dropout stream, saved in last.ckpt,
    continues where it was, so the weights are those of ddp_run's 40 steps, bit for bit."""
    _, reference, _ = ddp_run
    run_dir = tmp_path / "resumed"
    ddp = [*QUICK, f"data.path={corpus}", *ON_CPU_TWICE, "trainer.strategy=ddp"]
    data_dir = tmp_path / "data"
    run_train(run_dir, *ddp, "trainer.max_steps=20", data_dir=data_dir)
    run_train(run_dir, *ddp, "trainer.max_steps=40", "ckpt_path=last", data_dir=data_dir)
    weights = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for run in (run_dir, reference)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert [key for key in weights[0] if not torch.equal(weights[0][key], weights[1][key])] == []


# --- Validation: the same val/loss on any number of processes ----------------------------------

VALIDATE_REPORT = Path(__file__).parent / "validate_report.py"
# Of Tiny Shakespeare, 1.4% validates: 487 windows of block 32 in 31 batches of 16, the last of 7.
# Neither count divides by 2 or 3, so padded or dropped windows would change the loss.
VAL_FRACTION, VAL_WINDOWS, VAL_BATCH = 0.014, 487, 16


def validate_on(processes: int, ckpt: Path, corpus: Path, tmp_path: Path, batch_size: int = VAL_BATCH):
    """Trainer.validate of `ckpt` on CPU processes (torchrun and gloo for several); the result."""
    out_dir = tmp_path / f"validate{processes}"
    args = [str(ckpt), str(corpus), str(tmp_path / "data"), str(VAL_FRACTION), str(batch_size), str(out_dir)]
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [*launch, str(VALIDATE_REPORT), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    reports = [json.loads(path.read_text()) for path in out_dir.glob("rank*.json")]
    return result, sorted(reports, key=lambda report: report["rank"])


def test_validation_counts_every_window_once_and_gives_one_loss_on_any_number_of_processes(
    tiny_run, corpus, tmp_path
):
    ckpt = tiny_run / "checkpoints" / "best.ckpt"
    losses = {}
    for processes in (1, 2, 3):
        result, reports = validate_on(processes, ckpt, corpus, tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert [(r["rank"], r["world_size"]) for r in reports] == [(n, processes) for n in range(processes)]
        assert {r["sampler"] for r in reports} == {"ValidationShardSampler"}
        # Each window once, in order, shared in contiguous runs: no padding, nothing dropped.
        assert reports[0]["val_windows"] == VAL_WINDOWS
        assert [w for r in reports for w in r["windows"]] == list(range(VAL_WINDOWS))
        assert len({r["val_loss"] for r in reports}) == 1  # synchronised over the processes
        losses[processes] = reports[0]["val_loss"]
    assert losses[2] == pytest.approx(losses[1], abs=1e-6)
    assert losses[3] == pytest.approx(losses[1], abs=1e-6)


def test_validation_on_more_processes_than_batches_is_refused_in_one_line(tiny_run, corpus, tmp_path):
    # 487 windows in batches of 400: two batches for three processes, one of which would wait forever.
    result, _ = validate_on(3, tiny_run / "checkpoints" / "best.ckpt", corpus, tmp_path, batch_size=400)
    assert result.returncode != 0
    message = (
        "the validation split has 2 batches of data.batch_size=400, fewer than the 3 processes, which need "
        "one each; use a larger data.val_fraction, a smaller data.batch_size or fewer devices"
    )
    assert message in result.stdout + result.stderr


# --- Sweeps with several devices -----------------------------------------------------------------


def test_a_sweep_with_script_relaunching_ddp_is_refused_in_one_line(tmp_path, corpus):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep_dir}"]
    overrides = [*QUICK, f"data.path={corpus}", f"data.data_dir={tmp_path / 'data'}", "model.n_embd=16,32"]
    result = subprocess.run(
        [*cmd, *overrides, *ON_CPU_TWICE, "trainer.strategy=ddp"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "a sweep (-m) on 2 devices cannot use DDPStrategy" in error
    assert "trainer.strategy=ddp_spawn" in error
    # Refused before any training: no checkpoint, no second job, no second sweep dir.
    assert not list(sweep_dir.rglob("*.ckpt"))
    assert not (sweep_dir / "1").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "data"] == ["sweep"]


def test_a_sweep_with_ddp_spawn_runs_each_job_on_two_processes(tmp_path, corpus):
    sweep_dir = tmp_path / "sweep"
    with reporting_to(tmp_path / "reports"):
        run_sweep(
            sweep_dir,
            corpus,
            "model.n_embd=16",
            "model.n_layer=1",
            *ON_CPU_TWICE,
            "trainer.strategy=ddp_spawn",
            RANK_REPORT,
        )
    # Each spawned process ends its gloo group before it exits: with the group alive at exit,
    # the second process aborted in some runs (benchmarks/ddp_spawn_repeat.py counts them).
    reports = read_reports(tmp_path / "reports")
    assert [r["global_rank"] for r in reports] == [0, 1]
    assert_process_group_ended(reports)
    (row,) = read_summary(sweep_dir)
    assert row["status"] == "ok"
    # ddp_spawn returns no best score to the main process; train.py takes val/loss_best instead.
    assert float(row["best_val_loss"]) < 4.5
    assert [p.name for p in sweep_dir.iterdir() if p.is_dir()] == ["0"]
    assert {p.name for p in (sweep_dir / "0" / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}


# --- Multi-node: torchrun with two nodes on the loopback interface -------------------------------


def test_torchrun_two_nodes_make_one_run_dir_written_by_rank_zero(tmp_path, corpus):
    run_dir = tmp_path / "run"
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    rendezvous = ["--master-addr=127.0.0.1", f"--master-port={port}"]
    train = [
        str(ROOT / "train.py"),
        f"hydra.run.dir={run_dir}",
        f"data.data_dir={tmp_path / 'data'}",
        f"data.path={corpus}",
        *QUICK,
        "trainer.max_steps=20",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "trainer.strategy=ddp",
        RANK_REPORT,
    ]
    logs = [tmp_path / f"node{node}.log" for node in (0, 1)]
    nodes = []
    with reporting_to(tmp_path / "reports"):
        for node, log in enumerate(logs):
            with log.open("w") as out:
                command = [*torchrun, *rendezvous, f"--node-rank={node}", *train]
                nodes.append(subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [node.wait(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)

    rank0, rank1 = read_reports(tmp_path / "reports")
    assert (rank0["node_rank"], rank1["node_rank"]) == (0, 1)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["val_loss"] == rank1["val_loss"] and len(rank0["val_loss"]) == 1
    assert rank0["first_batch"] != rank1["first_batch"]
    assert rank0["dropout_mask"] != rank1["dropout_mask"]  # each rank its own seed + rank
    assert {r["run_dir"] for r in (rank0, rank1)} == {str(run_dir)}
    # Both nodes log to train.log; .hydra/ and everything else come from rank 0 alone.
    assert_written_by_rank_zero_only(run_dir, "train.log")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "node0.log", "node1.log", "reports", "run"]


def test_only_the_first_process_writes_the_hydra_config(monkeypatch):
    cfg = compose_train(hydra_config=True)
    assert cfg.hydra.output_subdir == ".hydra"
    # The rank torchrun or SLURM put in the environment, as Lightning read it at import.
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert cfg.hydra.output_subdir is None


# --- SLURM through hydra-submitit-launcher, and FSDP: configs that compose ------------------------


def compose_train(*overrides: str, hydra_config: bool = False):
    """conf/train.yaml composed in this process, with what `import micropgpt` registers."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def test_slurm_launcher_asks_for_the_trainers_nodes_and_devices():
    require_extra("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_train(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        hydra_config=True,
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    shape = ("partition", "nodes", "gpus_per_node", "tasks_per_node")
    resolved = {key: cfg.hydra.launcher[key] for key in shape}
    assert resolved == {"partition": "gpu", "nodes": 2, "gpus_per_node": 4, "tasks_per_node": 4}
    assert cfg.hydra.launcher.timeout_min > 0 and cfg.hydra.launcher.mem_gb > 0


def test_a_missing_slurm_extra_names_the_extra_to_install():
    result = run_train_without("hydra_plugins.hydra_submitit_launcher", "-m", "hydra/launcher=slurm")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: the SLURM and submitit launchers need hydra-submitit-launcher, an optional extra: "
        "pip install -e '.[slurm]'"
    )


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path, corpus):
    require_extra("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_dir, corpus, "hydra/launcher=submitit_local", "model.n_embd=8,16", "model.n_layer=1")
    rows = read_summary(sweep_dir)
    assert sorted(row["job"] for row in rows) == ["0", "1"]
    assert all(row["status"] == "ok" and float(row["best_val_loss"]) < 4.5 for row in rows)
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "best.ckpt").is_file()


def test_fsdp_config_builds_a_strategy_wrapping_each_block():
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_train("trainer=fsdp")
    assert cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    # Lightning runs FSDP on CUDA devices only, so no CPU test trains with it.


# --- Precision, accumulation and clipping; a directory corpus in several scripts -----------------

DOCUMENTS = {
    "ru.txt": "Привет, мир! Съешь же ещё этих мягких французских булок, да выпей чаю.\n",
    "el.txt": "Γειά σου, κόσμε! Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.\n",
    "zh.txt": "你好，世界！天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。\n",
    "emoji.txt": "🙂 🚀 🌍 🎉 ❤️ 👩‍💻 🐍\n",
}
PROMPT = "Привет, κόσμε 你好 🙂"


@pytest.fixture(scope="module")
def multilingual_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """bf16-mixed, gradient accumulation and clipping, on a directory of non-ASCII documents."""
    root = tmp_path_factory.mktemp("multilingual")
    corpus = root / "corpus"
    corpus.mkdir()
    for name, line in DOCUMENTS.items():
        (corpus / name).write_text(line * 60, encoding="utf-8")
    run_dir = root / "run"
    with reporting_to(root / "reports"):
        run_train(
            run_dir,
            *QUICK,
            f"data.path={corpus}",
            "trainer.max_steps=6",
            "trainer.val_check_interval=12",  # counts batches: 2 per optimizer step here
            "trainer.precision=bf16-mixed",
            "trainer.accumulate_grad_batches=2",
            "trainer.gradient_clip_val=0.5",
            RANK_REPORT,
        )
    return run_dir, read_reports(root / "reports")


def test_bf16_mixed_accumulation_and_clipping_reach_the_trainer(multilingual_run):
    run_dir, (report,) = multilingual_run
    assert report["precision"] == "bf16-mixed"
    assert report["logits_dtype"] == "torch.bfloat16"
    assert (report["gradient_clip_val"], report["accumulate_grad_batches"]) == (0.5, 2)
    assert (report["global_step"], report["batches"]) == (6, 12)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {t.dtype for t in checkpoint["state_dict"].values() if t.is_floating_point()} == {torch.float32}
    assert len(report["val_loss"]) == 1 and np.isfinite(report["val_loss"][0])


def test_precision_accumulation_and_clipping_are_tensorboard_hparams(multilingual_run):
    run_dir, _ = multilingual_run
    hparams = tensorboard_hparams(run_dir)
    assert hparams["precision"] == "bf16-mixed"
    assert (hparams["gradient_clip_val"], hparams["accumulate_grad_batches"]) == (0.5, 2)


def test_non_ascii_directory_corpus_trains_and_samples_from_a_non_ascii_prompt(multilingual_run):
    run_dir, _ = multilingual_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    vocab = checkpoint["hyper_parameters"]["vocab"]
    assert set(vocab) == set("".join(DOCUMENTS.values())) | {DOCUMENT_SEPARATOR}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate.py"),
            f"ckpt={run_dir}",
            f"prompt={PROMPT}",
            "max_new_tokens=40",
            "device=cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT) and result.stdout.endswith(SAMPLE_SEPARATOR)
    new_text = result.stdout[len(PROMPT) : -len(SAMPLE_SEPARATOR)]
    assert len(new_text) == 40 and set(new_text) <= set(vocab)


# --- A corpus directory, and a corpus larger than the memory the run may use ----------------------


def ids_text(corpus: Path, cache_dir: Path) -> str:
    ids_path, tokenizer = encode_corpus(corpus, cache_dir)
    return tokenizer.decode(np.fromfile(ids_path, dtype=np.uint16).tolist())


def test_a_directory_corpus_joins_its_txt_files_in_sorted_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("bravo", encoding="utf-8")
    (corpus / "a.txt").write_text("alpha", encoding="utf-8")
    (corpus / "sub" / "c.txt").write_text("charlie", encoding="utf-8")
    (corpus / "notes.md").write_text("not a document", encoding="utf-8")
    sep = DOCUMENT_SEPARATOR
    assert ids_text(corpus, tmp_path / "cache") == f"alpha{sep}bravo{sep}charlie"


def test_a_directory_corpus_without_text_or_with_bad_utf8_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with pytest.raises(UserError, match=r"has no \.txt files"):
        encode_corpus(corpus, tmp_path / "cache")
    (corpus / "readme.md").write_text("markdown only", encoding="utf-8")
    with pytest.raises(UserError, match=r"has no \.txt files"):
        encode_corpus(corpus, tmp_path / "cache")
    (corpus / "a.txt").write_text("fine", encoding="utf-8")
    (corpus / "b.txt").write_bytes(b"caf\xc3\xa9 and a bad byte \xff here")
    message = f"{corpus / 'b.txt'} is not UTF-8 text: invalid byte 0xff at byte offset 21"
    with pytest.raises(UserError, match=message):
        encode_corpus(corpus, tmp_path / "cache")


def test_a_200_mb_corpus_trains_in_under_1_5_gb(tmp_path):
    corpus = tmp_path / "big.txt"
    rng = random.Random(0)
    block = "".join(rng.choices(string.ascii_letters + string.digits + " .,;:!?'\n", k=1 << 20))
    with corpus.open("w", encoding="ascii") as f:
        for _ in range(200):
            f.write(block)
    log = tmp_path / "train.log"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.data_dir={tmp_path / 'data'}",
        f"data.path={corpus}",
        *QUICK,
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
    ]
    try:
        with log.open("w") as out:
            process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        # wait4 gives this child's own peak RSS (in KiB on Linux), not the largest of all children.
        _, status, usage = os.wait4(process.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
        (meta_path,) = (tmp_path / "data" / "cache").glob("*.json")
        meta = json.loads(meta_path.read_text())
        assert (meta["num_tokens"], meta["dtype"]) == (200 << 20, "uint16")
        peak_gb = usage.ru_maxrss / (1 << 20)
        assert peak_gb < 1.5, f"peak RSS {peak_gb:.2f} GB"
    finally:
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
        corpus.unlink()
