"""Recipe search for a CPU time budget: how low the val loss gets in the steps each recipe affords.

    python benchmarks/recipe_search.py time  [--budget 110] [--grid FILE] > timed.jsonl      # on the CPU
    python benchmarks/recipe_search.py train timed.jsonl [--device cuda] [--workers 15] > results.jsonl

In a budget of seconds, a recipe gets as many optimizer steps as its step time allows, and what
it learns in those steps does not depend on the hardware. So `time` measures each candidate's
training step on this machine (plain loop, the candidate's optimizer included) and writes how many
steps fit in `--budget` seconds; `train` then trains every candidate for exactly that many steps,
anywhere (a GPU runs many at once, one process per worker), and prints its val loss over the last
10% of the corpus (consecutive block_size windows, as `train.py` validates). Each line is JSON;
`train` prints the best ten at the end. Candidates are the default grid below or `--grid` lines
such as {"n_layer": 4, "n_head": 3, "n_embd": 96, "block_size": 128, "batch_size": 16,
"position": "rope", "activation": "relu2", "optimizer": "muon", "lr": 0.004}.
Optional keys (OPTIONS below) set the precision ("bf16": autocast, as Lightning's bf16-mixed), the
model options, Muon's momentum and AdamW lr ratio, warmup, the final lr ratio and the seed (of the
weights and the order of training windows). A batch-size schedule, "batch_schedule": [[0, 8],
[0.3, 16]] (batch 8 from the start, 16 from 30% of the budget), gives each stage the steps its own
batch size fits in its share of the budget, and decays the lr over the budget's time, as
scheduler.decay_by=time does. Every run: dropout 0, weight decay 0.1, betas (0.9, 0.99), clipping
1.0, and unless set, 100 warmup steps, cosine to 5% of lr; seed 1337. `train --device cpu
--workers 2` splits this CPU's cores between two runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from micropgpt.lr_schedule import WarmupCosine
from micropgpt.model import GPT, GPTConfig
from micropgpt.module import parameter_groups
from micropgpt.optim import MuonWithAdamW
from micropgpt.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "position", "activation")
MODEL_OPTIONS = ("qk_norm", "zero_init_proj", "logit_softcap", "value_embeddings", "smear", "unet_skips")
# Optional candidate keys, with the value a candidate that leaves them out gets.
OPTIONS = {"qk_norm": False, "zero_init_proj": False, "logit_softcap": 0.0, "value_embeddings": False,
           "smear": False, "unet_skips": False,
           "precision": "32", "seed": 1337,
           "warmup_steps": 100, "min_lr_ratio": 0.05, "momentum": 0.95, "adamw_lr_ratio": 1.0}  # fmt: skip


def default_grid() -> list[dict]:
    """The grid behind experiment=cpu_2min (README, Performance)."""
    models = [(4, 4, 128), (6, 4, 128), (4, 6, 192), (4, 3, 96)]
    windows = [(64, 32), (128, 16), (64, 16), (128, 32)]  # (block_size, batch_size)
    architectures = [("learned", "gelu"), ("rope", "relu2")]
    optimizers = [("adamw", 2e-3), ("adamw", 4e-3), ("adamw", 8e-3), ("muon", 4e-3), ("muon", 8e-3)]
    candidates = []
    for choice in itertools.product(optimizers, models, windows, architectures):
        (optimizer, lr), (n_layer, n_head, n_embd), (block_size, batch_size), (position, activation) = choice
        architecture = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
        options = dict(position=position, activation=activation, optimizer=optimizer, lr=lr)
        candidates.append({**architecture, "batch_size": batch_size, **options})
    return candidates


def build(candidate: dict, vocab_size: int, steps: int, device: str):
    candidate = {**OPTIONS, **candidate}
    torch.manual_seed(candidate["seed"])
    architecture = {key: candidate[key] for key in (*ARCHITECTURE, *MODEL_OPTIONS)}
    model = GPT(GPTConfig(vocab_size=vocab_size, dropout=0.0, **architecture)).to(device)
    settings = {"lr": candidate["lr"], "weight_decay": 0.1, "betas": (0.9, 0.99)}
    if candidate["optimizer"] == "muon":
        muon_settings = {key: candidate[key] for key in ("momentum", "adamw_lr_ratio")}
        optimizer = MuonWithAdamW(parameter_groups(model), **muon_settings, **settings)
    else:
        optimizer = torch.optim.AdamW(parameter_groups(model), **settings)
    warmup, min_lr_ratio = candidate["warmup_steps"], candidate["min_lr_ratio"]
    if "batch_schedule" in candidate:  # steps of different costs: decay over the time budget
        multiplier = WarmupCosine(warmup, sys.maxsize, min_lr_ratio, decay_by="time")
    else:
        multiplier = WarmupCosine(warmup, steps, min_lr_ratio)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return model, optimizer, schedule


def autocast(candidate: dict, device_type: str) -> torch.autocast:
    """Lightning's bf16-mixed for a "bf16" candidate, training and validation alike; else float32."""
    bf16 = candidate.get("precision", OPTIONS["precision"]) == "bf16"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)


