"""SLURM for real: slurm/train.sbatch and hydra/launcher=slurm on a one-node cluster on localhost.

The session's cluster (tests/slurm_cluster.py) runs munged, slurmctld and slurmd from this
machine's SLURM (Debian's slurm-wlm 22.05; CI installs it). Jobs run the repository's files from
a directory of links to them, so their outputs/ lands in a temporary directory; they use this
venv's python (on PATH, as after `source .venv/bin/activate`), one thread per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, require_extra
from slurm_cluster import SlurmCluster, missing_programs
from test_reliability import assert_same_weights
from test_scale import compose_train
from test_sweep import read_summary

from micropgpt.checkpoint import read_checkpoint
from micropgpt.errors import UserError
from micropgpt.slurm_launch import check_submission

# A tiny 2-task DDP run whose last.ckpt is written every 10 steps, so a requeue lands mid-run.
STEPS = 100
TRAIN = [
    *TINY,
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.val_check_interval=50",
    "+trainer.limit_val_batches=4",
    "+trainer.num_sanity_val_steps=0",
    "callbacks.last_checkpoint.every_n_train_steps=10",
]
ON_TWO_CPU_TASKS = ["--gpus-per-node=0", "--ntasks-per-node=2"]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    missing = missing_programs()
    if missing:
        reason = f"SLURM is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the SLURM tests, but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpus) -> Path:
    """A directory that looks like the repository to a job (links to train.py, conf/, slurm/)."""
    root = tmp_path_factory.mktemp("project")
    for name in ("train.py", "conf", "slurm"):
        (root / name).symlink_to(ROOT / name)
    return root


def job_env(**extra: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {"PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1", **extra}


def data_overrides(project: Path, corpus: Path) -> list[str]:
    return [f"data.path={corpus}", f"data.data_dir={project / 'data'}"]


def submit_script(slurm: SlurmCluster, project: Path, *sbatch_options: str, overrides: list[str]) -> str:
    """`sbatch [options] slurm/train.sbatch [overrides]` from the project dir; returns the job id."""
    log = project / "logs" / "%j.out"
    log.parent.mkdir(exist_ok=True)
    command = ["sbatch", "--parsable", f"--output={log}", *sbatch_options, "slurm/train.sbatch", *overrides]
    result = slurm.run(*command, cwd=project, env=job_env())
    return result.stdout.strip()


def job_log(project: Path, job_id: str) -> str:
    return (project / "logs" / f"{job_id}.out").read_text()


def run_dir(project: Path, job_id: str) -> Path:
    return project / "outputs" / "slurm" / job_id


def wait_for_step(slurm: SlurmCluster, job_id: str, last: Path, step: int, timeout_s: float = 180) -> None:
    """Until `last` holds `step` or a later one, while the job runs."""

    def reached() -> bool:
        try:
            return read_checkpoint(last)["global_step"] >= step
        except (OSError, UserError):  # not written yet, or being replaced
            return False

    slurm.wait_for_job(job_id, reached, f"its last.ckpt of step {step}", timeout_s)


def requeued_and_held(slurm: SlurmCluster, job_id: str, restarts: int) -> bool:
    """The job came back to the queue after its `restarts`-th requeue, held until its BeginTime."""
    job = slurm.job(job_id)
    return job["JobState"] == "PENDING" and job["Restarts"] == str(restarts)


# --- the batch script -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_job(slurm, project, corpus) -> tuple[str, Path]:
    """The batch script on 2 CPU tasks, uninterrupted: its job id and run dir."""
    job_id = submit_script(
        slurm,
        project,
        *ON_TWO_CPU_TASKS,
        overrides=[*TRAIN, f"trainer.max_steps={STEPS}", *data_overrides(project, corpus)],
    )
    slurm.wait_for_end(job_id, timeout_s=240)
    return job_id, run_dir(project, job_id)


def test_batch_script_trains_on_two_tasks_to_the_last_step(slurm, project, reference_job):
    job_id, run = reference_job
    job = slurm.job(job_id)
    assert (job["JobState"], job["ExitCode"], job["NumTasks"]) == ("COMPLETED", "0:0", "2"), job_log(
        project, job_id
    )
    log = job_log(project, job_id)
    assert "distributed_backend=gloo" in log and "Starting with 2 processes" in log
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == STEPS
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "result.json").is_file()


def test_requeue_mid_training_resumes_and_ends_with_the_uninterrupted_weights(
    slurm, project, corpus, reference_job
):
    """`scontrol requeue` (what preemption does): SIGTERM, last.ckpt at the step it was on, the
    job back in the queue with the same id, so the same run dir; it resumes with ckpt_path=auto."""
    job_id = submit_script(
        slurm,
        project,
        *ON_TWO_CPU_TASKS,
        overrides=[*TRAIN, f"trainer.max_steps={STEPS}", *data_overrides(project, corpus)],
    )
    run = run_dir(project, job_id)
    last = run / "checkpoints" / "last.ckpt"
    wait_for_step(slurm, job_id, last, 10)
    slurm.run("scontrol", "requeue", job_id)
    slurm.wait_for(lambda: requeued_and_held(slurm, job_id, 1), 90, f"job {job_id} to be requeued")
    stopped_at = read_checkpoint(last)["global_step"]
    assert 10 <= stopped_at < STEPS
    assert f"SIGTERM: stopped at step {stopped_at}, checkpoint saved to {last}" in job_log(project, job_id)

    # A requeued job waits about two minutes (its BeginTime) before it may start again.
    slurm.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
    slurm.wait_for_end(job_id, timeout_s=240)
    job, log = slurm.job(job_id), job_log(project, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert f"Restored all states from the checkpoint at {last}" in log
    assert read_checkpoint(last)["global_step"] == STEPS
    assert_same_weights(run, reference_job[1])


def test_time_limit_signal_checkpoints_requeues_and_the_job_finishes(slurm, project, corpus):
    """--time=2 with --signal=SIGUSR1@60: SLURM signals 30 to 60 s after the start (it checks
    time limits every 30 s). Training is bounded by time (max_time, kept across the requeue), so
    the signal always lands mid-training, however busy the machine."""
    overrides = [
        *TRAIN,
        "trainer.max_steps=-1",
        "+trainer.max_time=00:00:01:00",
        "trainer.val_check_interval=100000",
        *data_overrides(project, corpus),
    ]
    job_id = submit_script(
        slurm, project, "--time=2", "--signal=SIGUSR1@60", *ON_TWO_CPU_TASKS, overrides=overrides
    )
    run = run_dir(project, job_id)
    last = run / "checkpoints" / "last.ckpt"
    slurm.wait_for(lambda: requeued_and_held(slurm, job_id, 1), 150, f"job {job_id} to requeue itself")
    log = job_log(project, job_id)
    assert "SIGUSR1: the job's time limit is near" in log and f"Requeued SLURM job: {job_id}" in log, log
    hpc_step = read_checkpoint(run / "hpc_ckpt_1.ckpt")["global_step"]
    stopped_at = read_checkpoint(last)["global_step"]
    assert 0 < hpc_step <= stopped_at
    assert f"SIGTERM: stopped at step {stopped_at}" in log

    # Let it start now, with time to finish (else it would be signalled and requeued once more).
    slurm.run("scontrol", "update", f"jobid={job_id}", "StartTime=now", "TimeLimit=10")
    slurm.wait_for_end(job_id, timeout_s=180)
    job, log = slurm.job(job_id), job_log(project, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert f"Restored all states from the checkpoint at {last}" in log
    assert "Time limit reached" in log
    assert read_checkpoint(last)["global_step"] > stopped_at


# --- hydra/launcher=slurm ---------------------------------------------------------------------

SWEEP = [
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={SlurmCluster.PARTITION}",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "trainer.devices=1",
    "ckpt_path=auto",
]


def sweep_command(sweep_dir: Path, corpus: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.job.config.override_dirname.exclude_keys=[data.path,data.data_dir,ckpt_path]",
        *SWEEP,
        *TRAIN,
        f"data.path={corpus}",
        f"data.data_dir={sweep_dir.parent / 'data'}",
        *overrides,
    ]


def test_slurm_launcher_asks_for_no_gpus_for_a_trainer_on_cpus():
    require_extra("hydra_plugins.hydra_submitit_launcher")
    for accelerator, gpus in (("cpu", None), ("gpu", 4), ("auto", 4)):
        cfg = compose_train(
            "hydra/launcher=slurm",
            "trainer.devices=4",
            f"trainer.accelerator={accelerator}",
            hydra_config=True,
        )
        assert cfg.hydra.launcher.gpus_per_node == gpus
        assert cfg.hydra.launcher.tasks_per_node == 4
        # One requeue mechanism: SLURM warns with Lightning's SIGUSR1, never with submitit's USR2.
        assert cfg.hydra.launcher.additional_parameters.signal == "USR1@120"


def test_a_sweep_runs_as_slurm_jobs_survives_a_time_limit_warning_and_records_a_failed_job(
    slurm, tmp_path, corpus
):
    """Job 0 trains, gets SLURM's time-limit warning (SIGUSR1) mid-run, is requeued once and
    resumes; job 1 (n_head=3 does not divide n_embd=32) fails and is recorded as failed."""
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(sweep_dir, corpus, "model.n_head=2,3", f"trainer.max_steps={STEPS}")
    sweep = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**slurm.env, **job_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        last = sweep_dir / "0" / "checkpoints" / "last.ckpt"
        slurm.wait_for(lambda: last.exists() or sweep.poll() is not None, 180, "job 0's first last.ckpt")
        # Submitit submits the sweep as one job array: job 0 is ARRAY_0.
        [job_dir] = (sweep_dir / ".submitit").glob("*_0")
        job_id, array_id = job_dir.name, job_dir.name.removesuffix("_0")
        # What SLURM sends 120 s before the time limit (slurm.yaml's --signal=USR1@120).
        slurm.run("scancel", "--signal=USR1", job_id)
        slurm.wait_for(lambda: requeued_and_held(slurm, job_id, 1), 90, f"job {job_id} to requeue itself")
        slurm.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")
        output, _ = sweep.communicate(timeout=240)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output
    assert "Traceback" not in output and "sacct" not in output, output
    rows = {row["job"]: row for row in read_summary(sweep_dir)}
    assert rows["0"]["status"] == "ok" and float(rows["0"]["best_val_loss"]) < 4.5
    assert rows["1"]["status"] == "failed"
    assert rows["1"]["error"].startswith("model.n_embd=32 is not divisible by model.n_head=3")
    assert read_checkpoint(last)["global_step"] == STEPS

    slurm.wait_for_end(job_id, timeout_s=60)  # its result is written before its python exits
    job = slurm.job(job_id)
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1")
    log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
    assert f"Requeued SLURM job: {job_id}" in log, log
    assert f"Restored all states from the checkpoint at {last}" in log
    # Submitit's own checkpoint-and-requeue never ran, and no GPU was asked for.
    assert "Calling checkpoint method" not in log
    script = (sweep_dir / ".submitit" / array_id / f"{array_id}_submission.sh").read_text()
    assert "--gpus-per-node" not in script and "#SBATCH --signal=USR1@120" in script


def launcher_settings(*overrides: str) -> dict:
    """hydra.launcher as a sweep of SWEEP's settings (and `overrides`) resolves it."""
    from omegaconf import OmegaConf

    cfg = compose_train(*SWEEP, "trainer.accelerator=cpu", *overrides, hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_a_sweep_on_a_partition_slurm_lacks_ends_in_one_line_and_submits_nothing(slurm, tmp_path, corpus):
    command = sweep_command(
        tmp_path / "sweep", corpus, "model.n_head=2,4", "hydra.launcher.partition=nowhere"
    )
    env = {**slurm.env, **job_env()}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line == (
        "error: the SLURM cluster has no partition 'nowhere' (Invalid partition name specified); "
        f"pass hydra.launcher.partition= one of its partitions: {SlurmCluster.PARTITION}"
    )
    assert not slurm.squeue()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["trainer.accelerator=gpu"],
            "the SLURM cluster cannot give 1 GPU(s) per node (Invalid generic resource (gres) "
            "specification); on nodes without GPUs pass trainer.accelerator=cpu, which asks for none",
        ),
        (
            ["hydra.launcher.cpus_per_task=64"],
            f"no node of partition {SlurmCluster.PARTITION} can run the sweep's jobs (Requested node "
            "configuration is not available): they ask for 1 node(s) x 1 task(s) x 64 CPU(s), 1 GB, "
            "no GPU(s) per node, its nodes have ",
        ),
        (
            ["hydra.launcher.mem_gb=100000"],
            f"no node of partition {SlurmCluster.PARTITION} can run the sweep's jobs (Requested node "
            "configuration is not available): they ask for 1 node(s) x 1 task(s) x 1 CPU(s), 100000 GB, ",
        ),
    ],
    ids=["gpus-on-a-cpu-cluster", "more-cpus-than-a-node-has", "more-memory-than-a-node-has"],
)
def test_a_request_slurm_cannot_meet_is_refused_naming_the_fix(slurm, monkeypatch, overrides, expected):
    require_extra("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    with pytest.raises(UserError) as refused:
        check_submission(launcher_settings(*overrides))
    assert str(refused.value).startswith(expected), refused.value
    assert not slurm.squeue()


def test_without_sbatch_on_path_a_slurm_sweep_is_refused_naming_the_fix(monkeypatch, tmp_path):
    require_extra("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError) as refused:
        check_submission(launcher_settings())
    assert str(refused.value) == (
        "hydra/launcher=slurm submits jobs with sbatch, which is not on PATH here: run the sweep on "
        "a machine of the SLURM cluster (a login node), or use hydra/launcher=submitit_local"
    )
