"""Learning-rate schedules as LambdaLR multipliers that live in checkpoints as plain numbers."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from micropgpt.errors import UserError

DECAY_BY = ("steps", "time")


class WarmupCosine:
    """Linear warmup from 0 to 1, cosine decay to `min_lr_ratio` at `decay_steps`, flat after.

    `decay_by="time"`: the decay also follows the share of the training time budget spent so
    far (`spend_time`, which GPTModule calls with Lightning's Timer before each step), whichever
    is further along. A run bounded by `trainer.max_time` then ends its decay when its time ends,
    however many steps the machine fits in it.

    A callable object (not a closure) so that LambdaLR's state_dict stores its plain attributes.
    """

    def __init__(self, warmup_steps: int, decay_steps: int, min_lr_ratio: float, decay_by: str = "steps"):
        if decay_by not in DECAY_BY:
            raise UserError(f"scheduler.decay_by={decay_by} is not one of: {', '.join(DECAY_BY)}")
        self.warmup_steps = warmup_steps
        self.decay_steps = max(decay_steps, warmup_steps + 1)
        self.min_lr_ratio = min_lr_ratio
        self.decay_by = decay_by
        self._time_spent = 0.0  # a position, like the step: not a setting

    def spend_time(self, share: float) -> None:
        """Set the share (0 to 1) of the time budget spent so far."""
        self._time_spent = share

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps))
        if self.decay_by == "time":
            progress = max(progress, self._time_spent)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_cosine(
    optimizer: Optimizer,
    warmup_steps: int,
    decay_steps: int,
    min_lr_ratio: float = 0.1,
    decay_by: str = "steps",
) -> LambdaLR:
    if decay_steps < 1:
        # conf/scheduler/cosine.yaml's decay_steps is trainer.max_steps, -1 in a run by epochs.
        raise UserError(
            f"scheduler=cosine needs the number of steps to decay over, and scheduler.decay_steps is "
            f"{decay_steps} (trainer.max_steps=-1 runs by epochs); set trainer.max_steps=N or "
            "scheduler.decay_steps=N"
        )
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, decay_steps, min_lr_ratio, decay_by))
