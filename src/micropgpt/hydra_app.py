"""The Hydra application: everything train.py, generate.py, eval.py and the Python API share.

The only package module that imports Hydra (shared/DESIGN.md, Boundaries). Importing it (which
`import micropgpt` does) registers the resolvers conf/ uses and the typed schemas of conf/'s
model, generate and eval configs, so conf/train.yaml composes with Hydra's Compose API too.
It also holds the training job (`train`, and `train_command` around it for `python train.py`),
the Hydra callbacks conf/train.yaml names, sweep-failure recording, the resume command, the
plugin-extra checks, and `run_app`/`compose`: conf/ composed and run from Python as the
commands do.
"""

from __future__ import annotations

import atexit
import difflib
import gc
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Quote, QuotedString
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_method, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from micropgpt import slurm_launch
from micropgpt.checkpoint import resolve_checkpoint
from micropgpt.cpu_kernels import native_bf16
from micropgpt.errors import UserError, find_user_error
from micropgpt.files import atomic_write, claim_new_dir, remove_stale_temporary_files
from micropgpt.model import GPTConfig
from micropgpt.summary import RunResult, read_results, write_result, write_summary

# Lightning (and the modules built on it) is imported by the jobs that train or evaluate, not here:
# it takes seconds to import, and generate.py, composition errors and `import micropgpt` need none of it.
if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import Logger

log = logging.getLogger(__name__)

# conf/ beside src/ in the project checkout (the package is installed editable: pip install -e).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# --- resolvers used in conf/ -------------------------------------------------------------------


def run_name(max_chars: int = 60) -> str:
    """The run's name in TensorBoard (conf/logger) and the sweep summary: what the run changed.

    Its command-line overrides, less hydra.job.config.override_dirname.exclude_keys (paths, and in
    a sweep the settings every run shares: SweepRunNames), keys without their group where that is
    unambiguous: `n_embd=32,n_layer=2`. A longer name is cut, and ends in a hash of the whole.
    """
    hydra_config = HydraConfig.get()
    excluded = set(hydra_config.job.config.override_dirname.exclude_keys)
    named = [o for o in _parse(hydra_config.overrides.task) if o.key_or_group not in excluded]
    short = [o.key_or_group.rsplit(".", 1)[-1] for o in named]
    keys = [s if short.count(s) == 1 else o.key_or_group for s, o in zip(short, named, strict=True)]
    # A string as it reads (a path quoted by verbatim_overrides without its quotes), else Hydra's form.
    values = [o.value() if isinstance(o.value(), str) else o.get_value_element_as_str() for o in named]
    name = ",".join(
        "~" + key if o.is_delete() else f"{key}={value}"
        for key, o, value in zip(keys, named, values, strict=True)
    )
    if len(name) <= max_chars:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:6]
    return f"{name[: max_chars - len(digest) - 1]}~{digest}"


def sweep_dir() -> str | None:
    """The sweep dir of a job of a multirun (-m), None in a single run: how trackers group a sweep."""
    hydra_config = HydraConfig.get()
    return hydra_config.sweep.dir if hydra_config.mode == RunMode.MULTIRUN else None


def on_first_process(value):
    """`value` in the first process of a multi-process run, None in the others.

    torchrun and SLURM start every process with the same command line; the rank they set in the
    environment (read by Lightning at import) is all that tells them apart before training starts.
    """
    from lightning.pytorch.utilities import rank_zero_only

    return value if rank_zero_only.rank == 0 else None


def bf16_if_native(accelerator: str) -> str:
    """ "bf16-mixed" where the hardware `trainer.accelerator` picks computes bf16 natively (a GPU
    with bf16, a CPU with AVX512-BF16 or AMX), "32-true" elsewhere: emulated bf16 runs slower than
    fp32, so a recipe must not ask for it there."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if native_bf16() else "32-true"


# replace=True: a notebook may reload this module.
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("on_first_process", on_first_process, replace=True)
OmegaConf.register_new_resolver("sweep_dir", sweep_dir, replace=True)
OmegaConf.register_new_resolver("bf16_if_native", bf16_if_native, replace=True)
OmegaConf.register_new_resolver("slurm_gpus_per_node", slurm_launch.gpus_per_node, replace=True)

# --- typed schemas: a wrong type fails at composition ------------------------------------------

# The model group's, so `model.n_embd=abc` fails at composition. Derived from GPTConfig so the two
# cannot drift; vocab_size comes from the corpus, not the config. `compile` is how GPTModule runs
# the GPT, not part of it: checkpoints do not keep it.
_hints = typing.get_type_hints(GPTConfig)
ModelSchema = make_dataclass(
    "ModelSchema",
    [(f.name, _hints[f.name], f.default) for f in fields(GPTConfig) if f.name != "vocab_size"]
    + [("compile", bool, False)],
)


@dataclass
class GenerateSchema:
    """The types of conf/generate.yaml's keys, so `max_new_tokens=abc` fails at composition."""

    ckpt: str | None = MISSING
    prompt: str = MISSING
    prompt_file: str | None = MISSING
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int | None = MISSING
    top_p: float | None = MISSING
    num_samples: int = MISSING
    seed: int | None = MISSING
    device: str = MISSING
    kv_cache: bool = MISSING
    cache_keep: int | None = MISSING
    stream: bool = MISSING
    out: str | None = MISSING


