"""Train a character-level GPT: `python train.py [overrides]`, `python train.py -m` for sweeps.

Composes conf/train.yaml and runs micropgpt.hydra_app's training job: every object built from its
`_target_`, fit, result.json written; returns the best validation loss (what sweepers minimise).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from micropgpt.hydra_app import require_plugin_extras, run_command, train_command


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train_command(cfg)


if __name__ == "__main__":
    require_plugin_extras(sys.argv[1:])
    run_command(main, "train")
