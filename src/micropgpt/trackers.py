"""Experiment trackers beyond TensorBoard (conf/logger): Lightning's loggers, with what this project adds.

MLflow and W&B are optional extras; without one, choosing its logger stops in one line that names
the extra. Every logger gets the metrics from Lightning; the hyperparameters and text samples
(callbacks.py) reach each tracker through log_text_sample and the logger's log_hyperparams.
"""

from __future__ import annotations

import importlib.util
import os
import re
from contextlib import contextmanager

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from micropgpt.errors import UserError


def require_extra(module: str, choice: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{choice} needs {module}, an optional extra: pip install -e '.[{extra}]'")


@contextmanager
def _environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_tracking_server(uri: str) -> None:
    """Stop in one line, before training starts, when the MLflow tracking URI does not answer.

    Asked once without retries: MLflow's client would otherwise retry for minutes before its traceback.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        with _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
            MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        message = str(e)
        errno = re.search(r"\[Errno -?\d+\] ([^\"'()]+)", message)
        status = re.search(r"error code (\d+)", message)
        reason = errno[1] if errno else f"HTTP {status[1]}" if status else message.splitlines()[0][:200]
        raise UserError(
            f"MLflow tracking server {uri} does not answer ({reason.strip()}); start it "
            "(mlflow server --host 127.0.0.1 --port 5000) or pass logger.tracking_uri=<its address>"
        ) from e


class MLflowTracker(MLFlowLogger):
    """Lightning's MLFlowLogger that checks its tracking server before training starts.

    An empty run name (a run without overrides) lets MLflow name the run: the server refuses ''.
    Tags without a value (`sweep` outside a sweep) are left out.
    """

    def __init__(self, run_name: str | None = None, tags: dict | None = None, **kwargs):
        require_extra("mlflow", "logger=mlflow", "mlflow")
        tags = {key: value for key, value in (tags or {}).items() if value is not None}
        super().__init__(run_name=run_name or None, tags=tags, **kwargs)
        check_tracking_server(self._tracking_uri)


class WandbTracker(WandbLogger):
    """Lightning's WandbLogger that finishes its W&B run when training ends.

    W&B keeps one run per process: unfinished, the next job of a sweep would log into it
    (lightning-hydra-template #289). An empty name (a run without overrides) lets W&B name the run.
    """

    def __init__(self, name: str | None = None, **kwargs):
        require_extra("wandb", "logger=wandb", "wandb")
        super().__init__(name=name or None, **kwargs)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status in ("success", "finished") else 1)


def log_text_sample(logger: Logger, key: str, text: str, step: int) -> None:
    """`text` into the tracker's place for text, if it has one (CSV has none)."""
    if isinstance(logger, TensorBoardLogger):
        # TensorBoard renders Markdown; indenting every line makes it a verbatim code block.
        logger.experiment.add_text(key, "\n".join("    " + line for line in text.split("\n")), step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, text, f"{key}/step_{step:07d}.txt")
    elif isinstance(logger, WandbLogger):
        logger.log_text(key, columns=["step", "text"], data=[[step, text]], step=step)


def has_text_place(logger: Logger) -> bool:
    return isinstance(logger, (TensorBoardLogger, MLFlowLogger, WandbLogger))