def train_step(model, optimizer, schedule, ids: torch.Tensor, candidate: dict, generator) -> torch.Tensor:
    block, batch = candidate["block_size"], candidate["batch_size"]
    starts = torch.randint(len(ids) - block - 1, (batch,), device=ids.device, generator=generator)
    windows = ids[starts[:, None] + torch.arange(block + 1, device=ids.device)]
    with autocast(candidate, ids.device.type):
        _, loss = model(windows[:, :-1], windows[:, 1:])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    return loss


def corpus_ids(corpus: Path, device: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    text = corpus.read_text(encoding="utf-8")
    tokenizer = CharTokenizer.from_text(text)
    ids = torch.tensor(tokenizer.encode(text), device=device)
    split = int(len(ids) * 0.9)  # nanoGPT's split, train.py's data.val_fraction=0.1
    return ids[:split], ids[split:], len(tokenizer)


def step_seconds(candidate: dict, train_ids: torch.Tensor, vocab_size: int, timed_steps: int) -> float:
    model, optimizer, schedule = build(candidate, vocab_size, 1000, "cpu")
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # warm-up
        train_step(model, optimizer, schedule, train_ids, candidate, generator)
    start = time.perf_counter()
    for _ in range(timed_steps):
        train_step(model, optimizer, schedule, train_ids, candidate, generator)
    return (time.perf_counter() - start) / timed_steps


def time_candidates(args: argparse.Namespace) -> None:
    train_ids, _, vocab_size = corpus_ids(args.corpus, "cpu")
    grid = [json.loads(line) for line in args.grid.open()] if args.grid else default_grid()
    for candidate in grid:
        if "batch_schedule" in candidate:
            # Each stage gets the steps its batch size fits in its share of the budget.
            shares = [share for share, _ in candidate["batch_schedule"]] + [1.0]
            if shares[0] != 0 or any(a >= b for a, b in itertools.pairwise(shares)):
                sys.exit(
                    f"error: batch_schedule {candidate['batch_schedule']}: the stages' shares of the "
                    "budget must start at 0 and rise below 1, e.g. [[0, 8], [0.3, 16]]"
                )
            stage_steps, ms_per_step = [], []
            for (share, batch_size), end in zip(candidate["batch_schedule"], shares[1:], strict=True):
                stage = {**candidate, "batch_size": batch_size}
                seconds = step_seconds(stage, train_ids, vocab_size, args.timed_steps)
                stage_steps.append(max(1, int((end - share) * args.budget / seconds)))
                ms_per_step.append(round(seconds * 1e3, 1))
            timing = {"ms_per_step": ms_per_step, "stage_steps": stage_steps, "steps": sum(stage_steps)}
        else:
            seconds = step_seconds(candidate, train_ids, vocab_size, args.timed_steps)
            steps = max(1, int(args.budget / seconds))  # a step that overruns the budget still gets one
            timing = {"ms_per_step": round(seconds * 1e3, 1), "steps": steps}
        print(json.dumps({**candidate, **timing}), flush=True)


def validation_loss(model: GPT, val_ids: torch.Tensor, candidate: dict) -> float:
    block = candidate["block_size"]
    windows = val_ids[: (len(val_ids) - 1) // block * block + 1]
    inputs = windows[:-1].view(-1, block)
    targets = windows[1:].view(-1, block)
    total = 0.0
    model.eval()
    with torch.no_grad(), autocast(candidate, val_ids.device.type):
        for i in range(0, len(inputs), 256):
            logits, _ = model(inputs[i : i + 256])
            total += F.cross_entropy(
                logits.float().flatten(0, 1), targets[i : i + 256].flatten(), reduction="sum"
            ).item()
    return total / targets.numel()


def train_candidate(job: tuple[dict, str, str, int]) -> dict:
    candidate, corpus, device, threads = job
    if threads:
        torch.set_num_threads(threads)
    train_ids, val_ids, vocab_size = corpus_ids(Path(corpus), device)
    model, optimizer, schedule = build(candidate, vocab_size, candidate["steps"], device)
    generator = torch.Generator(device).manual_seed(candidate.get("seed", OPTIONS["seed"]))
    start = time.perf_counter()
    if "batch_schedule" in candidate:
        batch_sizes = [batch_size for _, batch_size in candidate["batch_schedule"]]
        stages = list(zip(candidate["stage_steps"], batch_sizes, candidate["ms_per_step"], strict=True))
    else:  # a hand-written line may give steps alone: every step costs the same
        stages = [(candidate["steps"], candidate["batch_size"], 1.0)]
    budget, spent = sum(steps * ms for steps, _, ms in stages), 0.0
    for steps, batch_size, ms in stages:
        stage = {**candidate, "batch_size": batch_size}
        for _ in range(steps):
            schedule.lr_lambdas[0].spend_time(spent / budget)  # the CPU's time, as decay_by=time
            loss = train_step(model, optimizer, schedule, train_ids, stage, generator)
            spent += ms
    val_loss = validation_loss(model, val_ids, candidate)
    return {**candidate, "val_loss": round(val_loss, 4), "train_loss": round(loss.item(), 4),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def train_candidates(args: argparse.Namespace) -> None:
    # On the CPU the workers share its cores; on a GPU torch's default threads serve each worker.
    threads = max(1, (os.cpu_count() or 1) // args.workers) if args.device == "cpu" else 0
    jobs = [(json.loads(line), str(args.corpus), args.device, threads) for line in args.timed.open()]
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32, as on the CPU
    results = []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for result in pool.imap_unordered(train_candidate, jobs):
            results.append(result)
            print(json.dumps(result), flush=True)
    print("best:", file=sys.stderr)
    ranked = sorted(
        results, key=lambda result: result["val_loss"] if math.isfinite(result["val_loss"]) else math.inf
    )
    for result in ranked[:10]:
        print(json.dumps(result), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "tinyshakespeare" / "input.txt")
    commands = parser.add_subparsers(dest="command", required=True)
    timing = commands.add_parser("time", help="step time and steps in the budget, per candidate")
    timing.add_argument("--budget", type=float, default=110.0, help="seconds of training")
    timing.add_argument("--grid", type=Path, help="JSON lines of candidates (default: the built-in grid)")
    timing.add_argument("--timed-steps", type=int, default=8)
    training = commands.add_parser("train", help="train each timed candidate for its steps")
    training.add_argument("timed", type=Path, help="the output of `time`")
    training.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    training.add_argument("--workers", type=int, default=1, help="candidates trained at once")
    args = parser.parse_args()
    time_candidates(args) if args.command == "time" else train_candidates(args)


if __name__ == "__main__":
    main()
