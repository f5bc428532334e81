"""Submitting a sweep's jobs to SLURM through hydra-submitit-launcher (conf/hydra/launcher/slurm.yaml).

Before anything is submitted, `sbatch --test-only` checks the jobs' request against the cluster, so
that a missing sbatch, an unknown partition or a request no node can meet ends in one line that
names the fix, instead of a submitit traceback or a job that stays pending for ever. On a cluster
without accounting, submitit's job polling asks squeue instead of sacct, which fails there and
would print an error and a warning at every poll.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from micropgpt.errors import UserError

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"

# hydra.launcher keys that are sbatch options of the same name (underscores for dashes).
SBATCH_OPTIONS = (
    "partition", "account", "qos", "constraint", "exclude", "gres", "nodes", "cpus_per_task",
    "gpus_per_node", "gpus_per_task", "cpus_per_gpu", "mem_per_gpu", "mem_per_cpu",
)  # fmt: skip


def gpus_per_node(accelerator: str, devices: Any) -> Any:
    """The GPUs a job asks SLURM for per node: one per device, none for a trainer on CPUs."""
    return None if accelerator == "cpu" else devices


def sbatch_request(launcher: dict[str, Any]) -> list[str]:
    """The sbatch options submitit derives from the launcher's settings, for `sbatch --test-only`."""
    options = {key: launcher.get(key) for key in SBATCH_OPTIONS}
    options["ntasks_per_node"] = launcher.get("tasks_per_node")
    options["time"] = launcher.get("timeout_min")
    if launcher.get("mem_gb") is not None:
        options["mem"] = f"{launcher['mem_gb']}G"
    options.update(launcher.get("additional_parameters") or {})
    return [f"--{key.replace('_', '-')}={value}" for key, value in options.items() if value is not None]


def check_submission(launcher: dict[str, Any]) -> None:
    """Raises UserError, naming the fix, when SLURM would refuse the jobs or never start them."""
    if shutil.which("sbatch") is None:
        raise UserError(
            "hydra/launcher=slurm submits jobs with sbatch, which is not on PATH here: run the sweep "
            "on a machine of the SLURM cluster (a login node), or use hydra/launcher=submitit_local"
        )
    test = subprocess.run(
        ["sbatch", "--test-only", *sbatch_request(launcher), "--wrap=true"], capture_output=True, text=True
    )
    if test.returncode == 0:
        return
    lines = [line for line in test.stderr.splitlines() if line.strip()] or [f"exit {test.returncode}"]
    refusal = lines[-1].split("error: ")[-1].removeprefix("allocation failure: ").strip()
    partition = launcher.get("partition")
    gpus = launcher.get("gpus_per_node")
    if "partition" in refusal.lower():
        raise UserError(
            f"the SLURM cluster has no partition {partition!r} ({refusal}); pass "
            f"hydra.launcher.partition= one of its partitions: {', '.join(_sinfo('%R')) or 'none'}"
        )
    if "gres" in refusal.lower():
        raise UserError(
            f"the SLURM cluster cannot give {gpus} GPU(s) per node ({refusal}); "
            "on nodes without GPUs pass trainer.accelerator=cpu, which asks for none"
        )
    if "node configuration" in refusal or "Memory specification" in refusal:
        request = (
            f"{launcher.get('nodes')} node(s) x {launcher.get('tasks_per_node')} task(s) x "
            f"{launcher.get('cpus_per_task') or 1} CPU(s), {launcher.get('mem_gb')} GB, "
            f"{gpus or 'no'} GPU(s) per node"
        )
        nodes = "; ".join(
            f"{cpus} CPUs, {int(memory) / 1024:.1f} GB, {'no GPUs' if gres == '(null)' else gres}"
            for cpus, memory, gres in _sinfo("%c|%m|%G", partition)
        )
        where = f"partition {partition}" if partition else "the SLURM cluster"
        raise UserError(
            f"no node of {where} can run the sweep's jobs ({refusal}): they ask for {request}, its nodes "
            f"have {nodes}; lower hydra.launcher.cpus_per_task, hydra.launcher.mem_gb or trainer.devices"
        )
    raise UserError(
        f"SLURM refuses the sweep's jobs ({refusal}); change the hydra.launcher settings it names"
    )


def _sinfo(fields: str, partition: str | None = None) -> list[Any]:
    """Distinct `sinfo` rows of `fields` (a %-format, columns split at '|'), in one partition or all."""
    command = [
        "sinfo",
        "--noheader",
        f"--format={fields}",
        *([f"--partition={partition}"] if partition else []),
    ]
    rows = subprocess.run(command, capture_output=True, text=True).stdout.split()
    unique = list(dict.fromkeys(rows))
    return [tuple(row.split("|")) if "|" in fields else row for row in unique]


def has_accounting() -> bool:
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    return "accounting_storage/none" not in config


def poll_with_squeue() -> None:
    """Makes submitit follow its jobs with squeue, which needs no accounting, instead of sacct."""
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

    class SqueueWatcher(SlurmInfoWatcher):
        def _make_command(self) -> list[str] | None:
            if not self._registered - self._finished:
                return None
            return ["squeue", "--me", "--array", "--states=all", "--noheader", "--format=%i|%T|%N"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            if not isinstance(string, str):
                string = string.decode()
            info = super().read_info("JobID|State|NodeList\n" + string)
            # squeue forgets a job some minutes after it ended (MinJobAge); gone is finished.
            for job_id in self._registered - info.keys():
                info[job_id] = {"JobID": job_id, "State": "LEFT_QUEUE", "NodeList": ""}
            return info

    SlurmJob.watcher = SqueueWatcher(delay_s=60)
