"""Ctrl-C and SIGTERM stop training at the end of a step, with a checkpoint to resume from.

Lightning 2.6 by itself leaves no checkpoint on Ctrl-C (KeyboardInterrupt, exit 1), and on
SIGTERM raises SIGTERMException, which exits with status 0 and may fire in the middle of a
validation. StopOnSignal instead lets the current optimizer step finish, writes last.ckpt,
validates the final weights (checkpointed again, best.ckpt too) and raises TrainingInterrupted.
SIGUSR1 (SLURM's time-limit warning) is micropgpt.slurm_requeue's.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import lightning as L

from micropgpt.resume import last_checkpoint


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving `checkpoint`."""

    def __init__(self, signal_name: str, checkpoint: Path, step: int):
        super().__init__(f"{signal_name}: stopped at step {step}, checkpoint saved to {checkpoint}")
        self.signal_name, self.checkpoint, self.step = signal_name, checkpoint, step
        self.exit_code = 128 + getattr(signal, signal_name, signal.SIGTERM)


class StopOnSignal(L.Callback):
    """On SIGINT or SIGTERM, finish the training step, save last.ckpt, let Lightning validate and
    checkpoint the final weights as at the end of any run, then raise TrainingInterrupted.

    A second signal stops at once (KeyboardInterrupt), also during that validation: the
    checkpoints stay as they are, last.ckpt already of the final step. Under DDP the decision is
    shared by all ranks, so all of them save and stop at the same step.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._received: str | None = None
        self._interruption: TrainingInterrupted | None = None
        self._previous: dict[int, object] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning installed its own handlers (on SLURM: SIGUSR1 requeue), which this keeps.
        self._received, self._interruption = None, None
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self._received is not None:
            raise KeyboardInterrupt
        self._received = signal.Signals(signum).name
        print(
            f"\n{self._received}: stopping after this step, saving a checkpoint and validating it "
            "(again: stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        stop = trainer.strategy.reduce_boolean_decision(self._received is not None, all=False)
        # At the last step training ends anyway, with its final validation and checkpoints.
        if not stop or self._interruption is not None or trainer.global_step >= trainer.max_steps > 0:
            return
        checkpoint = last_checkpoint(trainer)
        trainer.save_checkpoint(checkpoint, weights_only=False)
        self._interruption = TrainingInterrupted(self._received or "SIGTERM", checkpoint, trainer.global_step)
        trainer.should_stop = True  # Lightning validates before it stops

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._interruption is not None:
            raise self._interruption

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