@dataclass
class EvalDataSchema:
    path: str | None = None
    batch_size: int | None = None


@dataclass
class EvalSchema:
    """The types of conf/eval.yaml's keys; `trainer` is conf/trainer's, for Trainer.validate."""

    ckpt: str | None = MISSING
    data: EvalDataSchema = field(default_factory=EvalDataSchema)
    stride: int | None = MISSING
    out: str | None = MISSING
    trainer: dict[str, Any] = MISSING


ConfigStore.instance().store(group="model", name="schema", node=ModelSchema)
ConfigStore.instance().store(name="generate_schema", node=GenerateSchema)
ConfigStore.instance().store(name="eval_schema", node=EvalSchema)

# --- the training job --------------------------------------------------------------------------


class SweepConfigError(UserError):
    """A mistake that fails every job of a sweep alike: the sweep stops instead of recording each."""


def refuse_script_relaunch(trainer: L.Trainer, python_api: bool) -> None:
    """Refuse a strategy that starts its processes by re-running the command line, where that
    command is not this run: a sweep's (-m), or the program that called micropgpt.train.

    Plain DDP does; under -m each process would re-run the whole sweep (Lightning #18175, Hydra
    #2070). ddp_spawn starts them from inside the job, torchrun and SLURM from outside: both fine.
    """
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    if not (in_sweep or python_api):
        return
    launcher = trainer.strategy.launcher
    if (
        # Lightning has no public name for the launcher that re-runs the command line: in 2.6 it is
        # _SubprocessScriptLauncher, the launcher of strategy=ddp and of devices>1 with auto.
        isinstance(launcher, _SubprocessScriptLauncher)
        and trainer.num_devices > 1
        and not launcher.cluster_environment.creates_processes_externally
    ):
        strategy = type(trainer.strategy).__name__
        if python_api:
            raise UserError(
                f"micropgpt.train on {trainer.num_devices} devices cannot use {strategy}, which starts "
                "each process by re-running the calling program; add trainer.strategy=ddp_spawn, or "
                "run python train.py"
            )
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


def remove_interrupted_writes(trainer: L.Trainer) -> None:
    """Remove what writes killed before their rename (a SIGKILL, a power cut) left in the run's dirs."""
    from micropgpt.checkpoint_io import is_url

    dirs = [HydraConfig.get().runtime.output_dir, *(c.dirpath for c in trainer.checkpoint_callbacks)]
    removed = remove_stale_temporary_files(Path(d) for d in dirs if d and not is_url(d))
    if removed:
        paths = ", ".join(map(str, removed))
        print(f"note: removed {len(removed)} temporary file(s) of killed writes: {paths}", file=sys.stderr)


