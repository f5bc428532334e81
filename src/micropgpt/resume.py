"""Resuming a run: which checkpoint `ckpt_path` means, whether it fits this run, the optimizer
settings and LR schedule it continues with, and the RNG state.

A resumed run continues the interrupted one exactly (on the CPU, with the same seed): Lightning
restores the weights, optimizer state, step counters and ModelCheckpoint's best score,
CharDataModule the position in the order of training windows, and RNGState the random number
generators, so dropout draws the masks the uninterrupted run would have drawn. The optimizer's
hyperparameters and the LR schedule are this command's (follow_config), positioned at the
checkpoint's step: a run extended with a larger trainer.max_steps, or resumed with another
optimizer.lr, gets the schedule the new config describes, as nanoGPT does.
"""

from __future__ import annotations

import copy
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from micropgpt.checkpoint import read_checkpoint
from micropgpt.checkpoint_io import is_url
from micropgpt.errors import UserError

LAST = "last.ckpt"


def last_checkpoint(trainer: L.Trainer) -> Path:
    """Where this run's last.ckpt goes: beside best.ckpt, in the first ModelCheckpoint's dirpath."""
    callback = trainer.checkpoint_callback
    directory = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
    return Path(directory) / LAST


def resolve_ckpt_path(
    ckpt_path: str | None, checkpoint_dir: Path | str, hpc_dir: Path | None = None
) -> Path | None:
    """The checkpoint to resume from: `last` is the newest of `checkpoint_dir`/last.ckpt and the
    hpc_ckpt_N.ckpt files in `hpc_dir` (Lightning's, on SLURM's SIGUSR1 before a requeue), one of
    which must exist; `auto` is the same when one exists, else None (a fresh start); anything else
    is a file."""
    if ckpt_path is None:
        return None
    if is_url(ckpt_path) or (ckpt_path in ("last", "auto") and is_url(checkpoint_dir)):
        where = ckpt_path if is_url(ckpt_path) else f"{checkpoint_dir}/{LAST}"
        raise UserError(
            f"ckpt_path={ckpt_path}: resuming reads local files only, and {where} is a URL; copy the "
            "checkpoint to a local file and pass ckpt_path=<that file>"
        )
    if ckpt_path in ("last", "auto"):
        last = Path(checkpoint_dir) / LAST
        candidates = [last, *(sorted(hpc_dir.glob("hpc_ckpt_*.ckpt")) if hpc_dir is not None else [])]
        existing = [path for path in candidates if path.is_file()]
        if existing:
            return max(existing, key=lambda path: path.stat().st_mtime_ns)  # of equals, the first
        if ckpt_path == "auto":
            return None
        raise UserError(
            f"ckpt_path=last but {last} does not exist; pass hydra.run.dir= the run directory to "
            "resume (outputs/DATE/TIME), or ckpt_path= a .ckpt file"
        )
    path = Path(ckpt_path)
    if not path.is_file():
        raise UserError(f"ckpt_path={ckpt_path} is not a file; pass a .ckpt file, last or auto")
    return path


