"""A real one-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd.

Everything lives in one temporary directory: the MUNGE key and socket, slurm.conf, the state,
spool and log files. Clients find it through SLURM_CONF (and slurm.conf's AuthInfo the MUNGE
socket), so nothing of the machine's own SLURM or MUNGE set-up is used or changed. The daemons
run in the foreground as children of this process and are stopped by their own pids.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
# The main scheduling loop runs this often (SLURM's default: every 60 s), so that a requeued job
# released with `scontrol update StartTime=now` starts within seconds.
SCHED_INTERVAL_S = 2
# Job states after which a job does not run again by itself (a requeued job is PENDING).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def missing_programs() -> list[str]:
    """The SLURM and MUNGE programs the cluster needs that are not installed here."""
    return [name for name in PROGRAMS if _which(name) is None]


def _which(name: str) -> str | None:
    # The daemons are in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This host as slurmd sees it ("NodeName=... CPUs=... RealMemory=..."), the first line of `slurmd -C`."""
    output = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    return output.splitlines()[0]


class SlurmCluster:
    """A one-node cluster: partition `debug` holding this host, no accounting, no GPUs."""

    PARTITION = "debug"

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[tuple[str, subprocess.Popen]] = []
        node_line = _node_line()
        self.node = node_line.split()[0].removeprefix("NodeName=")
        self.cpus = int(next(f for f in node_line.split() if f.startswith("CPUs=")).removeprefix("CPUs="))
        self._node_line = node_line

    # --- start and stop ---

    def start(self, timeout_s: float = 60) -> None:
        try:
            self._start_munged()
            self._write_conf()
            for name in ("slurmctld", "slurmd"):
                log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 (kept open by the daemon)
                args = [_which(name), "-D", "-f", str(self.conf)]
                if name == "slurmd":
                    args += ["-N", self.node]
                self._spawn(name, args, log)
            self.wait_for(self._node_idle, timeout_s, "the node to become idle")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancels the jobs still there, then stops the daemons this cluster started, newest first."""
        if any(name == "slurmctld" for name, proc in self._daemons if proc.poll() is None):
            subprocess.run(
                ["scancel", "--full", "--user", str(os.getuid())], env=self.env, capture_output=True
            )
            with contextlib.suppress(TimeoutError):
                self.wait_for(lambda: not self.squeue(), 40, "the cancelled jobs to end")
        for _name, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._daemons = []

    def _spawn(self, name: str, args: list[str], log) -> None:
        proc = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self._daemons.append((name, proc))

    def _start_munged(self) -> None:
        munge = self.root / "munge"
        munge.mkdir()
        munge.chmod(0o755)  # munged requires its socket directory to be searchable by all
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = munge / "munge.socket"
        args = [
            _which("munged"),
            "--foreground",
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--log-file={munge / 'munged.log'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
        ]
        self._spawn("munged", args, open(munge / "munged.out", "w"))  # noqa: SIM115
        self.wait_for(self.munge_socket.exists, 20, "munged's socket")

    def _write_conf(self) -> None:
        for directory in ("state", "spool"):
            (self.root / directory).mkdir()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=micropgpt-test",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'slurmd.log'}",
                    # No cgroups: processes are tracked through /proc, tasks are not bound to cores.
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "MpiDefault=none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    "ReturnToService=2",
                    f"SchedulerParameters=sched_interval={SCHED_INTERVAL_S}",
                    f"{self._node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
                    f"PartitionName={self.PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    # --- jobs and queries ---

    def wait_for(self, condition, timeout_s: float, what: str) -> None:
        """Polls `condition`; fails with the daemons' logs after `timeout_s`, or when one of them died."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            for name, proc in self._daemons:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} while waiting for {what}:\n{self.logs()}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout_s:.0f} s:\n{self.logs()}")
            time.sleep(0.25)

    def wait_for_job(self, job_id: str, condition, what: str, timeout_s: float) -> None:
        """Like wait_for, but fails at once when the job ends first."""

        def holds() -> bool:
            if condition():
                return True
            state = self.job(job_id)["JobState"]
            assert state not in ENDED, f"job {job_id} ended ({state}) before {what}"
            return False

        self.wait_for(holds, timeout_s, f"{what} (job {job_id})")

    def wait_for_end(self, job_id: str, timeout_s: float) -> None:
        self.wait_for(lambda: self.job(job_id)["JobState"] in ENDED, timeout_s, f"the end of job {job_id}")

    def _node_idle(self) -> bool:
        result = subprocess.run(
            ["sinfo", "--noheader", "--format=%t", f"--nodes={self.node}"],
            env=self.env,
            capture_output=True,
            text=True,
        )
        return result.returncode == 0 and result.stdout.strip() == "idle"

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*/*.log")):
            parts.append(f"--- {path.name} (its end) ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def run(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """A SLURM command on this cluster (`env` adds to its environment); fails the test if it fails."""
        result = subprocess.run(
            list(args), cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def squeue(self) -> list[str]:
        """The ids of the jobs in the queue (pending or running)."""
        return self.run("squeue", "--noheader", "--format=%i").stdout.split()

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields: JobState, Restarts, ExitCode, NumTasks, ..."""
        output = self.run("scontrol", "--oneliner", "show", "job", job_id).stdout
        return dict(field.split("=", 1) for field in output.split() if "=" in field)
