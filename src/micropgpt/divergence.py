"""Stop a diverged run before its NaN or infinite weights overwrite a good checkpoint."""

from __future__ import annotations

import lightning as L
import torch

from micropgpt.errors import UserError
from micropgpt.resume import last_checkpoint


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(L.Callback):
    """Raises TrainingDiverged, naming the step, the last finite loss and the checkpoint to go back to.

    Every step's loss is folded into two device tensors without waiting for the device; the
    check that waits for it runs only before a validation, before any checkpoint is written and
    at the end of training, so no NaN weights are validated, saved, or reported as a result.
    """

    def __init__(self):
        self._first_bad_step: torch.Tensor | None = None  # -1 while every loss was finite
        self._last_finite: torch.Tensor | None = None  # (step, loss) of the last finite loss

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        loss = outputs["loss"].detach().float()
        if self._first_bad_step is None:
            self._first_bad_step = torch.tensor(-1, device=loss.device)
            self._last_finite = torch.tensor([-1.0, float("nan")], device=loss.device)
        step = trainer.global_step
        ok = torch.isfinite(loss) & (self._first_bad_step < 0)
        latest = torch.stack([loss.new_tensor(float(step)), loss])
        self._last_finite = torch.where(ok, latest, self._last_finite)
        self._first_bad_step = torch.where(ok | (self._first_bad_step >= 0), self._first_bad_step, step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._check(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        if self._first_bad_step is None:
            return
        # Losses differ between DDP ranks: stop on all of them when any diverged.
        if not trainer.strategy.reduce_boolean_decision(bool(self._first_bad_step >= 0), all=False):
            return
        step, loss = self._last_finite.tolist()
        last = "no finite loss before it" if step < 0 else f"last finite loss {loss:.4g} at step {int(step)}"
        checkpoint = last_checkpoint(trainer)
        saved = checkpoint.is_file()
        back = f"go back to {checkpoint} (ckpt_path=last)" if saved else "no checkpoint was saved"
        raise TrainingDiverged(
            f"training diverged: the loss is not finite from step {int(self._first_bad_step)} on ({last}); "
            f"nothing was saved after it, {back}; retry with a lower optimizer.lr or gradient_clip_val"
        )
