"""What Lightning's ThroughputMonitor (conf/callbacks/default.yaml) needs to know about this project:
how many windows and characters a batch holds, and how many FLOPs the GPT spends on it.

ThroughputMonitor times the training batches (validation excluded) and logs, per device,
train/device/samples_per_sec (windows), train/device/items_per_sec (characters: tokens/s),
train/device/flops_per_sec and, where Lightning knows the device's peak (GPUs), train/device/mfu.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from micropgpt.model import GPT, GPTConfig


def windows_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return batch[0].size(0)


def tokens_in_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return batch[0].numel()


def matrix_weights(model: GPT) -> int:
    """The weights of the GPT's matrix products (counted before any sharding)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def forward_flops(matrix_weights: int, config: GPTConfig, inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass over `inputs` (B, T), as nanoGPT and PaLM count them: 2 per matrix
    weight and token, plus 2 x 2 x T x n_embd per token and layer for the attention scores and
    their weighted sum. Embedding lookups, norms and activations are left out; a training step
    (forward and backward) is 3 times this.
    """
    per_token = 2 * matrix_weights + 4 * config.n_layer * config.n_embd * inputs.size(1)
    return per_token * inputs.numel()


class TrainingThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor, logging the training rates only.

    It also logs validate/device/* after every validation batch, stepped by the validation batch
    index: a series on another axis than every other scalar, that grew a tiny run's event file
    threefold. The validation batches are still timed, so that training rates exclude them.
    """

    @rank_zero_only  # as ThroughputMonitor's own hooks: it times on the first process only
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)
