"""Generation speed with and without the KV cache, and of batched samples, on the seed-size model.

    python benchmarks/generate.py [--repeats 3] [--device cpu] [--quick]

Seed-size GPT (n_embd 384, n_head 4, n_layer 4, block_size 128, 65 characters) with random
weights: speed does not depend on what the weights learned. Batch 1, a 1-character prompt, 500
and 2,000 new characters; then 8 samples of 1,000 characters as one batch (generate.py's
num_samples=8, one random stream per row) against one, first the `generate` call alone, then the
whole `python generate.py ... num_samples=N` command on a checkpoint of that model (start-up and
loading included, as a user waits for them). Runs alternate between the paths compared, so that a
change in machine load hits both alike; each line reports the median of the repeats.
--quick only checks that the script runs (1 repeat, 20 characters, short warm-up): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from micropgpt.decoding import row_generators
from micropgpt.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent
# Tiny Shakespeare's 65 characters, for the checkpoint that generate.py loads.
VOCAB = sorted("\n !$&',-.3:;?" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz")
SEED_MODEL = GPTConfig(vocab_size=len(VOCAB), block_size=128, n_layer=4, n_head=4, n_embd=384, dropout=0.0)
NEW_CHARACTERS = (500, 2000)
BATCH, BATCH_CHARACTERS = 8, 1000


def tokens_per_second(model: GPT, new: int, kv_cache: bool, device: torch.device) -> float:
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(0)
    start = time.perf_counter()
    ids = model.generate(prompt, new, kv_cache=kv_cache, generator=generator)
    ids.cpu()  # waits for the GPU, if any
    return new / (time.perf_counter() - start)


def seconds_for_samples(model: GPT, num_samples: int, new: int, device: torch.device) -> float:
    """Time of `num_samples` samples drawn as generate.py draws them: one batch, a stream per row."""
    prompt = torch.zeros((num_samples, 1), dtype=torch.long, device=device)
    start = time.perf_counter()
    model.generate(prompt, new, generator=row_generators(0, num_samples, device)).cpu()
    return time.perf_counter() - start


def write_checkpoint(model: GPT, file: Path) -> None:
    """`model` as a checkpoint that generate.py loads: the keys GPTModule's checkpoints hold."""
    architecture = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "vocab_size"}
    state_dict = {f"model.{key}": tensor for key, tensor in model.state_dict().items()}
    torch.save({"hyper_parameters": {"vocab": VOCAB, "model": architecture}, "state_dict": state_dict}, file)


def seconds_for_command(checkpoint: Path, num_samples: int, new: int, device: torch.device) -> float:
    """Wall time of the whole `python generate.py` command, start-up and checkpoint loading included."""
    command = [sys.executable, "generate.py", f"ckpt={checkpoint}", f"num_samples={num_samples}"]
    command += [f"max_new_tokens={new}", f"device={device}"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[1:])} failed (exit {result.returncode}):\n{result.stderr}")
    return seconds


def report_batch(what: str, seconds: dict[int, list[float]], characters: int, repeats: int) -> None:
    one, batched = (statistics.median(seconds[n]) for n in (1, BATCH))
    print(
        f"{BATCH} batched samples cost {batched / one:.2f}x one sample, {what} "
        f"({characters} characters: {batched:.2f} s vs {one:.2f} s, median of {repeats})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 20 characters: a check that it runs")
    args = parser.parse_args()
    repeats, lengths, batch_characters = (
        (1, (20,), 20) if args.quick else (args.repeats, NEW_CHARACTERS, BATCH_CHARACTERS)
    )
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = GPT(SEED_MODEL).to(device).eval()
    print(
        f"torch {torch.__version__} on {device} ({platform.machine()}, {torch.get_num_threads()} threads); "
        f"model {model.num_parameters() / 1e6:.2f}M parameters, block_size {SEED_MODEL.block_size}"
    )
    for kv_cache in (True, False):  # warm-up: first calls pay one-off allocation and dispatch costs
        tokens_per_second(model, lengths[0] if args.quick else 2 * SEED_MODEL.block_size, kv_cache, device)

    for new in lengths:
        rates = {True: [], False: []}
        for _ in range(repeats):
            for kv_cache in (True, False):
                rates[kv_cache].append(tokens_per_second(model, new, kv_cache, device))
        cached, uncached = (statistics.median(rates[kv]) for kv in (True, False))
        print(
            f"{new:>5} new characters: KV cache {cached:8.1f} tokens/s, no cache {uncached:7.1f} tokens/s, "
            f"{cached / uncached:5.1f}x   (median of {repeats})"
        )

    seconds = {1: [], BATCH: []}
    for _ in range(repeats):
        for num_samples in seconds:
            seconds[num_samples].append(seconds_for_samples(model, num_samples, batch_characters, device))
    report_batch("model.generate alone", seconds, batch_characters, repeats)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "seed_size.ckpt"
        write_checkpoint(model, checkpoint)
        seconds = {1: [], BATCH: []}
        for _ in range(repeats):
            for num_samples in seconds:
                command_seconds = seconds_for_command(checkpoint, num_samples, batch_characters, device)
                seconds[num_samples].append(command_seconds)
    report_batch("whole generate.py command", seconds, batch_characters, repeats)


if __name__ == "__main__":
    main()
