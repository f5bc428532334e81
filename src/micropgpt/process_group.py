"""End a multi-process run's process group when training ends, in every process.

Lightning 2.6 destroys the process group it created only for NCCL (an atexit handler, since
PyTorch warns about undestroyed NCCL groups); a gloo group, the one CPU runs use, is left alive.
Its C++ worker threads (pt_gloo_runloop, gloo_tcp_loop) then still run while the interpreter
shuts down, and whether that ends in `terminate called without an active exception` (SIGABRT)
depends on the order in which the process's extension modules are torn down: with matplotlib
installed (torchmetrics imports pyplot) a ddp_spawn job's second process aborted in about one run
of ten (README, Reliability). Destroying the group once the Trainer is done joins those threads
while everything they use is still alive.
"""

from __future__ import annotations

import lightning as L
import torch


class DestroyProcessGroup(L.Callback):
    """After fit, validate or test: wait for every process, then destroy the default process group."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        # No process may take the group down while another still communicates through it.
        trainer.strategy.barrier("destroy_process_group")
        torch.distributed.destroy_process_group()