def instantiate_callbacks(callbacks: DictConfig, loggers: list[Logger]) -> list[L.Callback]:
    """conf/callbacks' callbacks, less those set to null (`callbacks.<name>=null`), and without a
    logger (`logger=null`) less LearningRateMonitor, which refuses a Trainer that has none."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    instances = [instantiate(literal_config(c)) for c in callbacks.values() if c is not None]
    if not loggers:
        instances = [c for c in instances if not isinstance(c, LearningRateMonitor)]
    return instances


def train(cfg: DictConfig, python_api: bool = False) -> float | None:
    """Build every object of the composed conf/train.yaml from its `_target_`, fit, write result.json.

    Returns the best validation loss (what Hydra sweepers minimise).
    """
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    from micropgpt.console import quiet_third_party_noise
    from micropgpt.interrupts import TrainingInterrupted
    from micropgpt.resume import check_resumable, resolve_ckpt_path

    started = time.perf_counter()
    quiet_third_party_noise()
    if rank_zero_only.rank == 0:
        print(where_the_run_goes(cfg))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(literal_config(cfg.data))  # a `${` in data.path is part of a name
    module = instantiate(cfg.module, vocab=datamodule.vocab, _convert_="all")
    loggers = instantiate_loggers(cfg.get("logger"))  # none with logger=null
    callbacks = instantiate_callbacks(cfg.callbacks, loggers)
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    refuse_script_relaunch(trainer, python_api)
    if rank_zero_only.rank == 0:  # once per run, before any of its processes writes a file
        remove_interrupted_writes(trainer)
    checkpoint_dir, run_dir = trainer.checkpoint_callback.dirpath, Path(trainer.default_root_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, checkpoint_dir, hpc_dir=run_dir)
    if ckpt_path is not None:
        check_resumable(ckpt_path, module)
    interruption = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except TrainingInterrupted as e:  # after the final step's validation and checkpoints
        interruption = e

    checkpoint = trainer.checkpoint_callback
    best = best_val_loss(trainer)
    if trainer.is_global_zero:
        run_dir = HydraConfig.get().runtime.output_dir
        tokens_per_sec = trainer.logged_metrics.get("train/device/items_per_sec")  # ThroughputMonitor's
        result = RunResult(
            run=run_name(),
            status="ok" if interruption is None else "interrupted",
            **run_settings(cfg),
            num_params=module.model.num_parameters(),
            steps=trainer.global_step,
            best_val_loss=best,
            tokens_per_sec=None if tokens_per_sec is None else float(tokens_per_sec),
            wall_time_s=time.perf_counter() - started,
            best_checkpoint=checkpoint.best_model_path or None,
        )
        write_result(run_dir, result)
        last = trainer.callback_metrics.get("val/loss")
        print(f"\nbest val/loss: {best:.4f}" if best is not None else "\nno validation ran")
        if last is not None:
            print(f"last val/loss: {last.item():.4f} (step {trainer.global_step})")
        print(f"checkpoints:   {checkpoint.dirpath}")
        sample = ["python", "generate.py", f"ckpt={run_dir}", "prompt=ROMEO:", "max_new_tokens=500"]
        print(f"sample with:   {shlex.join(sample)}")
    if interruption is not None:
        raise interruption
    return best


def where_the_run_goes(cfg: DictConfig) -> str:
    """The line that starts a run: its dir, and the TensorBoard command that shows it (in a sweep:
    the whole sweep)."""
    hydra_config = HydraConfig.get()
    line = f"run dir: {hydra_config.runtime.output_dir}"
    if cfg.get("logger") is None:
        return line
    in_sweep = hydra_config.mode == RunMode.MULTIRUN
    watched = hydra_config.sweep.dir if in_sweep else hydra_config.runtime.output_dir
    return f"{line}   (watch it: tensorboard --logdir {shlex.quote(watched)})"


def run_settings(cfg: DictConfig) -> dict[str, str | None]:
    """What the sweep summary lists beside the run's name: the choices a run name may leave out."""
    return {
        "optimizer": HydraConfig.get().runtime.choices.get("optimizer"),
        "position": cfg.model.position,
        "activation": cfg.model.activation,
        "precision": str(cfg.trainer.precision),
    }


def record_failure(error: Exception, cfg: DictConfig) -> float:
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
            run=run_name(),
            status="failed",
            **run_settings(cfg),
            error=message.strip().splitlines()[0],
        ),
    )
    return float("inf")


def resume_command() -> str:
    """The command that continues this run from its last.ckpt."""
    hydra_config = HydraConfig.get()
    overrides = [typed_override(o) for o in hydra_config.overrides.task if not o.startswith("ckpt_path=")]
    run_dir = hydra_config.runtime.output_dir
    return shlex.join(["python", "train.py", *overrides, f"hydra.run.dir={run_dir}", "ckpt_path=last"])


def train_command(cfg: DictConfig) -> float | None:
    """`python train.py`'s job: `train`, with the command line's answers to what can go wrong."""
    from lightning.pytorch.utilities import rank_zero_only
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from micropgpt.interrupts import TrainingInterrupted

    if _typed_args is not None:
        # Lightning's DDP launcher starts the other processes with sys.argv: as typed, each quotes it.
        sys.argv[1:] = _typed_args
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
            return record_failure(e, cfg)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


# --- the evaluation job -----------------------------------------------------------------------

RUN_CONFIG = Path(".hydra") / "config.yaml"


