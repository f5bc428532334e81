"""For tests of validation on several processes: `Trainer.validate` of a checkpoint, one report per process.

    python -m torch.distributed.run --standalone --nproc-per-node=N tests/validate_report.py \
        CKPT CORPUS DATA_DIR VAL_FRACTION BATCH_SIZE OUT_DIR

(or plain `python tests/validate_report.py ...` for one process without DDP). Each process writes
rank<N>.json to OUT_DIR: the val/loss that Trainer.validate returned and the validation windows
its sampler gave that process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import lightning as L

from micropgpt.checkpoint import load_checkpoint
from micropgpt.data import CharDataModule
from micropgpt.module import GPTModule


def main(ckpt: str, corpus: str, data_dir: str, val_fraction: str, batch_size: str, out_dir: str) -> None:
    model, tokenizer = load_checkpoint(ckpt)
    architecture = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "vocab_size"}
    module = GPTModule(vocab=tokenizer.vocab, model=architecture, optimizer=None)
    module.model.load_state_dict(model.state_dict())
    datamodule = CharDataModule(
        path=corpus,
        data_dir=data_dir,
        block_size=model.config.block_size,
        batch_size=int(batch_size),
        val_fraction=float(val_fraction),
    )
    assert datamodule.vocab == tokenizer.vocab, "the corpus must be the checkpoint's"
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=processes,
        strategy="ddp" if processes > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    sampler = trainer.val_dataloaders.sampler
    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "val_loss": metrics["val/loss"],
        "sampler": type(sampler).__name__,
        "windows": list(sampler),
        "val_windows": len(datamodule.val_set),
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
