"""Train a character-level GPT: `python train.py [overrides]`, `python train.py -m` for sweeps.

Composes conf/train.yaml, builds every object from its `_target_`, fits, and returns the best
validation loss (what Hydra sweepers minimise).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import sys
import tempfile
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
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from micropgpt.errors import UserError, find_user_error
from micropgpt.files import claim_new_dir
from micropgpt.interrupts import TrainingInterrupted
from micropgpt.model import GPTConfig
from micropgpt.resume import check_resumable, resolve_ckpt_path
from micropgpt.summary import RunResult, read_results, write_result, write_summary

log = logging.getLogger(__name__)


def folder_name(text: str, max_bytes: int = 255) -> str:
    """`text` cut to the file-name limit of common file systems, ending in '...' when cut.

    Run names are the run's overrides (conf/logger), and a long command line must not stop a run.
    """
    if len(text.encode()) <= max_bytes:
        return text
    return text.encode()[: max_bytes - 3].decode(errors="ignore") + "..."


def on_first_process(value):
    """`value` in the first process of a multi-process run, None in the others.

    torchrun and SLURM start every process with the same command line; the rank they set in the
    environment (read by Lightning at import) is all that tells them apart before training starts.
    """
    return value if rank_zero_only.rank == 0 else None


def sweep_dir() -> str | None:
    """The sweep dir of a job of a multirun (-m), None in a single run: how trackers group a sweep."""
    hydra_config = HydraConfig.get()
    return hydra_config.sweep.dir if hydra_config.mode == RunMode.MULTIRUN else None


# replace=True: Hydra imports this file a second time, as module `train`, for SweepSummary.
OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)
OmegaConf.register_new_resolver("on_first_process", on_first_process, replace=True)
OmegaConf.register_new_resolver("sweep_dir", sweep_dir, replace=True)

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


class SweepConfigError(UserError):
    """A mistake that fails every job of a sweep alike: the sweep stops instead of recording each."""


def refuse_script_relaunch_in_multirun(trainer: L.Trainer) -> None:
    """Refuse a sweep whose strategy starts its processes by re-running the command line.

    Plain DDP does; under -m each process would re-run the whole sweep (Lightning #18175, Hydra
    #2070). ddp_spawn starts them from inside the job, torchrun and SLURM from outside: both fine.
    """
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = trainer.strategy.launcher
    if (
        isinstance(launcher, _SubprocessScriptLauncher)
        and trainer.num_devices > 1
        and not launcher.cluster_environment.creates_processes_externally
    ):
        strategy = type(trainer.strategy).__name__
        raise SweepConfigError(
            f"a sweep (-m) on {trainer.num_devices} devices cannot use {strategy}, which "
            "starts each process by re-running this command, so each would re-run the whole sweep; "
            "add trainer.strategy=ddp_spawn, or run each configuration without -m"
        )


def best_val_loss(trainer: L.Trainer) -> float | None:
    best = trainer.checkpoint_callback.best_model_score
    if best is None:
        # ddp_spawn hands back the callback metrics and best checkpoint path, not the best score.
        best = trainer.callback_metrics.get("val/loss_best")
    return None if best is None else best.item()


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Every logger chosen in conf/logger (the entries with a _target_; others are their shared settings)."""
    return [instantiate(c) for c in (cfg or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig) -> float | None:
    started = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, vocab=datamodule.vocab, _convert_="all")
    trainer = instantiate(
        cfg.trainer,
        logger=instantiate_loggers(cfg.get("logger")),
        callbacks=[instantiate(c) for c in cfg.callbacks.values()],
    )
    refuse_script_relaunch_in_multirun(trainer)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, Path(trainer.checkpoint_callback.dirpath))
    if ckpt_path is not None:
        check_resumable(ckpt_path, module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    checkpoint = trainer.checkpoint_callback
    best = best_val_loss(trainer)
    if trainer.is_global_zero:
        run_dir = HydraConfig.get().runtime.output_dir
        tokens_per_sec = trainer.callback_metrics.get("train/tokens_per_sec")
        result = RunResult(
            overrides=HydraConfig.get().job.override_dirname,
            status="ok",
            num_params=module.model.num_parameters(),
            best_val_loss=best,
            tokens_per_sec=None if tokens_per_sec is None else tokens_per_sec.item(),
            wall_time_s=time.perf_counter() - started,
            best_checkpoint=checkpoint.best_model_path or None,
        )
        write_result(run_dir, result)
        print(f"\nbest val/loss: {best:.4f}" if best is not None else "\nno validation ran")
        print(f"checkpoints:   {checkpoint.dirpath}")
        print(f"sample with:   python generate.py ckpt={run_dir} prompt='ROMEO:' max_new_tokens=500")
    return best


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
        results = [result for _, result in read_results(sweep_dir)]
        if results and all(result.status == "failed" for result in results):
            # Failed runs do not stop a sweep, but a sweep with nothing to show must not exit 0.
            print(f"error: every run of the sweep in {sweep_dir} failed: see the table", file=sys.stderr)
            sys.exit(1)


class OwnRunDir(Callback):
    """Gives every run a run dir of its own, and stops in one line when it cannot be written.

    The default run dir, outputs/DATE/TIME, has a resolution of one second: two runs started in
    the same second would share it. When hydra.run.dir depends on ${now:}, the dir is claimed
    with claim_new_dir (a second run of the same second gets TIME-1). A hydra.run.dir without
    ${now:} is used as it is: a resumed run, a DDP child process, a SLURM job's own dir. So is
    the dir of a process that torchrun or SLURM started as one of several (see on_first_process):
    they must all arrive at the same dir without talking to each other.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(config.hydra.run.dir)
        time_based = "${now:" in OmegaConf.to_container(config.hydra.run, resolve=False)["dir"]
        try:
            one_of_several = "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1
            if time_based and not one_of_several:
                with open_dict(config.hydra.run):
                    config.hydra.run.dir = str(claim_new_dir(run_dir))
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=run_dir).close()
        except OSError as e:
            print(
                f"error: run directory {run_dir} cannot be written ({e.strerror}); "
                "pass hydra.run.dir=<a writable directory>",
                file=sys.stderr,
            )
            sys.exit(2)


def resume_command() -> str:
    """The command that continues this run from its last.ckpt."""
    hydra_config = HydraConfig.get()
    overrides = [o for o in hydra_config.overrides.task if not o.startswith("ckpt_path=")]
    run_dir = hydra_config.runtime.output_dir
    return shlex.join(["python", "train.py", *overrides, f"hydra.run.dir={run_dir}", "ckpt_path=last"])


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except TrainingInterrupted as e:
        if rank_zero_only.rank == 0:
            print(f"\n{e}\nresume with: {resume_command()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except SIGTERMException:
        # Lightning's own SIGTERM handling, before training started: there is nothing new to save.
        print("\nSIGTERM before the first training step: nothing new was saved", file=sys.stderr)
        sys.exit(128 + 15)
    except Exception as e:
        user_error = find_user_error(e)
        if HydraConfig.get().mode == RunMode.MULTIRUN and not isinstance(user_error, SweepConfigError):
            return record_failure(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


# Choices that need an optional Hydra plugin: (override prefixes, plugin module, what needs it, extra).
PLUGIN_EXTRAS = [
    (
        ("hparams_search=",),
        "hydra_plugins.hydra_optuna_sweeper",
        "hparams_search needs the Optuna sweeper",
        "sweep",
    ),
    (
        ("hydra/launcher=slurm", "hydra/launcher=submitit"),
        "hydra_plugins.hydra_submitit_launcher",
        "the SLURM and submitit launchers need hydra-submitit-launcher",
        "slurm",
    ),
]


def require_plugin_extras(argv: list[str]) -> None:
    """Say which optional extra installs a plugin that the command line asks for."""
    for prefixes, module, need, extra in PLUGIN_EXTRAS:
        if not any(arg.startswith(prefixes) for arg in argv):
            continue
        try:
            installed = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # not even the hydra_plugins namespace
            installed = False
        if not installed:
            print(f"error: {need}, an optional extra: pip install -e '.[{extra}]'", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    require_plugin_extras(sys.argv[1:])
    main()
