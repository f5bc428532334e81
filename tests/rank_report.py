"""A callback for tests of multi-process runs: each process writes what it saw to rank<N>.json.

Added to a train.py run with `+callbacks.rank_report._target_=rank_report.RankReport`, tests/ on
PYTHONPATH and RANK_REPORT_DIR naming a folder outside the run dir, so that the test can still
check that only the first process wrote into the run dir. (An out_dir override would become part
of the run's name, slashes and all.)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig


class RankReport(L.Callback):
    def __init__(self):
        self.out_dir = Path(os.environ["RANK_REPORT_DIR"])
        self.report: dict = {"val_loss": []}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report.update(
            global_rank=trainer.global_rank,
            world_size=trainer.world_size,
            node_rank=trainer.node_rank,
            # Not set in the processes that ddp_spawn starts: Lightning hands them the Trainer only.
            run_dir=HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None,
            precision=trainer.precision,
            gradient_clip_val=trainer.gradient_clip_val,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
        )
        # The logits' dtype shows whether the forward pass really ran in the mixed precision.
        self._hook = pl_module.model.lm_head.register_forward_hook(self._record_logits_dtype)

    def _record_logits_dtype(self, module, inputs, output) -> None:
        self.report.setdefault("logits_dtype", str(output.dtype))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if "first_batch" not in self.report:
            sampler = trainer.train_dataloader.sampler
            self.report["sampler"] = {
                "type": type(sampler).__name__,
                "num_replicas": getattr(sampler, "num_replicas", None),
                "rank": getattr(sampler, "rank", None),
            }
            inputs, _ = batch
            self.report["batch_shape"] = list(inputs.shape)
            self.report["first_batch"] = inputs.tolist()
            # The mask dropout would draw now, from a copy of the generator: training is unchanged.
            with torch.random.fork_rng(devices=[]):
                self.report["dropout_mask"] = (torch.nn.functional.dropout(torch.ones(64), 0.5) > 0).tolist()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.report["val_loss"].append(trainer.callback_metrics["val/loss"].item())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hook.remove()
        self.report["global_step"] = trainer.global_step
        self.report["batches"] = trainer.fit_loop.epoch_loop.batch_progress.total.completed

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Last among the callbacks: what the process takes into its exit.
        self.report["process_group_alive"] = torch.distributed.is_initialized()
        self.report["native_threads"] = native_thread_names()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.report))


def native_thread_names() -> list[str]:
    """The names of this process's threads, C++ ones included (Linux)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            names.append((task / "comm").read_text().strip())
    return sorted(names)


def read_reports(out_dir: Path) -> list[dict]:
    """Every process's report, by rank."""
    reports = [json.loads(path.read_text()) for path in Path(out_dir).glob("rank*.json")]
    return sorted(reports, key=lambda report: report["global_rank"])