def check_resumable(file: Path, module: L.LightningModule) -> None:
    """Refuse, before Lightning loads it, a checkpoint that is unsafe, damaged or of another model.

    Read with weights_only=True like generate.py does, so a pickle that would run code never runs.
    """
    checkpoint = read_checkpoint(file)
    hparams, weights = checkpoint.get("hyper_parameters"), checkpoint.get("state_dict")
    if not (isinstance(hparams, dict) and {"vocab", "model"} <= hparams.keys() and isinstance(weights, dict)):
        raise UserError(f"{file} is not a micropgpt checkpoint; resume from a checkpoint train.py saved")
    vocab = module.hparams.vocab
    if hparams["vocab"] != vocab:
        raise UserError(
            f"{file} was trained on another corpus ({len(hparams['vocab'])} characters, this one has "
            f"{len(vocab)}); resume with the data.path it was trained on"
        )
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)} != shapes:
        ours = module.hparams.model
        differences = [f"model.{k}={ours.get(k)}" for k, v in hparams["model"].items() if ours.get(k) != v]
        saved = [f"model.{k}={v}" for k, v in hparams["model"].items() if ours.get(k) != v]
        raise UserError(
            f"{file} holds another architecture: it was trained with {', '.join(saved) or 'other code'}, "
            f"this run has {', '.join(differences) or 'a different model'}; resume with its model settings"
        )
    saved_states = checkpoint.get("optimizer_states")
    if not saved_states:
        raise UserError(
            f"{file} holds weights but no optimizer state, so training cannot continue from it; "
            "sample it with generate.py, or resume from a last.ckpt that train.py saved"
        )
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    saved, ours = _group_sizes(saved_states[0]), _group_sizes(optimizer.state_dict())
    if saved != ours:
        raise UserError(
            f"{file} holds the state of another optimizer (parameter groups {saved}, this run's: {ours}); "
            "resume with the optimizer= it was trained with"
        )


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Copies of the optimizer's parameter groups without their parameters: its hyperparameters."""
    return [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def follow_config(trainer: L.Trainer, configured: list[dict[str, Any]], saved_schedules: list[dict]) -> None:
    """Give the optimizer that Lightning restored this run's hyperparameters (`configured`: the
    optimizer_settings of the freshly configured optimizer, at step 0) and this run's LR schedule,
    positioned at the checkpoint's step; print one line naming what differs from the checkpoint.

    The schedule is replayed step by step from its start, so any scheduler lands where an
    uninterrupted run with this config would be: bit for bit the same when nothing changed.
    `saved_schedules` are the checkpoint's scheduler states, which Lightning did not load.
    """
    optimizer = trainer.optimizers[0]
    changes: dict[str, None] = {}
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        for key, old, new in _differences(_base_settings(group), _base_settings(settings)):
            changes[f"{key} {old} -> {new}"] = None
        params = group["params"]
        group.clear()
        group.update(copy.deepcopy(settings), params=params)
    for i, config in enumerate(trainer.lr_scheduler_configs):
        # A checkpoint of a run without a schedule: its steps were all at the base lr.
        saved = saved_schedules[i] if i < len(saved_schedules) else {"last_epoch": trainer.global_step}
        scheduler = config.scheduler
        configured_schedule = _schedule_settings(scheduler.state_dict())
        for key, old, new in _differences(_schedule_settings(saved), configured_schedule):
            changes[f"{key} {old} -> {new}"] = None
        with warnings.catch_warnings():
            # The replay steps the schedule without optimizer steps, which torch warns of.
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
            for _ in range(saved["last_epoch"] - scheduler.last_epoch):
                scheduler.step()
    if changes and trainer.is_global_zero:
        print(
            "note: resuming with this command's optimizer and schedule settings, which differ from the "
            f"checkpoint's: {', '.join(changes)}",
            file=sys.stderr,
        )


def _base_settings(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's hyperparameters, its lr the base one that a schedule scales."""
    settings = {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
    return {**settings, "lr": group.get("initial_lr", group["lr"])}


def _schedule_settings(state: dict[str, Any]) -> dict[str, Any]:
    """A scheduler state's settings: its public attributes and its multipliers', not its position."""
    position = {"last_epoch", "base_lrs", "verbose"}
    settings = {k: v for k, v in state.items() if not k.startswith("_") and k not in position}
    for multiplier in settings.pop("lr_lambdas", None) or []:  # LambdaLR's, e.g. WarmupCosine's
        settings.update({k: v for k, v in (multiplier or {}).items() if not k.startswith("_")})
    return settings


def _differences(old: dict[str, Any], new: dict[str, Any]):
    """(key, old, new) for the keys both have whose values differ (a list equal to a tuple does not)."""
    plain = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    for key in [k for k in new if k in old]:
        if plain(old[key]) != plain(new[key]):
            yield key, old[key], new[key]


def _group_sizes(optimizer_state: dict) -> dict | list:
    """The parameter count of each group, per inner optimizer for one that combines several."""
    if "param_groups" in optimizer_state:
        return [len(group["params"]) for group in optimizer_state["param_groups"]]
    return {name: _group_sizes(inner) for name, inner in optimizer_state.items() if isinstance(inner, dict)}


class RNGState(L.Callback):
    """Gives each process of a multi-process run its own random stream (so that each draws its own
    dropout masks, as nanoGPT's seed + rank does), saves the generators in each checkpoint and
    restores them on resume.

    They are restored just before the first training step, where the uninterrupted run's
    generators were in the same state: nothing between a checkpoint and the next step draws
    from them (the DataLoaders have their own generators, validation no dropout). Under DDP
    every rank's torch (and CUDA) generator is saved, gathered into rank 0's checkpoint, and each
    rank gets its own back when resumed on as many processes; Python's and NumPy's, which
    training does not draw from, are rank 0's for all.
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._trainer: L.Trainer | None = None
        self._restore: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if trainer.world_size > 1:
            # After the model's initialisation, which DDP replaces by rank 0's weights anyway.
            torch.manual_seed(self.seed + trainer.global_rank)

    def state_dict(self) -> dict[str, Any]:
        _, keys, pos, has_gauss, gauss = np.random.get_state()
        # Tensors and plain values only, so the checkpoint still loads with weights_only=True.
        state = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        if self._trainer is not None and self._trainer.world_size > 1:
            # Lightning builds the checkpoint on every rank, so all of them are here to gather.
            strategy = self._trainer.strategy
            for key in [k for k in ("torch", "cuda") if k in state]:
                state[f"{key}_by_rank"] = strategy.all_gather(state[key].to(strategy.root_device)).cpu()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._restore is None:
            return
        state, self._restore = self._restore, None
        torch.set_rng_state(self._own(state, "torch", trainer))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(self._own(state, "cuda", trainer))

    @staticmethod
    def _own(state: dict[str, Any], key: str, trainer: L.Trainer) -> torch.Tensor:
        """This rank's saved generator state; rank 0's when the run had another number of processes."""
        by_rank = state.get(f"{key}_by_rank")
        if by_rank is not None and len(by_rank) == trainer.world_size:
            return by_rank[trainer.global_rank].clone()
        return state[key]
