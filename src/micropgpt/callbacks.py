"""Lightning callbacks the project adds: text samples and hyperparameters for every logger."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.tensorboard.summary import hparams as hparams_summary

from micropgpt.sampling import sample_batch
from micropgpt.tokenizer import CharTokenizer
from micropgpt.trackers import has_text_place, log_text_sample


class TextSamples(L.Callback):
    """After each validation, sample `num_chars` characters from `prompt` into each tracker's text.

    TensorBoard: the Text tab; MLflow: an artifact per validation; W&B: a table; CSV: nowhere.

    A fixed seed makes samples at different steps comparable: only the model changed.
    """

    def __init__(self, num_chars: int = 300, prompt: str = "\n", temperature: float = 1.0, seed: int = 0):
        self.num_chars, self.prompt, self.temperature, self.seed = num_chars, prompt, temperature, seed
        self.enabled = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            # Each process holds only shards of the weights, and FSDP's mixed-precision forward
            # cannot run the cached one-position steps of generate().
            self.enabled = False
            rank_zero_warn("text samples are off under FSDP; sample the checkpoints with generate.py")

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if has_text_place(logger)]
        if trainer.sanity_checking or not loggers or not self.enabled:
            return
        tokenizer = CharTokenizer(pl_module.hparams.vocab)
        was_training = pl_module.training
        pl_module.eval()
        [text] = sample_batch(
            pl_module.model,
            tokenizer,
            self.prompt,
            1,
            self.seed,
            max_new_tokens=self.num_chars,
            temperature=self.temperature,
        )
        pl_module.train(was_training)
        for logger in loggers:
            log_text_sample(logger, "samples", text, trainer.global_step)


class Hyperparameters(L.Callback):
    """Gives the run's hyperparameters to every logger at the start of training.

    `params` are the values to compare runs by (the config chooses them; None ones are left out);
    the parameter count and vocabulary size are added here. TensorBoard's HParams tab shows each
    run against the latest value of every scalar named in `metrics`, which the LightningModule
    logs at each validation.
    """

    def __init__(self, params: dict, metrics: tuple[str, ...] = ("val/loss_best", "val/bpc_best")):
        self.params, self.metrics = dict(params), tuple(metrics)

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        given = {k: v for k, v in self.params.items() if v is not None}  # None: not a setting of this run
        params = {
            **{k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in given.items()},
            "num_params": pl_module.model.num_parameters(),
            "vocab_size": pl_module.model.config.vocab_size,
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                self._tensorboard_hparams(logger, params)
            else:
                logger.log_hyperparams(params)

    def _tensorboard_hparams(self, logger: TensorBoardLogger, params: dict) -> None:
        # What Lightning's TensorBoardLogger.log_hyperparams writes, minus its placeholder metric
        # values at step 0, which would draw a false first point on the metric charts. No public
        # call adds a summary to this run's event file (SummaryWriter.add_hparams writes a separate
        # run in a subfolder, with its own metric values), hence the writer's _get_file_writer.
        writer = logger.experiment._get_file_writer()
        for summary in hparams_summary(params, {name: 0.0 for name in self.metrics}):
            writer.add_summary(summary)