def run_data_config(checkpoint: Path) -> dict:
    """The data settings of the run that saved `checkpoint` (RUN/checkpoints/x.ckpt), from its
    .hydra/, relative paths made absolute from the run's working directory."""
    run_dir = checkpoint.resolve().parent.parent
    if not (run_dir / RUN_CONFIG).is_file():
        raise UserError(
            f"{checkpoint} is not inside a run dir with {RUN_CONFIG}, so its validation split is unknown; "
            "pass data.path= a text file to evaluate on"
        )
    data = OmegaConf.to_container(OmegaConf.load(run_dir / RUN_CONFIG).data, resolve=True)
    del data["_target_"], data["block_size"]  # the checkpoint's own block_size
    cwd = Path(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.cwd)
    for key in ("path", "data_dir"):
        if data.get(key):
            data[key] = str(cwd / data[key])
    return data


def evaluate(cfg: DictConfig, python_api: bool = False) -> dict:
    """conf/eval.yaml's evaluation (micropgpt.evaluation) on a Trainer built from `cfg.trainer`;
    writes `cfg.out` from the first process. Returns the result on every process."""
    from micropgpt.evaluation import prepare_evaluation, score

    if cfg.ckpt is None:
        raise UserError("no checkpoint given: pass ckpt= a run directory (outputs/DATE/TIME) or a .ckpt file")
    if cfg.out is not None and Path(cfg.out).is_dir():
        raise UserError(f"out={cfg.out} is a directory; pass a file name to write the result to")
    file = resolve_checkpoint(cfg.ckpt)
    whole = cfg.data.path is not None
    data = {"path": cfg.data.path} if whole else run_data_config(file)
    scorer, datamodule = prepare_evaluation(file, data, whole, cfg.stride, cfg.data.batch_size)
    trainer = instantiate(cfg.trainer)
    refuse_script_relaunch(trainer, python_api)
    result = score(trainer, scorer, datamodule, file)
    if cfg.out is not None and trainer.is_global_zero:
        text = json.dumps(result, indent=2) + "\n"
        try:
            atomic_write(Path(cfg.out), lambda f: f.write(text.encode()))
        except OSError as e:
            raise UserError(f"out={cfg.out} cannot be written: {e.strerror}") from None
    return result


# --- Hydra callbacks (conf/train.yaml, hydra.callbacks) ----------------------------------------

_raise_user_errors = False  # True while run_app runs: callbacks raise UserError instead of exiting


class _CallbackStop(BaseException):
    """Carries a callback's UserError to run_app; a BaseException, since Hydra turns a callback's
    Exception into a warning and goes on."""

    def __init__(self, error: UserError):
        super().__init__(str(error))
        self.error = error


def _stop(error: UserError) -> typing.NoReturn:
    """Stop on a user's mistake inside a Hydra callback: `error: ...` and exit 2 under a command,
    the UserError raised by run_app under the Python API."""
    if _raise_user_errors:
        raise _CallbackStop(error)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


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
    """Gives every run and sweep a dir of its own, and stops in one line when it cannot be written.

    The default dirs, outputs/DATE/TIME and outputs/multirun/DATE/TIME, have a resolution of one
    second: two runs or two sweeps started in the same second would share one. When hydra.run.dir
    (hydra.sweep.dir) depends on ${now:}, the dir is claimed with claim_new_dir (a second one of the
    same second gets TIME-1). A dir without ${now:} is used as it is: a resumed run, a DDP child
    process, a SLURM job's own dir. So is the dir of a process that torchrun or SLURM started as one
    of several (see on_first_process): they must all arrive at the same dir without talking to each other.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        claimed = self._own_dir(config.hydra, "run")
        if claimed is not None:
            with open_dict(config.hydra.run):
                config.hydra.run.dir = claimed

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # Before the sweeper and launcher read hydra.sweep.dir (instantiated after this callback).
        claimed = self._own_dir(config.hydra, "sweep")
        if claimed is None:
            return
        with open_dict(config.hydra):
            config.hydra.sweep.dir = claimed
            # The launchers compose each job's config again from these overrides, where ${now:}
            # would give the unclaimed dir (Hydra's load_sweep_config): the claimed one goes last.
            overrides = [o for o in config.hydra.overrides.hydra if not o.startswith("hydra.sweep.dir=")]
            config.hydra.overrides.hydra = [*overrides, f"hydra.sweep.dir={override_value(claimed)}"]

    @staticmethod
    def _own_dir(hydra_config: DictConfig, mode: str) -> str | None:
        """The dir claimed for hydra.{mode}.dir when it is time-based, else None once it is writable."""
        path = Path(hydra_config[mode].dir)
        time_based = "${now:" in OmegaConf.to_container(hydra_config[mode], resolve=False)["dir"]
        try:
            one_of_several = "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1
            if time_based and not one_of_several:
                return str(claim_new_dir(path))
            path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        except OSError as e:
            _stop(
                UserError(
                    f"{mode} directory {path} cannot be written ({e.strerror}); "
                    f"pass hydra.{mode}.dir=<a writable directory>"
                )
            )
        return None


class CheckSlurmSubmission(Callback):
    """Runs check_submission before a sweep on hydra/launcher=slurm submits its jobs."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.launcher.get("_target_") != slurm_launch.SLURM_LAUNCHER:
            return
        try:
            slurm_launch.check_submission(OmegaConf.to_container(config.hydra.launcher, resolve=True))
        except UserError as e:
            _stop(e)
        if not slurm_launch.has_accounting():
            slurm_launch.poll_with_squeue()


