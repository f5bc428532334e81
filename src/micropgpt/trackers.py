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
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

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


def _reason(error: Exception) -> str:
    """The short cause inside an MLflow client error: 'Connection refused', 'HTTP 403', ..."""
    message = str(error)
    # As requests and urllib3 word it: "[Errno 111] Connection refused", "ConnectionResetError(104,
    # 'Connection reset by peer')", "RemoteDisconnected('Remote end closed connection without response')".
    cause = re.search(r"(?:\[Errno -?\d+\] |Error\(-?\d+, '|Disconnected\(')([A-Za-z ]+)", message)
    status = re.search(r"error code (\d+)", message)
    return (cause[1] if cause else f"HTTP {status[1]}" if status else message.splitlines()[0][:200]).strip()


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
        raise UserError(
            f"MLflow tracking server {uri} does not answer ({_reason(e)}); start it "
            "(mlflow server --host 127.0.0.1 --port 5000) or pass logger.tracking_uri=<its address>"
        ) from e


class MLflowTracker(MLFlowLogger):
    """Lightning's MLFlowLogger that checks its tracking server before training starts, and lets
    training go on, checkpoints and all, when the server goes away later: one warning, then nothing
    more is sent (each send would wait out MLflow's retries again).

    An empty run name (a run without overrides) lets MLflow name the run: the server refuses ''.
    Tags without a value (`sweep` outside a sweep) are left out.
    """

    def __init__(self, run_name: str | None = None, tags: dict | None = None, **kwargs):
        require_extra("mlflow", "logger=mlflow", "mlflow")
        tags = {key: value for key, value in (tags or {}).items() if value is not None}
        super().__init__(run_name=run_name or None, tags=tags, **kwargs)
        check_tracking_server(self._tracking_uri)
        self.server_lost = False

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        self._while_server_answers(super().log_hyperparams, params)

    @rank_zero_only
    def log_metrics(self, metrics, step: int | None = None) -> None:
        self._while_server_answers(super().log_metrics, metrics, step)

    @rank_zero_only
    def log_text(self, text: str, artifact_file: str) -> None:
        self._while_server_answers(lambda: self.experiment.log_text(self.run_id, text, artifact_file))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self._while_server_answers(super().finalize, status)

    def _while_server_answers(self, send, *args) -> None:
        from mlflow.exceptions import MlflowException

        if self.server_lost:
            return
        try:
            send(*args)
        except MlflowException as e:
            self.server_lost = True
            rank_zero_warn(
                f"MLflow tracking server {self._tracking_uri} stopped answering ({_reason(e)}); "
                "training goes on without it, checkpoints as before"
            )


class WandbTracker(WandbLogger):
    """Lightning's WandbLogger that finishes its W&B run when training ends.

    W&B keeps one run per process: unfinished, the next job of a sweep would log into it
    (lightning-hydra-template #289). An empty name (a run without overrides) lets W&B name the run.
    Without a login, the run stops in one line when W&B starts, before the first training step.
    """

    def __init__(self, name: str | None = None, **kwargs):
        require_extra("wandb", "logger=wandb", "wandb")
        super().__init__(name=name or None, **kwargs)

    @property
    def experiment(self):
        from wandb.errors import UsageError

        try:
            return super().experiment
        except UsageError as e:
            raise UserError(
                f"logger=wandb: {str(e).rstrip('.')}; or log offline with WANDB_MODE=offline "
                "and `wandb sync` the run later"
            ) from e

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
    elif isinstance(logger, MLflowTracker):
        logger.log_text(text, f"{key}/step_{step:07d}.txt")
    elif isinstance(logger, WandbLogger):
        logger.log_text(key, columns=["step", "text"], data=[[step, text]], step=step)


def has_text_place(logger: Logger) -> bool:
    return isinstance(logger, (TensorBoardLogger, MLflowTracker, WandbLogger))
