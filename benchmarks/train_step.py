"""Training-step speed: a plain PyTorch loop against the project's Lightning training, side by side.

    python benchmarks/train_step.py [--repeats 9] [--steps 5] [--rows fp32,dropout,bf16,compile]
                                    [--nanogpt DIR] [--json-out FILE] [OVERRIDE ...]

(a) plain: a hand-written loop on `micropgpt.model.GPT`: nanoGPT-style random batches, forward,
    backward, gradient clipping, AdamW step, lr scheduler step.
(b) Lightning: `GPTModule` and `CharDataModule` under `lightning.Trainer`, all built from
    conf/train.yaml exactly as `python train.py` builds them (progress bar, TensorBoard logger,
    learning-rate monitor, checkpoint callback). Validation and checkpoint writing fall outside
    the timed steps: every timed block is shorter than trainer.val_check_interval.
(c) nanoGPT, with `--nanogpt DIR` (a checkout of github.com/karpathy/nanoGPT): its own train.py
    on the same model, batch, AdamW and clipping, for the fp32 and dropout rows (on a CPU it
    never autocasts). nanoGPT's architecture only: learned positions, GELU, none of the model
    options. It ties the output head to the token embedding and holds its lr (decay_lr=False),
    which change no step's cost.
(a) and (b) get the optimizer, scheduler, clipping and batch shape of the composed config, so
they do the same computation. OVERRIDEs are Hydra overrides (default: the seed model, batch 32).

Every variant (row x {plain, Lightning}) first runs one untimed warm-up block (compilation
included), then the variants take turns, A B C D ... A B C D ..., `--repeats` times: a change
in machine load hits all alike. One block = one untimed step, then `--steps` timed steps, of which
the block reports the median: a one-off stall (another process, a page-fault storm) does not
decide a round. A Lightning step is timed from one `on_train_batch_end` to the next, so it
includes everything Lightning does between two steps (data, hooks, logging, progress bar).
A nanoGPT block is one run of its train.py, which prints each iteration's time.
A row reports the median ms/step, tokens/s, the Lightning/plain speed ratio b/a (median of the
per-round ratios; 1.0 = no overhead), Lightning's speed against nanoGPT's b/c (above 1.0:
Lightning is faster), and the model FLOPs utilisation against this machine's fp32 matmul peak
(the best 4096^3 matmul, three measured per round):
    model FLOPs per token = 6 N + 12 L H Q T   (PaLM, appendix B; nanoGPT's estimate_mfu)
with N the parameters of every matrix multiply (all but the two embedding tables), L layers,
H heads, Q head size, T block size. Output: one JSON line per measured row, then a table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from micropgpt.hydra_app import instantiate_callbacks, instantiate_loggers  # noqa: E402
from micropgpt.model import GPT, GPTConfig  # noqa: E402
from micropgpt.module import parameter_groups  # noqa: E402

# name -> (overrides, precision for the plain loop's autocast, compile)
ROWS = {
    "fp32": (["model.dropout=0.0"], None, False),
    "dropout": (["model.dropout=0.2"], None, False),
    "bf16": (["model.dropout=0.0", "trainer.precision=bf16-mixed"], torch.bfloat16, False),
    "compile": (["model.dropout=0.0", "model.compile=true"], None, True),
}
ROW_TITLES = {
    "fp32": "fp32, dropout 0",
    "dropout": "fp32, dropout 0.2",
    "bf16": "bf16-mixed, dropout 0",
    "compile": "compile, dropout 0",
}


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    importlib.import_module("train")  # registers the model schema and the resolvers conf/ uses
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[*overrides, f"hydra.runtime.output_dir={output_dir}"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)  # what ${hydra:...} in conf/ resolves against
    return cfg


def cpu_name() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "?")


def matmul_gflops(size: int = 4096, tries: int = 3) -> float:
    """The best of `tries` size^3 fp32 matmuls, after one warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def flops_per_token(model: GPT) -> float:
    c = model.config
    embedding_tables = sum(t.weight.numel() for t in (model.tok_emb, model.pos_emb) if t is not None)
    matmul_params = model.num_parameters() - embedding_tables
    return 6 * matmul_params + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size