def override_value(text: str) -> str:
    """`text` as the value of a Hydra command-line override: quoted, and with no interpolation."""
    return QuotedString(text=_no_interpolation(text), quote=Quote.single).with_quotes()


def _no_interpolation(text: str) -> str:
    """`text` as an OmegaConf string value that reads back as `text`, `${` included."""
    # OmegaConf reads `\${` as a literal `${`, and backslashes before it in pairs.
    return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + r"\${", text)


def literal_config(node: DictConfig) -> Any:
    r"""`node` resolved, as plain containers to instantiate, in which a `${` of a value stays text.

    Hydra's instantiate resolves its config (OmegaConf.resolve, which unescapes `\${` into `${`)
    and then reads it (which would take that `${` for an interpolation): each value is escaped for
    both, so a text-sample prompt such as `${x}`, or a corpus so named, reaches its object as typed.
    """

    def escape(value: Any) -> Any:
        if isinstance(value, str):
            return _no_interpolation(_no_interpolation(value))
        if isinstance(value, dict):
            return {key: escape(item) for key, item in value.items()}
        if isinstance(value, list):
            return [escape(item) for item in value]
        return value

    return escape(OmegaConf.to_container(node, resolve=True))


class SweepRunNames(Callback):
    """Names each run of a sweep by what varies across the sweep (run_name): `n_embd=16`, not all of
    the overrides every run shares.

    What varies: the sweep overrides of the command line (`a,b`, range, choice, interval...) and what
    the sweeper adds to each job (Optuna's search space). What every run shares, the command line's
    other overrides, joins hydra.job.config.override_dirname.exclude_keys before the launcher
    composes each job's config from hydra.overrides.hydra (as OwnRunDir does with the sweep dir).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        overrides = _parse(config.hydra.overrides.task)
        if not any(o.is_sweep_override() for o in overrides) and not config.hydra.sweeper.get("params"):
            return  # nothing varies: each run is named as a single run
        swept = {o.key_or_group for o in overrides if o.is_sweep_override()}
        exclude = [  # a swept path is named too: `-m data.path=a.txt,b.txt` gives path=a.txt, path=b.txt
            *(key for key in config.hydra.job.config.override_dirname.exclude_keys if key not in swept),
            *(o.key_or_group for o in overrides if not o.is_sweep_override()),
        ]
        exclude_override = "hydra.job.config.override_dirname.exclude_keys"
        with open_dict(config.hydra):
            config.hydra.job.config.override_dirname.exclude_keys = exclude
            kept = [o for o in config.hydra.overrides.hydra if not o.startswith(exclude_override + "=")]
            listed = ",".join(override_value(key) for key in exclude)
            config.hydra.overrides.hydra = [*kept, f"{exclude_override}=[{listed}]"]


def _parse(overrides) -> list[Override]:
    return OverridesParser.create().parse_overrides(list(overrides))


# --- the command line: text and paths as typed; Hydra's mistakes in one line --------------------

# Natural text: taken character for character, `${` included (never an interpolation, nor is it
# in a path, except in Hydra's own dirs: `${now:%H-%M-%S}` is how Hydra stamps them).
TEXT_KEYS = ("prompt", "callbacks.text_samples.prompt")
# Paths read: taken whole, unless a comma in a value that names no existing file separates the
# paths of a sweep (`-m data.path=a.txt,b.txt`, each taken whole).
INPUT_PATH_KEYS = ("data.path", "ckpt", "ckpt_path", "prompt_file")
# Paths written: always taken whole (Hydra cannot sweep the run and sweep dirs anyway).
OUTPUT_PATH_KEYS = ("data.data_dir", "out", "hydra.run.dir", "hydra.sweep.dir")
INTERPOLATED_KEYS = ("hydra.run.dir", "hydra.sweep.dir")

_typed_args: list[str] | None = None  # the command line as typed, while Hydra reads it quoted


def verbatim_overrides(args: list[str] | tuple[str, ...]) -> list[str]:
    """`args` (a command line's, or micropgpt.train's overrides) with the values of TEXT_KEYS and
    the path keys as Hydra override values that compose to exactly the characters typed.

    A path is left as it is when it is `null`, already in quotes (`'a b'`, `"a b"`: Lightning's
    DDP launcher passes the run dir so) or a sweep function (`choice(a.txt,b.txt)`); the other
    arguments (options, sweeps, `+key=`, lists) are Hydra's.
    """
    return [_verbatim(arg) for arg in args]


def _verbatim(arg: str) -> str:
    head, equals, value = arg.partition("=")
    key = head.lstrip("+")
    if not equals or arg.startswith("-") or len(head) - len(key) > 2:
        return arg
    if key in TEXT_KEYS:
        return f"{head}={override_value(value)}"
    if key not in INPUT_PATH_KEYS + OUTPUT_PATH_KEYS or value == "null":
        return arg
    quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
    if quoted or re.fullmatch(r"\w+\(.*\)", value, re.DOTALL):  # in quotes, or choice(...), glob(...)
        return arg
    if key in INPUT_PATH_KEYS and "," in value and not Path(value).exists():  # a sweep: each path quoted
        return f"{head}={','.join(override_value(path) for path in value.split(','))}"
    if key in INTERPOLATED_KEYS:
        return f"{head}={QuotedString(text=value, quote=Quote.single).with_quotes()}"
    return f"{head}={override_value(value)}"


def typed_override(override: str) -> str:
    """The command-line argument that verbatim_overrides turns into `override`: what to print in a
    command for a user to run again (the resume command)."""
    head, _, _ = override.partition("=")
    if head.lstrip("+") not in TEXT_KEYS + INPUT_PATH_KEYS + OUTPUT_PATH_KEYS:
        return override
    try:
        value = OverridesParser.create().parse_override(override).value()
    except OverrideParseException:
        return override
    if not isinstance(value, str):
        return override
    if head.lstrip("+") not in INTERPOLATED_KEYS:  # undo override_value's `\${` (2n+1 `\`: n, `${`)
        value = re.sub(r"(\\+)\$\{", lambda m: m[1][: len(m[1]) // 2] + "${", value)
    typed = f"{head}={value}"
    return typed if _verbatim(typed) == override else override


def run_command(main: Callable[[], Any], config_name: str) -> None:
    """Run `main`, an entry script's @hydra.main function, on sys.argv as the user typed it: text
    and paths verbatim (verbatim_overrides), and a mistake Hydra finds in composing the config
    (a misspelt key, a missing `+`, a bad value) in one `error:` line with exit status 2."""
    global _typed_args
    # At exit Python collects the objects of every imported module (torch's, Lightning's): seconds,
    # for memory the process gives back anyway. Frozen, the collector leaves them to the OS.
    atexit.register(gc.freeze)
    typed = sys.argv[1:]
    _typed_args = typed
    sys.argv[1:] = verbatim_overrides(null_groups_removed(typed))
    # Hydra prints its composition errors over several lines and exits 1; HYDRA_FULL_ERROR makes
    # it raise them instead. Set by the user, it keeps Hydra's report in full.
    full_error_by_user = "HYDRA_FULL_ERROR" in os.environ
    os.environ["HYDRA_FULL_ERROR"] = os.environ.get("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as e:
        if full_error_by_user:
            raise
        print(f"error: {composition_error(e, config_name, sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv[1:] = typed
        _typed_args = None
        if not full_error_by_user:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def composition_error(error: HydraException, config_name: str, overrides: list[str]) -> str:
    """Hydra's report of a composition mistake as one line that names the key and, where there is
    one, the closest valid key (a key of the config, or an argument of a `_target_` it does not set)."""
    message = str(error).strip()
    command = f"python {config_name}.py"
    if isinstance(error, OverrideParseException):
        reason = message.splitlines()[0]
        return f"cannot read the override {error.override!r}: {reason} (Hydra's override grammar)"
    if isinstance(error, MissingConfigException) and error.options:
        missing = re.search(r"Could not find '([^']+)'", message)
        group, _, option = (missing[1] if missing else "").rpartition("/")
        close = difflib.get_close_matches(option, error.options, n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        return f"{group}={option}: no such option; {hint}(options: {', '.join(error.options)})"
    if missing := re.match(r"Could not (override|delete from config\.) '?([^' ]+)'?", message):
        key, delete = missing[2], missing[1] != "override"
        value = _typed_value(key, overrides)
        config_keys, targets, mirrors = _known_keys(config_name, [o for o in overrides if _key_of(o) != key])
        arguments: dict[str, str] = {}
        close = _closest(key, config_keys, mirrors) if delete else None
        # Listing a _target_'s arguments imports it (Lightning's Trainer: seconds): the targets on
        # the key's own path first, every target only when those give no close key.
        on_path = {prefix: target for prefix, target in targets.items() if key.startswith(prefix)}
        for candidates in () if delete else (on_path, targets):
            arguments = _unset_arguments(candidates, config_keys)
            if key in arguments:
                return (
                    f"{key} is not in the config, so it needs a +: +{key}={value} "
                    f"(it is an argument of {arguments[key]} that the config leaves at its default)"
                )
            close = _closest(key, [*config_keys, *arguments], mirrors)
            if close is not None:
                break
        if close is None:
            return f"no key {key} in the config ({command} --cfg job lists them)" + (
                "" if delete else f"; +{key}={value} adds one"
            )
        if delete:
            return f"no key {key} in the config to delete; did you mean ~{close}?"
        if close in arguments:
            return (
                f"no key {key} in the config; did you mean {close}? It is an argument of "
                f"{arguments[close]} that the config does not set, so it needs a +: +{close}={value}"
            )
        return f"no key {key} in the config; did you mean {close}? ({close}={value})"
    if present := re.match(r"Could not append to config\. An item is already at '([^']+)'", message):
        key = present[1]
        return f"{key} is already in the config: drop the +, {key}={_typed_value(key, overrides)}"
    if ambiguous := re.match(r"Ambiguous value for argument '(.*)'\n", message):
        return (
            f"{ambiguous[1]}: a comma separates several values; add -m to run one job for each, "
            "or write a list as key=[a,b]"
        )
    if merging := re.match(r"Error merging override (.*)", message):
        return f"{merging[1]}: {str(error.__cause__).strip().splitlines()[0]}"
    lines = [line.strip() for e in (error, error.__cause__) if e for line in str(e).splitlines()]
    return "; ".join(line for line in lines if line and not line.startswith(("full_key:", "object_type=")))


def _closest(key: str, keys: list[str], mirrors: set[str]) -> str | None:
    """The key of `keys` closest to `key`, else the one whose last part is closest to its last part
    (`prompt` finds callbacks.text_samples.prompt), leaving out `mirrors`, keys whose value is
    another's (`max_time` means trainer.max_time, not callbacks.hparams.params.max_time); None
    when none is close."""
    close = difflib.get_close_matches(key, keys, n=1)
    if close:
        return close[0]
    by_last_part = {k.rsplit(".", 1)[-1]: k for k in reversed(keys) if k not in mirrors}
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_last_part), n=1, cutoff=0.8)
    return by_last_part[close[0]] if close else None


def _key_of(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _typed_value(key: str, overrides: list[str]) -> str:
    """The value given for `key` on the command line, as typed."""
    values = [typed_override(o).partition("=")[2] for o in overrides if _key_of(o) == key]
    return values[-1] if values else "..."


def _known_keys(config_name: str, overrides: list[str]) -> tuple[list[str], dict[str, str], set[str]]:
    """Every key of the composed config (hydra's included), the `_target_` of each node that has
    one (the node's key and a dot: target), and the keys whose value is one interpolation `${...}`;
    composed with `overrides` where they compose."""
    singles = [o for o in overrides if not o.startswith("-")]
    GlobalHydra.instance().clear()
    for attempt in (singles, []):
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = hydra_compose(config_name, overrides=attempt, return_hydra_config=True)
            break
        except (HydraException, OmegaConfBaseException):
            continue
    else:
        return [], {}, set()
    config_keys: list[str] = []
    targets: dict[str, str] = {}
    mirrors: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for name, child in node.items():
            config_keys.append(prefix + str(name))
            if isinstance(child, str) and re.fullmatch(r"\$\{[^${}]*\}", child):
                mirrors.add(prefix + str(name))
            walk(child, f"{prefix}{name}.")
        if isinstance(node.get("_target_"), str):
            targets[prefix] = node["_target_"]

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return config_keys, targets, mirrors


def _unset_arguments(targets: dict[str, str], config_keys: list[str]) -> dict[str, str]:
    """Each argument of the `targets` that the config does not set (its key: the target)."""
    arguments: dict[str, str] = {}
    for prefix, target in targets.items():
        try:
            parameters = inspect.signature(get_method(target)).parameters
        except (ImportError, ValueError, TypeError, HydraException):
            continue
        for name, parameter in parameters.items():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if prefix + name not in config_keys:
                arguments[prefix + name] = target
    return arguments


def null_groups_removed(argv: list[str]) -> list[str]:
    """`argv` with each `GROUP=null` of a conf/ config group (`logger=null`) as Hydra's `~GROUP`.

    null turns a key off (`callbacks.text_samples=null`); Hydra refuses it for a config group
    ("Config group override must be a string or a list"), whose removal it spells `~GROUP`.
    """
    removals = {f"{path.name}=null": f"~{path.name}" for path in CONF_DIR.iterdir() if path.is_dir()}
    return [removals.get(arg, arg) for arg in argv]


# --- optional Hydra plugins ---------------------------------------------------------------------

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


# --- conf/ from Python ------------------------------------------------------------------------


@contextmanager
def _conf(job_name: str) -> Iterator[None]:
    """Hydra initialised on conf/ for one composition or run; Hydra's previous state after it."""
    if not (CONF_DIR / "train.yaml").is_file():
        raise UserError(
            f"micropgpt's configs are not at {CONF_DIR}: the Python API needs the project checkout, "
            "installed with pip install -e ."
        )
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job_name):
            yield
    except (HydraException, OmegaConfBaseException) as e:
        # A bad override or config value: what the command prints (the error and its cause), in one line.
        lines = [line.strip() for error in (e, e.__cause__) if error for line in str(error).splitlines()]
        context = ("full_key:", "reference_type=", "object_type=")  # OmegaConf's, about its own nodes
        raise UserError(" ".join(line for line in lines if line and not line.startswith(context))) from None


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """conf/<config_name>.yaml composed with `overrides`, without the hydra node."""
    with _conf(config_name):
        return hydra_compose(config_name, overrides=null_groups_removed(list(overrides)))


def run_app(config_name: str, overrides: list[str], task: Callable[[DictConfig], Any]) -> Any:
    """Run `task` on conf/<config_name>.yaml with `overrides` as `python <config_name>.py` runs its
    job: Hydra's callbacks, the run dir, .hydra/, the job's log file, HydraConfig set; returns
    what `task` returned, and raises what it raised (a user's mistake as its UserError)."""
    global _raise_user_errors
    outcome: dict[str, Any] = {}

    def job(cfg: DictConfig) -> None:
        # Caught here rather than by Hydra, which would also print "Error executing job".
        try:
            outcome["value"] = task(cfg)
        except Exception as e:
            outcome["error"] = e

    _raise_user_errors = True
    try:
        with _conf(config_name):
            hydra = GlobalHydra.instance().hydra
            hydra.run(config_name=config_name, task_function=job, overrides=null_groups_removed(overrides))
    except _CallbackStop as stop:
        raise stop.error from None
    finally:
        _raise_user_errors = False
    if "error" in outcome:
        error = outcome["error"]
        user_error = find_user_error(error)
        if user_error is not None:
            raise user_error from None
        raise error
    return outcome["value"]


def merged(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """`cfg` with `values` (keyword arguments of the Python API) merged in, typed by its schema."""
    try:
        return OmegaConf.merge(cfg, values)
    except OmegaConfBaseException as e:
        raise UserError(str(e).splitlines()[0]) from None


def train_from_python(overrides: list[str]) -> Path:
    """`python train.py *overrides` in this process (micropgpt.train); returns the run dir."""

    def job(cfg: DictConfig) -> Path:
        train(cfg, python_api=True)
        return Path(HydraConfig.get().runtime.output_dir)

    return run_app("train", overrides, job)


def evaluate_from_python(values: dict[str, Any], overrides: list[str]) -> dict:
    """`python eval.py *overrides` with `values` set (micropgpt.evaluate)."""
    return run_app("eval", overrides, lambda cfg: evaluate(merged(cfg, values), python_api=True))
