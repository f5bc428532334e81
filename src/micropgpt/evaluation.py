"""Loss and bits per character of a checkpoint on a text: what eval.py and micropgpt.evaluate report.

The text is a run's own validation split (the characters CharDataModule validated that run on,
from the run's data settings) or the whole of any UTF-8 file, encoded with the checkpoint's
vocabulary. It is cut into windows of block_size characters, each predicting the next: by
default the non-overlapping windows the run validated on, so the run's best val/loss comes
back from its best.ckpt; with `stride` S, windows start every S characters and each scores only
the targets the previous one did not, so every scored character has at least block_size - S
characters of context. A Lightning Trainer runs it (`Trainer.validate`), on as many devices as
it is given.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchmetrics import SumMetric

from micropgpt.checkpoint import load_checkpoint
from micropgpt.data import CharDataModule, corpus_files
from micropgpt.errors import UserError
from micropgpt.model import GPT
from micropgpt.tokenizer import CharTokenizer


class ScoredWindows(Dataset):
    """(inputs, targets, first) windows of `block_size` + 1 ids starting every `stride` ids of
    `ids`; the loss counts targets from position `first` on (all of the first window's)."""

    def __init__(self, ids: np.ndarray, block_size: int, stride: int):
        self.ids, self.block_size, self.stride = ids, block_size, stride

    def __len__(self) -> int:
        return max(0, (len(self.ids) - self.block_size - 1) // self.stride + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        start = i * self.stride
        chunk = torch.from_numpy(self.ids[start : start + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:], 0 if i == 0 else self.block_size - self.stride


class EvalData(CharDataModule):
    """CharDataModule whose validation set is the text to score: its split of the run's corpus
    (`whole=False`), or all of the corpus (`whole=True`), in ScoredWindows of `stride`."""

    def __init__(self, tokenizer: CharTokenizer, whole: bool, stride: int, **data):
        super().__init__(**data)
        self.checkpoint_tokenizer, self.whole, self.stride = tokenizer, whole, stride

    def prepare_data(self) -> None:
        if not self.whole:
            super().prepare_data()
            if self.tokenizer.vocab != self.checkpoint_tokenizer.vocab:
                raise UserError(
                    f"{self.path} is not the corpus the checkpoint was trained on (its characters "
                    "differ); pass data.path= a text file to evaluate on all of it"
                )

    def setup(self, stage: str | None = None) -> None:
        if isinstance(getattr(self, "val_set", None), ScoredWindows):
            return  # set up already, by prepare_evaluation
        if not self.whole:
            super().setup(stage)
            split = self.val_set
            ids = np.memmap(split.ids_path, dtype=split.dtype, mode="r")[split.start : split.stop]
        else:
            ids = encode_with(self.checkpoint_tokenizer, self.path)
        if len(ids) < self.block_size + 1:
            raise UserError(
                f"{self.path} has {len(ids)} characters to score, fewer than block_size + 1 = "
                f"{self.block_size + 1}; evaluate on a longer text"
            )
        self.val_set = ScoredWindows(ids, self.block_size, self.stride)


def encode_with(tokenizer: CharTokenizer, path: Path) -> np.ndarray:
    """The ids of the UTF-8 text at `path` in `tokenizer`'s vocabulary; UserError naming the
    characters it does not have."""
    files = corpus_files(path)
    if len(files) != 1:
        raise UserError(f"data.path={path} is a directory; pass one UTF-8 text file to evaluate on")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte offset {e.start}); convert it to UTF-8") from None
    unknown = sorted(set(text) - set(tokenizer.vocab))
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
        raise UserError(
            f"{path} holds characters the checkpoint's vocabulary lacks: {shown}; evaluate on text "
            f"written in its {len(tokenizer)} characters"
        )
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


class Scorer(L.LightningModule):
    """Sums the cross entropy of a GPT's predictions over scored targets, over all processes."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        self.loss_sum, self.characters, self.windows = SumMetric(), SumMetric(), SumMetric()
        for metric in (self.loss_sum, self.characters, self.windows):
            metric.set_dtype(torch.float64)
        self.result: dict | None = None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int):
        inputs, targets, first = batch
        logits, _ = self.model(inputs)
        losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        positions = torch.arange(targets.size(1), device=targets.device)
        scored = positions[None, :] >= first[:, None]
        self.loss_sum.update(losses.view_as(targets)[scored].double().sum())
        self.characters.update(scored.sum().double())
        self.windows.update(torch.tensor(float(len(inputs)), dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        # compute() sums over all processes: every rank gets the whole text's result.
        loss_sum, characters = self.loss_sum.compute().item(), self.characters.compute().item()
        loss = loss_sum / characters
        self.result = {
            "loss": loss,
            "bpc": loss / math.log(2),
            "characters": int(characters),
            "windows": int(self.windows.compute().item()),
        }


def prepare_evaluation(
    file: Path, data: dict, whole: bool, stride: int | None = None, batch_size: int | None = None
) -> tuple[Scorer, EvalData]:
    """The scorer and data for checkpoint `file` on CharDataModule's validation split of the corpus
    `data` describes (its arguments, as the run had them), or with `whole` on all of data["path"].
    Everything is checked and loaded before a Trainer exists, so that a mistake is the one line
    printed."""
    model, tokenizer = load_checkpoint(file, "cpu")
    block_size = model.config.block_size
    if stride is not None and not 1 <= stride <= block_size:
        raise UserError(f"stride={stride} must be between 1 and block_size={block_size}")
    if batch_size is not None:
        data = {**data, "batch_size": batch_size}
    datamodule = EvalData(tokenizer, whole, stride or block_size, **{**data, "block_size": block_size})
    datamodule.prepare_data()
    datamodule.setup("validate")
    return Scorer(model), datamodule


def score(trainer: L.Trainer, scorer: Scorer, datamodule: EvalData, file: Path) -> dict:
    """{"loss", "bpc", "characters", "windows", "checkpoint"}, on every process."""
    trainer.validate(scorer, datamodule=datamodule, verbose=False)
    return {**scorer.result, "checkpoint": str(file)}
