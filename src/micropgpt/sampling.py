"""From a checkpoint and a prompt to text samples: device choice, prompt, loading, streaming, timing.

generate.py and micropgpt.sample are built on `samples_from_checkpoint`, and they and TextSamples
sample through `sample_columns`; `GPT.generate` (over micropgpt.decoding) is the tensor-level API.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from micropgpt.checkpoint import load_checkpoint, resolve_checkpoint
from micropgpt.decoding import generate_stream, row_generators, validate_sampling
from micropgpt.errors import UserError
from micropgpt.model import GPT
from micropgpt.tokenizer import CharTokenizer

SEPARATOR = "\n---------------\n"


def pick_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; other names are torch device strings."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible here; use device=cpu or device=auto")
    return device


def read_prompt(prompt: str, prompt_file: str | None) -> str:
    """The prompt text: the contents of `prompt_file` when given, else `prompt`."""
    if prompt_file is not None:
        try:
            prompt = Path(prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"prompt_file={prompt_file} is not UTF-8 text; convert it to UTF-8") from None
        except OSError as e:
            raise UserError(f"prompt_file={prompt_file} cannot be read: {e.strerror}") from None
    if not prompt:
        raise UserError("the prompt is empty: give at least one character, e.g. prompt='ROMEO:'")
    return prompt


@dataclass
class Speed:
    tokens: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return f"{self.tokens} tokens in {self.seconds:.2f} s, {rate:.1f} tokens/s"


def sample_columns(
    model: GPT, tokenizer: CharTokenizer, prompt: str, num_samples: int, seed: int | None, **sampling
) -> Iterator[torch.Tensor]:
    """The one sampling path of generate.py, micropgpt.sample and TextSamples: `prompt` in each of
    `num_samples` rows, sampled as one batch with one KV cache, row r from its own random stream
    (decoding.row_generators), so the samples are reproducible for a given seed and count and N
    rows cost little more than one. Yields each new (num_samples, 1) column of ids; `sampling`
    are generate_stream's keyword arguments, checked here, before the first column.
    """
    if num_samples < 1:
        raise UserError(f"num_samples={num_samples} must be at least 1")
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)] * num_samples, dtype=torch.long, device=device)
    return generate_stream(model, idx, generator=row_generators(seed, num_samples, device), **sampling)


def sample_batch(
    model: GPT, tokenizer: CharTokenizer, prompt: str, num_samples: int, seed: int | None, **sampling
) -> list[str]:
    """`sample_columns` to text: each sample is the prompt and its new characters."""
    columns = sample_columns(model, tokenizer, prompt, num_samples, seed, **sampling)
    return _texts(columns, tokenizer, prompt, num_samples)


def _texts(
    columns: Iterator[torch.Tensor], tokenizer: CharTokenizer, prompt: str, num_samples: int
) -> list[str]:
    columns = list(columns)
    rows = torch.cat(columns, dim=1).tolist() if columns else [[]] * num_samples
    return [prompt + tokenizer.decode(row) for row in rows]


def sample_texts(
    model: GPT,
    tokenizer: CharTokenizer,
    prompt: str,
    num_samples: int,
    speed: Speed,
    seed: int | None = None,
    **sampling,
) -> Iterator[str]:
    """Pieces of text as they are produced, each sample the prompt, its new characters, then
    SEPARATOR. One sample comes character by character; several are one batch (`sample_columns`),
    which finishes all rows together, so they come whole, one after another, when it is done.
    `speed` accumulates the new characters and the time spent producing them.

    Everything is checked before the first piece, so a bad value never leaves partial output.
    """
    columns = sample_columns(model, tokenizer, prompt, num_samples, seed, **sampling)
    if num_samples == 1:
        return _characters(columns, tokenizer, prompt, speed)
    return _whole_samples(columns, tokenizer, prompt, num_samples, speed)


def _characters(
    columns: Iterator[torch.Tensor], tokenizer: CharTokenizer, prompt: str, speed: Speed
) -> Iterator[str]:
    yield prompt
    start = time.perf_counter()
    for next_id in columns:
        character = tokenizer.vocab[next_id.item()]
        speed.seconds += time.perf_counter() - start
        speed.tokens += 1
        yield character
        start = time.perf_counter()
    speed.seconds += time.perf_counter() - start
    yield SEPARATOR


def _whole_samples(
    columns: Iterator[torch.Tensor], tokenizer: CharTokenizer, prompt: str, num_samples: int, speed: Speed
) -> Iterator[str]:
    start = time.perf_counter()
    texts = _texts(columns, tokenizer, prompt, num_samples)
    speed.seconds += time.perf_counter() - start
    speed.tokens += sum(len(text) - len(prompt) for text in texts)
    for text in texts:
        yield text
        yield SEPARATOR


@dataclass
class Samples:
    """Text samples from a loaded checkpoint, ready to be produced piece by piece."""

    file: Path
    model: GPT
    tokenizer: CharTokenizer
    device: torch.device
    prompt: str
    pieces: Iterator[str]
    speed: Speed

    def notes(self) -> list[str]:
        """What was loaded, and whether the model sees only the end of the prompt."""
        model, block_size = self.model, self.model.config.block_size
        notes = [
            f"loaded {self.file}: {model.num_parameters() / 1e6:.2f}M parameters, "
            f"{len(self.tokenizer)} characters, block_size {block_size}, on {self.device}"
        ]
        if len(self.prompt) > block_size:
            # Learned positions stop at block_size: the model conditions on the prompt's end only.
            notes.append(
                f"note: the prompt has {len(self.prompt)} characters, more than block_size {block_size}: "
                f"the model sees its last {block_size}"
            )
        return notes


def samples_from_checkpoint(
    ckpt: str | Path | None,
    prompt: str,
    prompt_file: str | None,
    num_samples: int,
    seed: int | None,
    device: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    kv_cache: bool,
    cache_keep: int | None,
) -> Samples:
    """conf/generate.yaml's options to loaded, checked samples (`sample_texts`), none produced yet.

    The options are checked before the checkpoint is loaded, and everything before the first piece.
    """
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    if ckpt is None:
        raise UserError("no checkpoint given: pass ckpt= a run directory (outputs/DATE/TIME) or a .ckpt file")
    device = pick_device(device)
    prompt = read_prompt(prompt, prompt_file)
    file = resolve_checkpoint(ckpt)
    model, tokenizer = load_checkpoint(file, device)
    speed = Speed()
    pieces = sample_texts(
        model,
        tokenizer,
        prompt,
        num_samples,
        speed,
        seed,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        kv_cache=kv_cache,
        cache_keep=cache_keep,
    )
    return Samples(file, model, tokenizer, device, prompt, pieces, speed)