class PlainLoop:
    """The loop a user would write by hand, with the composed config's hyperparameters."""

    def __init__(self, cfg: DictConfig, train_ids: torch.Tensor, vocab_size: int, autocast, compile: bool):
        torch.manual_seed(cfg.seed)
        architecture = {k: v for k, v in cfg.model.items() if k != "compile"}
        self.model = GPT(GPTConfig(vocab_size=vocab_size, **architecture)).train()
        self.forward = torch.compile(self.model.forward) if compile else self.model
        self.optimizer = instantiate(cfg.optimizer)(parameter_groups(self.model))
        self.scheduler = instantiate(cfg.scheduler)(self.optimizer) if cfg.scheduler else None
        self.clip = cfg.trainer.gradient_clip_val
        self.autocast = autocast
        self.train_ids, self.block_size, self.batch_size = (
            train_ids,
            cfg.model.block_size,
            cfg.data.batch_size,
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def step(self) -> None:
        starts = torch.randint(
            len(self.train_ids) - self.block_size - 1, (self.batch_size,), generator=self.generator
        )
        windows = torch.stack([self.train_ids[s : s + self.block_size + 1] for s in starts.tolist()])
        context = torch.autocast("cpu", dtype=self.autocast) if self.autocast else nullcontext()
        with context:
            _, loss = self.forward(windows[:, :-1], windows[:, 1:])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def block(self, steps: int) -> float:
        """The median seconds of `steps` steps after one untimed step."""
        self.step()
        ends = [time.perf_counter()]
        for _ in range(steps):
            self.step()
            ends.append(time.perf_counter())
        return statistics.median(np.diff(ends))


class _StepEnds(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter())


class LightningRun:
    """What `python train.py` builds; each block is one more `trainer.fit` of the same module."""

    def __init__(self, cfg: DictConfig):
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        self.cfg = cfg
        self.datamodule = instantiate(cfg.data)
        self.module = instantiate(cfg.module, vocab=self.datamodule.vocab, _convert_="all")

    def block(self, steps: int) -> float:
        step_ends = _StepEnds()
        loggers = instantiate_loggers(self.cfg.get("logger"))
        callbacks = instantiate_callbacks(self.cfg.callbacks, loggers)
        trainer = instantiate(
            self.cfg.trainer, max_steps=steps + 1, logger=loggers, callbacks=[*callbacks, step_ends]
        )
        if steps + 1 >= self.cfg.trainer.val_check_interval:
            raise SystemExit(f"--steps {steps} reaches trainer.val_check_interval: validation would be timed")
        trainer.fit(self.module, datamodule=self.datamodule)
        return statistics.median(np.diff(step_ends.times))


class NanoGPTRun:
    """nanoGPT's own train.py, run from its checkout; each block is one more run of the script.

    It runs in a scratch dir laid out as it expects: configurator.py (it opens that from the
    working dir) and data/micropgpt/{train,val}.bin and meta.pkl, the composed config's splits as
    uint16 ids like its prepare.py writes them. Its printed per-iteration `time` is the measure:
    iteration 0 also evaluates, and 1 is the untimed step every variant has, so neither counts."""

    ROWS = ("fp32", "dropout")
    ITERATION = re.compile(r"^iter (\d+): loss \S+, time ([\d.]+)ms", re.MULTILINE)

    def __init__(
        self, checkout: Path, cfg: DictConfig, splits: dict[str, np.ndarray], vocab_size: int, scratch: Path
    ):
        needed = ("train.py", "model.py", "configurator.py")
        if missing := [name for name in needed if not (checkout / name).is_file()]:
            raise SystemExit(
                f"--nanogpt {checkout}: no {', '.join(missing)} there; "
                "give the directory of a clone of github.com/karpathy/nanoGPT"
            )
        m, optimizer, precision = cfg.model, cfg.optimizer, str(cfg.trainer.precision)
        differences = [
            name
            for name, differs in {
                f"model.position={m.position}": m.position != "learned",
                f"model.activation={m.activation}": m.activation != "gelu",
                "model.qk_norm": m.qk_norm,
                "model.logit_softcap": m.logit_softcap > 0,
                "model.value_embeddings": m.value_embeddings,
                "model.smear": m.smear,
                "model.unet_skips": m.unet_skips,
                f"optimizer={optimizer._target_}": optimizer._target_ != "torch.optim.AdamW",
                f"trainer.precision={precision}": precision not in ("32", "32-true"),
            }.items()
            if differs
        ]
        if differences:
            raise SystemExit(
                f"--nanogpt: nanoGPT's train.py has no {', '.join(differences)}; "
                "compare on nanoGPT's architecture (the seed model: no experiment=, no model options)"
            )
        if vocab_size > 2**16:
            raise SystemExit(f"--nanogpt: nanoGPT reads uint16 ids; this corpus has {vocab_size:,} symbols")
        self.checkout, self.scratch = checkout.resolve(), scratch  # it runs from scratch, not from here
        data = scratch / "data" / "micropgpt"
        data.mkdir(parents=True)
        for name, ids in splits.items():
            ids.astype(np.uint16).tofile(data / f"{name}.bin")
        # The pickle nanoGPT's prepare.py writes; its train.py reads only the vocabulary size.
        (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab_size}))
        (scratch / "configurator.py").symlink_to(self.checkout / "configurator.py")
        beta1, beta2 = optimizer.betas
        self.arguments = [
            "--dataset=micropgpt",
            "--device=cpu",
            "--dtype=float32",
            f"--compile={m.compile}",
            f"--n_layer={m.n_layer}",
            f"--n_head={m.n_head}",
            f"--n_embd={m.n_embd}",
            f"--block_size={m.block_size}",
            f"--dropout={float(m.dropout)}",
            f"--bias={m.bias}",
            f"--batch_size={cfg.data.batch_size}",
            "--gradient_accumulation_steps=1",
            f"--learning_rate={float(optimizer.lr)}",
            "--decay_lr=False",  # an lr schedule changes no step's cost
            f"--weight_decay={float(optimizer.weight_decay)}",
            f"--beta1={float(beta1)}",
            f"--beta2={float(beta2)}",
            f"--grad_clip={float(cfg.trainer.gradient_clip_val or 0.0)}",
            "--eval_iters=1",
            "--log_interval=1",
            "--always_save_checkpoint=False",
            f"--out_dir={scratch / 'out'}",
        ]

    def block(self, steps: int) -> float:
        last = steps + 1
        iterations = [f"--max_iters={last}", f"--eval_interval={last + 1}"]  # one evaluation: at 0
        result = subprocess.run(
            [sys.executable, str(self.checkout / "train.py"), *self.arguments, *iterations],
            cwd=self.scratch,
            # As many threads as this process's variants use.
            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            tail = (result.stderr.strip() or "no output").splitlines()[-1]
            raise SystemExit(f"nanoGPT's train.py failed (exit {result.returncode}): {tail}")
        seconds = {int(i): float(ms) / 1e3 for i, ms in self.ITERATION.findall(result.stdout)}
        if missing := sorted(set(range(2, last + 1)) - seconds.keys()):
            raise SystemExit(f"nanoGPT's train.py printed no 'iter {missing[0]}: ... time ...ms' line")
        return statistics.median(seconds[i] for i in range(2, last + 1))


@dataclass
class Variant:
    row: str
    kind: str  # "plain", "lightning" or "nanogpt"
    run: Callable[[int], float]
    seconds: list[float] = field(default_factory=list)


def relative_speed(variant: Variant, baseline: Variant) -> float:
    """The median over rounds of baseline's time / variant's: above 1.0, variant is faster."""
    ratios = (b / v for v, b in zip(variant.seconds, baseline.seconds, strict=True))
    return round(statistics.median(ratios), 4)


def build_variants(args: argparse.Namespace, rows: list[str], out: Path) -> tuple[list[Variant], GPT, int]:
    """Each row's plain loop and Lightning run (and nanoGPT's with --nanogpt); the model and batch size."""
    variants: list[Variant] = []
    for row in rows:
        overrides, autocast, compile = ROWS[row]
        # The project's data dir, as for `python train.py` run from the project root.
        cfg = compose_config([f"data.data_dir={ROOT / 'data'}", *overrides, *args.overrides], out / row)
        lightning_run = LightningRun(cfg)
        datamodule = lightning_run.datamodule
        datamodule.setup("fit")
        split = datamodule.train_set
        ids = np.memmap(split.ids_path, dtype=split.dtype, mode="r")[split.start : split.stop]
        ids = torch.from_numpy(ids.astype(np.int64))
        plain = PlainLoop(cfg, ids, len(datamodule.vocab), autocast, compile)
        variants += [Variant(row, "plain", plain.block), Variant(row, "lightning", lightning_run.block)]
        if args.nanogpt and row in NanoGPTRun.ROWS:
            val = datamodule.val_set
            splits = {
                "train": ids.numpy(),
                "val": np.memmap(val.ids_path, dtype=val.dtype, mode="r")[val.start : val.stop],
            }
            nanogpt = NanoGPTRun(args.nanogpt, cfg, splits, len(datamodule.vocab), out / row / "nanogpt")
            variants.append(Variant(row, "nanogpt", nanogpt.block))
    return variants, plain.model, cfg.data.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="rounds over all variants")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each variant's untimed first block")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: one per core)")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout: its train.py as a third variant")
    parser.add_argument("--json-out", type=Path, help="also write the JSON lines to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for conf/train.yaml")
    args = parser.parse_args()
    rows = args.rows.split(",")
    if unknown := set(rows) - set(ROWS):
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    if args.nanogpt and not set(rows) & set(NanoGPTRun.ROWS):
        parser.error(f"--nanogpt compares the {' and '.join(NanoGPTRun.ROWS)} rows only")
    warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec).*")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="train_step_") as out:  # Lightning's logs and checkpoints
        variants, model, batch = build_variants(args, rows, Path(out))
        for variant in variants:
            if variant.kind != "nanogpt":  # a fresh process each block: nothing carries over to warm
                variant.run(args.warmup)
        peaks = []
        for _ in range(args.repeats):
            peaks.append(matmul_gflops())
            for variant in variants:
                variant.seconds.append(variant.run(args.steps))
    peak = max(peaks)
    tokens_per_step = batch * model.config.block_size

    machine = (
        f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    flops = flops_per_token(model)
    records = []
    for row in rows:
        kinds = {v.kind: v for v in variants if v.row == row}
        record = {
            "row": row,
            "title": ROW_TITLES[row],
            "ratio_b_a": relative_speed(kinds["lightning"], kinds["plain"]),
        }
        if "nanogpt" in kinds:
            record["ratio_b_c"] = relative_speed(kinds["lightning"], kinds["nanogpt"])
        for v in kinds.values():
            seconds = statistics.median(v.seconds)
            record[v.kind] = {
                "ms_per_step": round(seconds * 1e3, 1),
                "tokens_per_s": round(tokens_per_step / seconds),
                # Against the fp32 peak: a bf16 row's figure would not be a utilisation.
                "mfu": None if row == "bf16" else round(flops * tokens_per_step / seconds / (peak * 1e9), 4),
                "ms_per_step_each": [round(s * 1e3, 1) for s in v.seconds],
            }
        records.append(record)
    by_row = {v.row + v.kind: v.seconds for v in variants}
    dropout_cost = {
        kind: round(
            statistics.median(
                d / z for d, z in zip(by_row["dropout" + kind], by_row["fp32" + kind], strict=True)
            ),
            4,
        )
        for kind in ("plain", "lightning")
        if "dropout" + kind in by_row and "fp32" + kind in by_row
    }
    summary = {
        "machine": machine,
        "matmul_peak_gflops": round(peak, 1),
        "model": {k: v for k, v in vars(model.config).items()},
        "batch_size": batch,
        "params": model.num_parameters(),
        "flops_per_token": flops,
        "repeats": args.repeats,
        "steps": args.steps,
        "dropout_0.2_over_0": dropout_cost,
    }
    lines = [json.dumps(summary), *(json.dumps(r) for r in records)]
    print("\n".join(lines))
    if args.json_out:
        args.json_out.write_text("\n".join(lines) + "\n")

    c = model.config
    print(
        f"\n{machine}\nfp32 matmul peak {peak:.0f} GFLOP/s (best 4096^3 matmul of {3 * args.repeats}); "
        f"model {c.n_layer} layers x {c.n_head} heads x n_embd {c.n_embd}, block {c.block_size}, "
        f"batch {batch}: {model.num_parameters() / 1e6:.2f}M parameters, {flops / 1e6:.1f} MFLOP/token; "
        f"median of {args.repeats} rounds x {args.steps} steps\n"
    )
    columns = ["plain ms/step", "plain tokens/s", "Lightning ms/step", "Lightning tokens/s", "b/a"]
    columns += ["MFU plain", "MFU Lightning"]
    with_nanogpt = any("nanogpt" in r for r in records)
    if with_nanogpt:
        columns += ["nanoGPT ms/step", "b/c"]
    print(f"| {'':22} | " + " | ".join(columns) + " |")
    print(f"|{'-' * 24}|" + "|".join("-" * (len(c) + 2) for c in columns) + "|")
    for r in records:
        a, b = r["plain"], r["lightning"]
        cells = [f"{a['ms_per_step']:.1f}", f"{a['tokens_per_s']:,}", f"{b['ms_per_step']:.1f}"]
        mfu = [f"{x['mfu']:.1%}" if x["mfu"] is not None else "n/a" for x in (a, b)]
        cells += [f"{b['tokens_per_s']:,}", f"{r['ratio_b_a']:.3f}", *mfu]
        if with_nanogpt:
            n = r.get("nanogpt")
            cells += [f"{n['ms_per_step']:.1f}", f"{r['ratio_b_c']:.3f}"] if n else ["-", "-"]
        print(
            f"| {r['title']:22} | "
            + " | ".join(f"{x:>{len(c)}}" for x, c in zip(cells, columns, strict=True))
            + " |"
        )
    if dropout_cost:
        print(
            "\ndropout 0.2 step / dropout 0 step: "
            + ", ".join(f"{'Lightning' if k == 'lightning' else k} {v:.3f}x" for k, v in dropout_cost.items())
        )


if __name__ == "__main__":
    main()
