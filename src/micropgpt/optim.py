"""Muon for the transformer's weight matrices, AdamW for the rest, as one optimizer.

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) replaces each
weight matrix's update by the orthogonalised momentum (a few Newton-Schulz iterations), which learns
more per step than AdamW: in 120 s of CPU training the `cpu_2min` recipe's val loss drops by ~0.1
(README, Performance). It is meant for the hidden matrices only: embedding tables, the output
head, biases and LayerNorm gains stay with AdamW, as its authors recommend. Both come from
torch.optim (Muon since torch 2.9); this class only routes parameter groups to them, so that
Lightning, the LR scheduler, the LR monitor, gradient clipping and checkpoints see one optimizer.
`BatchedMuon` is torch's Muon with the Newton-Schulz iterations of same-shape matrices run as one
batched matmul: a small model's 16 matrices cost a few calls per iteration instead of 16; and in
float32 on CPUs without native bf16.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import AdamW, Optimizer

from micropgpt.cpu_kernels import native_bf16
from micropgpt.errors import UserError

MUON_GROUP = "matrices"  # the parameter group (module.parameter_groups) that Muon takes


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16, as torch's Muon iterates, where the device computes it natively (GPUs, CPUs with
    AVX512-BF16 or AMX); float32 on other CPUs, where bf16 matmuls are emulated, many times slower
    (README, Performance)."""
    return torch.float32 if device.type == "cpu" and not native_bf16() else torch.bfloat16


def orthogonalise(
    updates: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype,
):
    """torch.optim.Muon's Newton-Schulz iteration (quintic) in `dtype` on a (n, rows, cols) stack at
    once: in bf16, each matrix as torch's `_zeropower_via_newtonschulz` computes it alone, to float
    rounding."""
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = updates.size(-2) > updates.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix lr: "match_rms_adamw" scales the update to AdamW's RMS."""
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn in (None, "original"):
        return lr * math.sqrt(max(1.0, rows / cols))
    return lr


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon, with the matrices of one shape stacked for `orthogonalise`, which iterates
    in `newton_schulz_dtype`.

    Same arguments, state ("momentum_buffer" per parameter) and checkpoints as torch's Muon.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                buffers = [self._momentum_buffer(p) for p in params]
                momentum = group["momentum"]
                torch._foreach_lerp_(buffers, grads, 1 - momentum)
                updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
                orthogonal = orthogonalise(
                    torch.stack(updates),
                    group["ns_coefficients"],
                    group["ns_steps"],
                    group["eps"],
                    newton_schulz_dtype(params[0].device),
                )
                lr = group["lr"]
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                step_size = adjusted_lr(lr, group["adjust_lr_fn"], shape)
                torch._foreach_add_(params, list(orthogonal.unbind(0)), alpha=-step_size)
        return loss

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


class MuonWithAdamW(Optimizer):
    """Muon for the parameter group named "matrices", AdamW for every other group.

    Muon scales its updates to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), so one `lr` and one
    `weight_decay` serve both; `momentum` is Muon's, `betas` AdamW's. `adamw_lr_ratio` scales AdamW's
    lr against Muon's: embedding tables and the output head may learn faster than the matrices.
    `param_groups` is the inner optimizers' own groups, so an LR scheduler's changes reach them.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.99),
        fused: bool | None = None,
        adamw_lr_ratio: float = 1.0,
    ):
        if not hasattr(torch.optim, "Muon"):
            raise UserError(
                f"optimizer=muon needs torch.optim.Muon (torch >= 2.9; this is torch {torch.__version__}): "
                "upgrade torch or use optimizer=adamw"
            )
        groups = list(params)
        matrices = [g for g in groups if g.get("name") == MUON_GROUP]
        others = [
            {**g, "lr": g.get("lr", lr) * adamw_lr_ratio} for g in groups if g.get("name") != MUON_GROUP
        ]
        if not matrices:
            raise ValueError(f"MuonWithAdamW needs a parameter group named {MUON_GROUP!r}")
        if any(p.dim() != 2 for g in matrices for p in g["params"]):
            raise UserError(
                "optimizer=muon orthogonalises whole weight matrices, and under FSDP (trainer=fsdp) each "
                "process holds flattened 1-D shards of them; use optimizer=adamw with FSDP, or "
                "optimizer=muon with another strategy (ddp)"
            )
        defaults = {"lr": lr, "weight_decay": weight_decay}
        super().__init__(matrices + others, defaults)
        self.muon = BatchedMuon(
            matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = AdamW(
            others, lr=lr * adamw_lr_ratio, weight_decay=weight_decay, betas=betas, fused=fused
        )
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():  # Lightning's closure runs the forward and backward pass
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise UserError(
                "the checkpoint's optimizer state is not MuonWithAdamW's: resume it with the "
                "optimizer it was trained with (optimizer=adamw), or start a new run"
            )
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # Loading replaced the inner optimizers' groups by new ones: point param_groups at those.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
