"""Sample text from a trained checkpoint: `python generate.py ckpt=RUN_DIR prompt="ROMEO:"`.

Composes conf/generate.yaml; the loading and sampling live in micropgpt.sampling.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from micropgpt.errors import UserError, exit_on_user_error
from micropgpt.files import atomic_write
from micropgpt.hydra_app import run_command
from micropgpt.sampling import samples_from_checkpoint


def generate(cfg: DictConfig) -> None:
    if cfg.out is not None and Path(cfg.out).is_dir():
        raise UserError(f"out={cfg.out} is a directory; pass a file name to write the samples to")
    options = {key: value for key, value in cfg.items() if key not in ("stream", "out")}
    samples = samples_from_checkpoint(**options)
    for note in samples.notes():
        print(note, file=sys.stderr)
    text = []
    for piece in samples.pieces:
        text.append(piece)
        if cfg.stream:
            print(piece, end="", flush=True)
    if not cfg.stream:
        print("".join(text), end="", flush=True)
    print(samples.speed, file=sys.stderr)
    if cfg.out is not None:
        try:
            atomic_write(Path(cfg.out), lambda f: f.write("".join(text).encode("utf-8")))
        except OSError as e:
            raise UserError(f"out={cfg.out} cannot be written: {e.strerror}") from None


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        with exit_on_user_error():
            generate(cfg)
    except BrokenPipeError:
        # The reader went away (`generate.py ... | head`): stop quietly, as other Unix tools do.
        # Pointing stdout at /dev/null keeps Python's flush at exit from failing a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


if __name__ == "__main__":
    run_command(main, "generate")
