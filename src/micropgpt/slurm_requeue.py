"""SLURM's warning before a job's time limit (SIGUSR1): Lightning's checkpoint-and-requeue, made safe.

Lightning's SLURM environment saves hpc_ckpt_N.ckpt and runs `scontrol requeue` inside the signal
handler, at whatever point of the training step the signal lands. With several processes the
save's barrier can then meet another rank's gradient all-reduce, and the job hangs until SLURM
kills it (seen here with 2 CPU tasks under DDP; Lightning #21406). RequeueAtStepEnd only notes the
signal and lets Lightning's handler run at the end of the step, when every rank is at the same
place. The requeue's SIGTERM then makes StopOnSignal save last.ckpt and stop, and the job that
comes back resumes from it (ckpt_path=auto).
"""

from __future__ import annotations

import signal
import sys

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment


class RequeueAtStepEnd(L.Callback):
    """In a SLURM job with Lightning's auto-requeue, runs Lightning's SIGUSR1 handling at a step's end."""

    def __init__(self):
        self._requested = False
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        # After Lightning installed its handler, which this replaces until teardown.
        self._requested = False
        signum = environment.requeue_signal
        self._previous[signum] = signal.getsignal(signum)
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._requested = True
        print(
            f"\n{signal.Signals(signum).name}: the job's time limit is near: "
            "saving a checkpoint and requeueing the job after this step",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if not self._previous:
            return
        # Every rank takes part, so that all of them save at the same step.
        if trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            self._requested = False
            signum = next(iter(self._previous))
            trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
