"""Train a character-level GPT: `python train.py [overrides]`, `python train.py -m` for sweeps.

Composes conf/train.yaml, builds every object from its `_target_`, fits, and returns the best
validation loss (what Hydra sweepers minimise).
"""

from __future__ import annotations

import sys
import typing
from dataclasses import fields, make_dataclass

import hydra
import lightning as L
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from micropgpt.errors import find_user_error
from micropgpt.model import GPTConfig

# Typed schema for the model group, so `model.n_embd=abc` fails at composition. Derived from
# GPTConfig so the two cannot drift; vocab_size comes from the corpus, not the config.
_hints = typing.get_type_hints(GPTConfig)
ModelSchema = make_dataclass(
    "ModelSchema",
    [(f.name, _hints[f.name], f.default) for f in fields(GPTConfig) if f.name != "vocab_size"],
)
ConfigStore.instance().store(group="model", name="schema", node=ModelSchema)


def train(cfg: DictConfig) -> float | None:
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
        print(f"\nbest val/loss: {best.item():.4f}" if best is not None else "\nno validation ran")
        print(f"checkpoints:   {checkpoint.dirpath}")
        print(f"sample with:   python generate.py ckpt={run_dir} prompt='ROMEO:' max_new_tokens=500")
    return None if best is None else best.item()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
