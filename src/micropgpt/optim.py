"""Muon for the transformer's weight matrices, AdamW for the rest, as one optimizer.

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) replaces each
weight matrix's update by the orthogonalised momentum (a few Newton-Schulz iterations), which learns
more per step than AdamW: in 120 s of CPU training the `cpu_2min` recipe's val loss drops by ~0.1
(README, Performance). It is meant for the hidden matrices only: embedding tables, the output
head, biases and LayerNorm gains stay with AdamW, as its authors recommend. Both come from
torch.optim (Muon since torch 2.9); this class only routes parameter groups to them, so that
Lightning, the LR scheduler, the LR monitor, gradient clipping and checkpoints see one optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import AdamW, Optimizer

from micropgpt.errors import UserError

MUON_GROUP = "matrices"  # the parameter group (module.parameter_groups) that Muon takes


class MuonWithAdamW(Optimizer):
    """Muon for the parameter group named "matrices", AdamW for every other group.

    Muon scales its updates to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`), so one `lr` and one
    `weight_decay` serve both; `momentum` is Muon's, `betas` AdamW's. `param_groups` is the inner
    optimizers' own groups, so an LR scheduler's changes reach them.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.99),
        fused: bool | None = None,
    ):
        if not hasattr(torch.optim, "Muon"):
            raise UserError(
                f"optimizer=muon needs torch.optim.Muon (torch >= 2.9; this is torch {torch.__version__}): "
                "upgrade torch or use optimizer=adamw"
            )
        groups = list(params)
        matrices = [g for g in groups if g.get("name") == MUON_GROUP]
        others = [g for g in groups if g.get("name") != MUON_GROUP]
        if not matrices or any(p.dim() != 2 for g in matrices for p in g["params"]):
            raise ValueError(f"MuonWithAdamW needs a parameter group named {MUON_GROUP!r} of 2-D weights")
        defaults = {"lr": lr, "weight_decay": weight_decay}
        super().__init__(groups, defaults)
        self.muon = torch.optim.Muon(
            matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = AdamW(others, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)
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
