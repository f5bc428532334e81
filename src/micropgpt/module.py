"""The LightningModule around the GPT: loss, metrics, optimizer and schedule wiring, logging."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric, MinMetric

from micropgpt.errors import UserError
from micropgpt.lr_schedule import WarmupCosine
from micropgpt.model import GPT, GPTConfig
from micropgpt.optim import MUON_GROUP
from micropgpt.resume import follow_config, optimizer_settings
from micropgpt.throughput import forward_flops, matrix_weights

OptimizerFactory = Callable[[Iterable[dict]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler]


def parameter_groups(model: GPT) -> list[dict]:
    """Three named groups: the blocks' weight matrices, every embedding table and the output head (both
    with weight decay), and biases and LayerNorm gains (without).

    Chosen by the module and name of each parameter, not by its shape: under FSDP every parameter
    is a flattened 1-D shard. AdamW treats the first two alike; `optimizer=muon` gives the matrices
    to Muon (micropgpt.optim). The names show up in TensorBoard as lr-AdamW/matrices,
    lr-AdamW/embeddings, lr-AdamW/no_decay.
    """
    tables = {model.lm_head} | {module for module in model.modules() if isinstance(module, nn.Embedding)}
    groups: dict[str, list[nn.Parameter]] = {MUON_GROUP: [], "embeddings": [], "no_decay": []}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if name != "weight" or isinstance(module, nn.LayerNorm):
                groups["no_decay"].append(param)
            elif module in tables:
                groups["embeddings"].append(param)
            elif isinstance(module, nn.Linear):
                groups[MUON_GROUP].append(param)
            else:
                raise ValueError(f"parameter_groups has no group for {type(module).__name__}.{name}")
    return [
        {"name": MUON_GROUP, "params": groups[MUON_GROUP]},
        {"name": "embeddings", "params": groups["embeddings"]},
        {"name": "no_decay", "params": groups["no_decay"], "weight_decay": 0.0},
    ]


class GPTModule(L.LightningModule):
    """Trains `GPT(GPTConfig(vocab_size=len(vocab), **model))` with cross entropy.

    `optimizer` and `scheduler` are factories (Hydra partials): the optimizer gets the groups of
    `parameter_groups`. Only `vocab` and `model` are saved as hyperparameters, as plain Python
    values, so a checkpoint is enough to rebuild the GPT and loads with
    `torch.load(..., weights_only=True)`.

    `model["compile"]` (optional, default false) runs the training forward pass through
    `torch.compile`. It is how the GPT is run, not what it is, so it is left out of the saved
    hyperparameters, and the compiled function is not a submodule: the state dict keeps the plain
    `model.*` names. Validation (a ragged last batch, no backward) and generation (one position at
    a time, KV cache) stay eager, where a compile would cost more than it saves.
    """

    def __init__(
        self,
        vocab: list[str],
        model: dict,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
    ):
        super().__init__()
        architecture = {key: value for key, value in model.items() if key != "compile"}
        self.save_hyperparameters({"vocab": vocab, "model": architecture}, logger=False)
        self.model = GPT(GPTConfig(vocab_size=len(vocab), **architecture))
        self._compiled_forward = torch.compile(self.model.forward) if model.get("compile") else None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_loss = MeanMetric()
        # Persistent, so that the best value so far survives a resume.
        self.val_loss_best = MinMetric()
        self.val_loss_best.persistent(True)
        # flops_per_batch is read by Lightning's ThroughputMonitor after each batch, for FLOP/s and MFU.
        self.flops_per_batch = 0
        self._matrix_weights = matrix_weights(self.model)
        self._configured_optimizer: list[dict] = []  # optimizer_settings at step 0, for a resume
        self._saved_schedules: list[dict] | None = None  # a resumed checkpoint's, until on_train_start

    def setup(self, stage: str) -> None:
        # Sums in float64: in float32 a sum of many batches keeps about 7 digits, and where it
        # rounds depends on how the batches are split between processes. MPS has no float64.
        if self.trainer.strategy.root_device.type != "mps":
            self.val_loss.set_dtype(torch.float64)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        _, loss = (self._compiled_forward or self.model)(inputs, targets)
        self.log("train/loss", loss, prog_bar=True)
        self.flops_per_batch = 3 * forward_flops(
            self._matrix_weights, self.model.config, inputs
        )  # the backward costs 2 forwards
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        trainer = self.trainer
        last_epoch = trainer.current_epoch + 1 >= (trainer.max_epochs or -1) > 0
        if trainer.global_step >= trainer.max_steps > 0 or (
            last_epoch and batch_idx + 1 >= trainer.num_training_batches
        ):
            # Lightning validates when told to stop, not at a max_steps (or end of the last epoch)
            # between two val_check_intervals: so the final weights are validated and checkpointed.
            trainer.should_stop = True

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        _, loss = self.model(inputs, targets)
        self.val_loss.update(loss, weight=targets.numel())
        self.flops_per_batch = forward_flops(self._matrix_weights, self.model.config, inputs)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synchronised over all processes: the same on every rank
        self.val_loss.reset()
        if self.trainer.sanity_checking:
            return
        self.val_loss_best.update(loss)
        best = self.val_loss_best.compute()
        self.log_dict(
            {
                "val/loss": loss,
                "val/bpc": loss / math.log(2),
                "val/loss_best": best,
                "val/bpc_best": best / math.log(2),
            },
            prog_bar=False,
            # compute() synchronised them, so every rank holds the same values; sync_dist averages
            # them once more (the same values again, up to rounding) and keeps Lightning from
            # warning that epoch-level values logged without it are not accumulated across ranks.
            sync_dist=True,
        )
        self.log("val_loss", loss, prog_bar=True, logger=False, sync_dist=True)

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning's FSDP precision plugin refuses norm clipping; FSDP's own method computes
            # the norm over all shards, so trainer.gradient_clip_val means the same as elsewhere.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def lr_scheduler_step(self, scheduler: LRScheduler, metric) -> None:
        self._follow_time_budget(scheduler)
        super().lr_scheduler_step(scheduler, metric)

    def _follow_time_budget(self, scheduler: LRScheduler | None) -> None:
        """Tell the schedule's decay_by=time multipliers the share of max_time spent so far."""
        multipliers = _time_budget_multipliers(scheduler)
        if multipliers:
            timer = self._time_budget()
            elapsed = timer.time_elapsed("train")
            budget = elapsed + timer.time_remaining("train")  # trainer.max_time, in seconds
            share = min(1.0, elapsed / budget) if budget > 0 else 1.0
            # Each process has its own clock; one lr for all keeps the replicas equal.
            share = self.trainer.strategy.broadcast(share)
            for multiplier in multipliers:
                multiplier.spend_time(share)

    def _time_budget(self) -> Timer | None:
        """Lightning's Timer for trainer.max_time, when it is set."""
        timers = [c for c in self.trainer.callbacks if isinstance(c, Timer)]
        return next((timer for timer in timers if timer.time_remaining() is not None), None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resume follows this command's schedule (resume.follow_config, at on_train_start, once
        # Lightning restored the optimizer): Lightning would load the checkpoint's, old settings and all.
        self._saved_schedules, checkpoint["lr_schedulers"] = checkpoint.get("lr_schedulers", []), []

    def on_train_start(self) -> None:
        if _time_budget_multipliers(self.lr_schedulers()) and self._time_budget() is None:
            raise UserError(
                "scheduler.decay_by=time decays over the training time budget, and trainer.max_time "
                "is not set: add +trainer.max_time=DD:HH:MM:SS, or set scheduler.decay_by=steps"
            )
        # A resumed run's Timer starts from the checkpoint's elapsed time: the replayed schedule
        # then ends at this run's share of the budget, not at step-only progress.
        self._follow_time_budget(self.lr_schedulers())
        if self._saved_schedules is not None:
            follow_config(self.trainer, self._configured_optimizer, self._saved_schedules)
            self._saved_schedules = None

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(parameter_groups(self.model))
        scheduler = None if self.scheduler_factory is None else self.scheduler_factory(optimizer)
        self._configured_optimizer = optimizer_settings(optimizer)  # with the schedule's step-0 lr
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _time_budget_multipliers(scheduler: LRScheduler | None) -> list[WarmupCosine]:
    """The schedule's multipliers that follow trainer.max_time (scheduler.decay_by=time)."""
    multipliers = getattr(scheduler, "lr_lambdas", [])
    return [m for m in multipliers if isinstance(m, WarmupCosine) and m.decay_by == "time"]
