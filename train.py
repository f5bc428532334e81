"""Train a character-level GPT: `python train.py [overrides]`, `python train.py -m` for sweeps.

Composes conf/train.yaml, builds every object from its `_target_`, fits, and returns the best
validation loss (what Hydra sweepers minimise).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
import typing
from dataclasses import fields, make_dataclass
from pathlib import Path

import hydra
import lightning as L
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from micropgpt.errors import find_user_error
from micropgpt.model import GPTConfig
from micropgpt.summary import RunResult, write_result, write_summary

log = logging.getLogger(__name__)


def folder_name(text: str, max_bytes: int = 255) -> str:
    """`text` cut to the file-name limit of common file systems, ending in '...' when cut.

    Run names are the run's overrides (conf/logger), and a long command line must not stop a run.
    """
    if len(text.encode()) <= max_bytes:
        return text
    return text.encode()[: max_bytes - 3].decode(errors="ignore") + "..."


# replace=True: Hydra imports this file a second time, as module `train`, for SweepSummary.
OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)

# Typed schema for the model group, so `model.n_embd=abc` fails at composition. Derived from
# GPTConfig so the two cannot drift; vocab_size comes from the corpus, not the config. `compile`
# is how GPTModule runs the GPT, not part of it: checkpoints do not keep it.
_hints = typing.get_type_hints(GPTConfig)
ModelSchema = make_dataclass(
    "ModelSchema",
    [(f.name, _hints[f.name], f.default) for f in fields(GPTConfig) if f.name != "vocab_size"]
    + [("compile", bool, False)],
)
ConfigStore.instance().store(group="model", name="schema", node=ModelSchema)


def train(cfg: DictConfig) -> float | None:
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, vocab=datamodule.vocab, _convert_="all")
    trainer = instantiate(
        cfg.trainer,
        logger=instantiate(cfg.logger),
        callbacks=[instantiate(c) for c in cfg.callbacks.values()],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_score
    if trainer.is_global_zero:
        run_dir = HydraConfig.get().runtime.output_dir
        tokens_per_sec = trainer.callback_metrics.get("train/tokens_per_sec")
        result = RunResult(
            overrides=HydraConfig.get().job.override_dirname,
            status="ok",
            num_params=module.model.num_parameters(),
            best_val_loss=None if best is None else best.item(),
            tokens_per_sec=None if tokens_per_sec is None else tokens_per_sec.item(),
            wall_time_s=time.perf_counter() - started,
            best_checkpoint=checkpoint.best_model_path or None,
        )
        write_result(run_dir, result)
        print(f"\nbest val/loss: {best.item():.4f}" if best is not None else "\nno validation ran")
        print(f"checkpoints:   {checkpoint.dirpath}")
        print(f"sample with:   python generate.py ckpt={run_dir} prompt='ROMEO:' max_new_tokens=500")
    return None if best is None else best.item()


def record_failure(error: Exception) -> float:
    """Keep a sweep going past a failed run: its result.json says why, and it scores +inf.

    Hydra's basic launcher stops the whole sweep at the first exception a job raises, and Optuna
    marks a trial failed for a non-number; +inf instead ranks the run last for any minimiser.
    """
    user_error = find_user_error(error)
    if user_error is None:
        log.exception("run failed (a bug, traceback above); the sweep goes on")
        message = f"{type(error).__name__}: {error}"
    else:
        log.error(f"run failed: {user_error}; the sweep goes on")
        message = str(user_error)
    hydra_config = HydraConfig.get()
    write_result(
        hydra_config.runtime.output_dir,
        RunResult(
            overrides=hydra_config.job.override_dirname,
            status="failed",
            error=message.strip().splitlines()[0],
        ),
    )
    return float("inf")


class SweepSummary(Callback):
    """At the end of a multirun, writes summary.csv and summary.md into the sweep dir and prints them."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        markdown = write_summary(sweep_dir)
        print(f"\nsweep summary ({sweep_dir / 'summary.csv'}):\n{markdown}")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except Exception as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return record_failure(e)
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


def require_sweep_extra(argv: list[str]) -> None:
    """hparams_search configs need the Optuna sweeper plugin; say which extra installs it."""
    if not any(arg.startswith("hparams_search=") for arg in argv):
        return
    try:
        installed = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:  # not even the hydra_plugins namespace
        installed = False
    if not installed:
        print(
            "error: hparams_search needs the Optuna sweeper, an optional extra: pip install -e '.[sweep]'",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    require_sweep_extra(sys.argv[1:])
    main()
