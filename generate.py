"""Sample text from a trained checkpoint: `python generate.py ckpt=RUN_DIR prompt="ROMEO:"`.

Composes conf/generate.yaml; the loading and sampling live in micropgpt.checkpoint and
micropgpt.sampling.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from micropgpt.checkpoint import load_checkpoint, resolve_checkpoint
from micropgpt.errors import UserError, find_user_error
from micropgpt.files import atomic_write
from micropgpt.model import validate_sampling
from micropgpt.sampling import Speed, pick_device, read_prompt, sample_texts


@dataclass
class GenerateSchema:
    """The types of conf/generate.yaml's keys, so `max_new_tokens=abc` fails at composition."""

    ckpt: str | None = MISSING
    prompt: str = MISSING
    prompt_file: str | None = MISSING
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int | None = MISSING
    top_p: float | None = MISSING
    num_samples: int = MISSING
    seed: int | None = MISSING
    device: str = MISSING
    kv_cache: bool = MISSING
    cache_keep: int | None = MISSING
    stream: bool = MISSING
    out: str | None = MISSING


ConfigStore.instance().store(name="schema", node=GenerateSchema)


def generate(cfg: DictConfig) -> None:
    # Everything that can be checked is checked before loading, and all of it before any output.
    validate_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.ckpt is None:
        raise UserError("no checkpoint given: pass ckpt= a run directory (outputs/DATE/TIME) or a .ckpt file")
    if cfg.out is not None and Path(cfg.out).is_dir():
        raise UserError(f"out={cfg.out} is a directory; pass a file name to write the samples to")
    device = pick_device(cfg.device)
    prompt = read_prompt(cfg.prompt, cfg.prompt_file)
    file = resolve_checkpoint(cfg.ckpt)
    model, tokenizer = load_checkpoint(file, device)
    generator = None if cfg.seed is None else torch.Generator(device).manual_seed(cfg.seed)
    speed = Speed()
    pieces = sample_texts(
        model,
        tokenizer,
        prompt,
        cfg.num_samples,
        speed,
        generator,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        kv_cache=cfg.kv_cache,
        cache_keep=cfg.cache_keep,
    )
    print(
        f"loaded {file}: {model.num_parameters() / 1e6:.2f}M parameters, {len(tokenizer)} characters, "
        f"block_size {model.config.block_size}, on {device}",
        file=sys.stderr,
    )
    block_size = model.config.block_size
    if len(prompt) > block_size:
        # Learned positions stop at block_size: the model conditions on the prompt's end only.
        print(
            f"note: the prompt has {len(prompt)} characters, more than block_size {block_size}: "
            f"the model sees its last {block_size}",
            file=sys.stderr,
        )
    text = []
    for piece in pieces:
        text.append(piece)
        if cfg.stream:
            print(piece, end="", flush=True)
    if not cfg.stream:
        print("".join(text), end="", flush=True)
    print(speed, file=sys.stderr)
    if cfg.out is not None:
        try:
            atomic_write(Path(cfg.out), lambda f: f.write("".join(text).encode("utf-8")))
        except OSError as e:
            raise UserError(f"out={cfg.out} cannot be written: {e.strerror}") from None


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    try:
        generate(cfg)
    except BrokenPipeError:
        # The reader went away (`generate.py ... | head`): stop quietly, as other Unix tools do.
        # Pointing stdout at /dev/null keeps Python's flush at exit from failing a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
