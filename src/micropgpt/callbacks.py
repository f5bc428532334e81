"""Lightning callbacks the project adds: text samples and hyperparameters in TensorBoard."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.tensorboard.summary import hparams as hparams_summary

from micropgpt.sampling import sample_batch
from micropgpt.tokenizer import CharTokenizer


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class TextSamples(L.Callback):
    """After each validation, sample `num_chars` characters from `prompt` into TensorBoard's Text tab.

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
        logger = _tensorboard(trainer)
        if trainer.sanity_checking or logger is None or not self.enabled:
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
        # TensorBoard renders Markdown; indenting every line makes it a verbatim code block.
        logger.experiment.add_text(
            "samples", "\n".join("    " + line for line in text.split("\n")), trainer.global_step
        )


class TensorBoardHParams(L.Callback):
    """Writes the run's hyperparameters to TensorBoard's HParams tab at the start of training.

    `params` are the values to compare runs by (the config chooses them); the parameter count and
    vocabulary size are added here. The tab shows each run against the latest value of every
    scalar named in `metrics`, which the LightningModule logs at each validation.
    """

    def __init__(self, params: dict, metrics: tuple[str, ...] = ("val/loss_best", "val/bpc_best")):
        self.params, self.metrics = dict(params), tuple(metrics)

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _tensorboard(trainer)
        if logger is None:
            return
        params = {
            **{k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in self.params.items()},
            "num_params": pl_module.model.num_parameters(),
            "vocab_size": pl_module.model.config.vocab_size,
        }
        # What Lightning's TensorBoardLogger.log_hyperparams writes, minus its placeholder metric
        # values at step 0, which would draw a false first point on the metric charts.
        writer = logger.experiment._get_file_writer()
        for summary in hparams_summary(params, {name: 0.0 for name in self.metrics}):
            writer.add_summary(summary)
