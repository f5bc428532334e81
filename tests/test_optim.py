"""MuonWithAdamW: which parameters each inner optimizer updates, the LR schedule reaching both, and
its checkpointed state."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.optim.lr_scheduler import LambdaLR

from micropgpt import optim
from micropgpt.errors import UserError
from micropgpt.model import GPT, Block, GPTConfig
from micropgpt.module import parameter_groups
from micropgpt.optim import BatchedMuon, MuonWithAdamW, newton_schulz_dtype, orthogonalise

HYPERPARAMETERS = {"lr": 1e-2, "weight_decay": 0.1, "momentum": 0.95, "betas": (0.9, 0.99)}


@pytest.fixture
def bf16_newton_schulz(monkeypatch):
    """BatchedMuon iterating in bf16 on any CPU, as torch's Muon always does: for the tests that
    compare the two."""
    monkeypatch.setattr(optim, "newton_schulz_dtype", lambda device: torch.bfloat16)


def tiny_gpt(position: str = "learned") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, position=position))


def train_steps(model: GPT, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 11, (4, 9), generator=generator)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_matrices_get_muon_and_everything_else_adamw(position, bf16_newton_schulz):
    combined_model, reference_model = tiny_gpt(position), tiny_gpt(position)
    combined = MuonWithAdamW(parameter_groups(combined_model), **HYPERPARAMETERS)
    matrices, *others = parameter_groups(reference_model)
    muon = torch.optim.Muon(
        matrices["params"], lr=1e-2, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw"
    )
    adamw = torch.optim.AdamW(others, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))

    train_steps(combined_model, combined, 3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        idx = torch.randint(0, 11, (4, 9), generator=generator)
        _, loss = reference_model(idx[:, :-1], idx[:, 1:])
        muon.zero_grad()
        adamw.zero_grad()
        loss.backward()
        muon.step()
        adamw.step()

    # Muon took the blocks' matrices only: embedding tables and head are not orthogonalised.
    assert {id(p) for p in matrices["params"]}.isdisjoint(
        {id(reference_model.tok_emb.weight), id(reference_model.lm_head.weight)}
    )
    # Muon orthogonalises in bf16, and the batched products of same-shape matrices (BatchedMuon)
    # may round differently from one matrix at a time: with Intel's MKL, 1.6e-5 in one weight after
    # these 3 steps (0 on AMD), while each step moves every weight by about 1e-3.
    pairs = zip(combined_model.named_parameters(), reference_model.parameters(), strict=True)
    for (name, got), expected in pairs:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "settings", [{"adjust_lr_fn": "match_rms_adamw"}, {"adjust_lr_fn": "original", "nesterov": False}]
)
def test_batched_muon_updates_what_torch_muon_does_and_shares_its_state(settings, bf16_newton_schulz):
    shapes = [(24, 8), (8, 8), (8, 24), (24, 8), (8, 8), (8, 24), (24, 8)]  # several of each, both ways

    def parameters() -> list[torch.nn.Parameter]:
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]

    batched_params, reference_params = parameters(), parameters()
    batched = BatchedMuon(batched_params, lr=1e-2, weight_decay=0.1, **settings)
    reference = torch.optim.Muon(reference_params, lr=1e-2, weight_decay=0.1, **settings)
    for step in range(4):
        torch.manual_seed(step)
        grads = [torch.randn(shape) for shape in shapes]
        for params, optimizer in ((batched_params, batched), (reference_params, reference)):
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone()
            optimizer.step()
        if step == 1:  # each resumes from the other's checkpointed state
            batched_state, reference_state = batched.state_dict(), reference.state_dict()
            batched.load_state_dict(copy.deepcopy(reference_state))
            reference.load_state_dict(copy.deepcopy(batched_state))
    for got, expected in zip(batched_params, reference_params, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("native", "cpu_dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_newton_schulz_runs_in_bf16_only_where_the_device_has_it(monkeypatch, native, cpu_dtype):
    monkeypatch.setattr(optim, "native_bf16", lambda: native)
    assert newton_schulz_dtype(torch.device("cpu")) == cpu_dtype
    assert newton_schulz_dtype(torch.device("cuda")) == torch.bfloat16


def test_newton_schulz_in_float32_orthogonalises_as_bf16_does():
    torch.manual_seed(0)
    updates = torch.randn(3, 24, 96)
    coefficients = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults
    in_float32 = orthogonalise(updates, coefficients, 5, 1e-7, torch.float32)
    in_bf16 = orthogonalise(updates, coefficients, 5, 1e-7, torch.bfloat16)
    assert in_float32.dtype == torch.float32
    # The same matrix to bf16 rounding (2^-8 relative, summed over a few iterations).
    torch.testing.assert_close(in_float32, in_bf16.float(), rtol=0, atol=0.03)
    # And nearly orthogonal: the quintic iteration brings every singular value into about [0.7, 1.2].
    singular_values = torch.linalg.svdvals(in_float32)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


def test_lr_schedule_reaches_both_inner_optimizers():
    optimizer = MuonWithAdamW(parameter_groups(tiny_gpt()), **HYPERPARAMETERS)
    scheduler = LambdaLR(optimizer, lambda step: 0.5 ** (step + 1))
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.muon.param_groups] == [0.0025]
    assert [group["lr"] for group in optimizer.adamw.param_groups] == [0.0025, 0.0025]


def test_adamw_lr_ratio_scales_adamws_lr_through_the_schedule():
    optimizer = MuonWithAdamW(parameter_groups(tiny_gpt()), **HYPERPARAMETERS, adamw_lr_ratio=4.0)
    scheduler = LambdaLR(optimizer, lambda step: 0.5 ** (step + 1))
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.muon.param_groups] == [0.0025]
    assert [group["lr"] for group in optimizer.adamw.param_groups] == [0.01, 0.01]


def test_lr_schedule_reaches_both_inner_optimizers_after_a_resume():
    optimizer = MuonWithAdamW(parameter_groups(tiny_gpt()), **HYPERPARAMETERS)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    scheduler = LambdaLR(optimizer, lambda step: 0.5 ** (step + 1))
    inner_groups = optimizer.muon.param_groups + optimizer.adamw.param_groups
    assert [group["lr"] for group in inner_groups] == [5e-3] * 3
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in inner_groups] == [2.5e-3] * 3


def test_state_dict_resumes_exactly():
    model = tiny_gpt()
    optimizer = MuonWithAdamW(parameter_groups(model), **HYPERPARAMETERS)
    train_steps(model, optimizer, 2)
    resumed_model = copy.deepcopy(model)
    resumed = MuonWithAdamW(parameter_groups(resumed_model), **HYPERPARAMETERS)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))

    train_steps(model, optimizer, 2, seed=1)
    train_steps(resumed_model, resumed, 2, seed=1)
    for got, expected in zip(resumed_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(got, expected)


def test_adamw_state_is_refused_with_a_clear_error():
    model = tiny_gpt()
    adamw_state = torch.optim.AdamW(parameter_groups(model)).state_dict()
    optimizer = MuonWithAdamW(parameter_groups(model), **HYPERPARAMETERS)
    with pytest.raises(UserError, match="optimizer=adamw"):
        optimizer.load_state_dict(adamw_state)


def _group_under_fsdp(rank: int, port: int, out_dir: Path) -> None:
    """One of two CPU processes (gloo) holding a GPT under FSDP's FULL_SHARD, as trainer=fsdp wraps
    it (one unit per Block, use_orig_params as Lightning sets it); writes what grouping made of it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = tiny_gpt()
        FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
        names = {id(p): name.replace("_fsdp_wrapped_module.", "") for name, p in model.named_parameters()}
        report = {
            "dims": sorted({p.dim() for p in model.parameters()}),
            "groups": {g["name"]: [names[id(p)] for p in g["params"]] for g in parameter_groups(model)},
        }
        try:
            MuonWithAdamW(parameter_groups(model), **HYPERPARAMETERS)
        except UserError as e:
            report["muon"] = str(e)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_parameter_groups_are_the_same_under_fsdp_and_muon_is_refused_there(tmp_path):
    """With FSDP every parameter is a flattened 1-D shard: grouping by shape put every matrix in
    no_decay and the embedding tables in two groups."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_group_under_fsdp, args=(port, tmp_path), nprocs=2)
    model = tiny_gpt()
    names = {id(p): name for name, p in model.named_parameters()}
    expected = {g["name"]: [names[id(p)] for p in g["params"]] for g in parameter_groups(model)}
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["dims"] == [1]  # so no shape tells a matrix from a bias
        assert report["groups"] == expected
        assert "optimizer=muon orthogonalises whole weight matrices" in report["muon"]
