"""Loss and bits per character of a checkpoint: `python eval.py ckpt=RUN_DIR [data.path=FILE]`.

Composes conf/eval.yaml; by default the run's own validation split (its best val/loss again, from
best.ckpt), with data.path= all of any UTF-8 file. The scoring lives in micropgpt.evaluation.
"""

from __future__ import annotations

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from micropgpt.errors import exit_on_user_error
from micropgpt.hydra_app import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        result = evaluate(cfg)
    if rank_zero_only.rank == 0:
        print(
            f"loss {result['loss']:.6f}  bpc {result['bpc']:.6f}  over {result['characters']:,} "
            f"characters in {result['windows']:,} windows  ({result['checkpoint']})"
        )


if __name__ == "__main__":
    main()
