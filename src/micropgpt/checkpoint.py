"""Load a trained checkpoint for sampling: `load_checkpoint(path, device) -> (GPT, CharTokenizer)`.

A checkpoint is the file Lightning writes during `python train.py`. Everything needed to rebuild
the GPT is inside it: the vocabulary and the model hyperparameters (GPTModule saves both as plain
Python values) and the weights. So sampling needs no dataset, no Trainer and no Hydra run dir, and
the file is read with `torch.load(..., weights_only=True)`, which builds tensors and plain
containers only and refuses any pickle that would import or call code.

    from micropgpt.checkpoint import load_checkpoint
    model, tokenizer = load_checkpoint("outputs/2026-01-01/12-00-00", "cpu")
    idx = torch.tensor([tokenizer.encode("ROMEO:")])
    print(tokenizer.decode(model.generate(idx, 200, temperature=0.8)[0].tolist()))
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from micropgpt.errors import UserError
from micropgpt.model import GPT, GPTConfig
from micropgpt.tokenizer import CharTokenizer

# Where train.py's ModelCheckpoint writes inside a run directory, in order of preference.
RUN_DIR_CHECKPOINTS = ("checkpoints/best.ckpt", "checkpoints/last.ckpt")
_GPT_PREFIX = "model."  # GPTModule holds the GPT as `self.model`
_COMPILED_PREFIX = "_orig_mod."  # torch.compile wraps a module and prefixes its keys


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a file; for a run directory, its best checkpoint, else its last."""
    path = Path(path)
    if path.is_dir():
        for name in RUN_DIR_CHECKPOINTS:
            if (path / name).is_file():
                return path / name
        raise UserError(
            f"run directory {path} has no {' or '.join(RUN_DIR_CHECKPOINTS)}; "
            "pass ckpt= a run directory whose training saved a checkpoint, or a .ckpt file"
        )
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass ckpt= a .ckpt file or a run directory")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The GPT (in eval mode, float32, on `device`) and tokenizer saved in a checkpoint.

    `path` is a .ckpt file or a run directory (see `resolve_checkpoint`). Checkpoints of
    torch.compile'd models and of bf16/16-mixed runs load too, on any device. A file that is not
    this project's checkpoint, or whose pickle would run code, raises UserError.
    """
    file = resolve_checkpoint(path)
    checkpoint = read_checkpoint(file)
    vocab, model_hparams = _hyperparameters(file, checkpoint)
    try:
        config = GPTConfig(vocab_size=len(vocab), **model_hparams)
    except TypeError as e:
        raise UserError(f"{file} has model hyperparameters this version cannot build: {e}") from None
    model = GPT(config)
    try:
        # Copying into the float32 model also casts bf16/fp16 weights, which CPUs handle poorly.
        model.load_state_dict(_gpt_weights(file, checkpoint))
    except RuntimeError as e:
        # The first line only says "Error(s) in loading state_dict"; the next one names a key.
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UserError(f"{file}: weights do not fit its own model hyperparameters ({detail})") from None
    return model.to(device).eval(), CharTokenizer(vocab)


def read_checkpoint(file: Path) -> dict:
    """The dict in a checkpoint file, read without running any code; UserError if it is not one."""
    # torch.save writes a zip archive; anything else (text, random bytes, a truncated download,
    # a bare pickle) is refused before any byte of it is unpickled.
    if not zipfile.is_zipfile(file):
        raise UserError(
            f"{file} is not a PyTorch checkpoint (not the zip archive torch.save writes); "
            "pass the .ckpt file that train.py saved"
        )
    try:
        # On the CPU first: the checkpoint also holds optimizer state the GPU need never see.
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"import {wanted.group(1)}" if wanted else "run code"
        raise UserError(
            f"{file} is untrusted: its pickle would {what}, which safe loading (weights_only=True) "
            "refuses; it is not loaded unsafely, so use a checkpoint written by train.py"
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError) as e:
        raise UserError(
            f"{file} is a damaged or foreign archive, not a readable PyTorch checkpoint "
            f"({type(e).__name__}); pass the .ckpt file that train.py saved"
        ) from None
    if not isinstance(checkpoint, dict):
        raise UserError(_not_ours(file, f"it holds a {type(checkpoint).__name__}, not a checkpoint dict"))
    return checkpoint


def _hyperparameters(file: Path, checkpoint: dict) -> tuple[list[str], dict]:
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not {"vocab", "model"} <= hparams.keys():
        raise UserError(_not_ours(file, "it has no hyper_parameters with the vocab and model"))
    vocab, model_hparams = hparams["vocab"], hparams["model"]
    if not isinstance(vocab, list) or not all(isinstance(c, str) for c in vocab):
        raise UserError(_not_ours(file, "its vocab is not a list of characters"))
    if not isinstance(model_hparams, dict):
        raise UserError(_not_ours(file, "its model hyperparameters are not a mapping"))
    return vocab, model_hparams


def _gpt_weights(file: Path, checkpoint: dict) -> dict[str, torch.Tensor]:
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise UserError(_not_ours(file, "it has no state_dict"))
    weights = {}
    for key, tensor in state_dict.items():
        key = key.replace(_COMPILED_PREFIX, "")
        if key.startswith(_GPT_PREFIX):
            weights[key.removeprefix(_GPT_PREFIX)] = tensor
    if not weights:
        raise UserError(_not_ours(file, f"its state_dict has no {_GPT_PREFIX}* weights"))
    return weights


def _not_ours(file: Path, reason: str) -> str:
    return f"{file} is not a micropgpt checkpoint: {reason}; pass a .ckpt file that train.py saved"
