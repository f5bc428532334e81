"""The fast CPU training path computes what a straightforward GPT computes: the same loss without
dropout, dropout at the same places with the same keep rate and expectation, exact gradients.
And the speed options as users run them: model.compile=true, experiment=cpu_2min."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, run_train, tensorboard_hparams
from omegaconf import OmegaConf
from torch.nn import functional as F

from micropgpt.checkpoint import load_checkpoint
from micropgpt.cpu_kernels import (
    Dropout,
    _CausalAttention,
    causal_attention,
    keep_mask,
    native_bf16,
    relu_squared,
)
from micropgpt.hydra_app import bf16_if_native
from micropgpt.model import GPT, GPTConfig

VOCAB = 65


def reference_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The GPT written out the textbook way (explicit softmax attention), on `model`'s weights."""
    config = model.config
    B, T = inputs.shape
    C, H = config.n_embd, config.n_head
    x = model.tok_emb.weight[inputs] + model.pos_emb.weight[:T]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for block in model.blocks:
        h = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias)
        q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        y = (weights @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ block.attn.proj.weight.T + block.attn.proj.bias
        h = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias)
        h = F.gelu(h @ block.mlp.fc.weight.T + block.mlp.fc.bias)
        x = x + h @ block.mlp.proj.weight.T + block.mlp.proj.bias
    x = F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias)
    logits = x @ model.lm_head.weight.T
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def seed_batch(block_size: int = 64, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch_size, block_size + 1), generator=torch.Generator().manual_seed(7))
    return ids[:, :-1], ids[:, 1:]


def test_training_loss_without_dropout_equals_the_reference():
    torch.manual_seed(1337)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0))
    inputs, targets = seed_batch(block_size=32)
    model.train()
    _, loss = model(inputs, targets)
    expected = reference_loss(model, inputs, targets)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    # The same holds for the gradients that training follows.
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference_loss(model, inputs, targets).backward()
    for grad, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6)


def test_keep_mask_keeps_each_element_with_probability_one_minus_p():
    torch.manual_seed(0)
    for keep_prob in (0.8, 0.5, 0.1):
        mask = keep_mask(torch.Size((1000, 1000)), keep_prob, torch.device("cpu"))
        assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
        # Binomial standard deviation over 10^6 draws is at most 5e-4; 5 of them.
        assert mask.float().mean().item() == pytest.approx(keep_prob, abs=2.5e-3)
        # Both halves of every 64-bit random word are used: even and odd positions alike.
        flat = mask.flatten().float()
        assert flat[0::2].mean().item() == pytest.approx(keep_prob, abs=3.5e-3)
        assert flat[1::2].mean().item() == pytest.approx(keep_prob, abs=3.5e-3)
    assert not torch.equal(keep_mask(torch.Size((64,)), 0.5, torch.device("cpu")), mask.flatten()[:64])


def test_dropout_zeroes_at_rate_p_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.rand(2000, 500) + 0.5
    y = Dropout(0.2).train()(x)
    dropped = y == 0
    assert dropped.float().mean().item() == pytest.approx(0.2, abs=2.5e-3)
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.8)
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=2e-3)
    assert torch.equal(Dropout(0.2).eval()(x), x)


def test_attention_with_dropout_has_the_gradients_of_the_same_computation_in_autograd():
    """Forward and the hand-written backward against autograd through the textbook formula,
    with the same keep mask (the same seed draws it)."""
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    p = 0.3

    def reference(q, k, v):
        torch.manual_seed(5)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(
            torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf")
        )
        weights = weights.softmax(dim=-1)
        keep = keep_mask(weights.shape, 1 - p, weights.device)
        return (weights * keep / (1 - p)) @ v

    def ours(q, k, v):
        torch.manual_seed(5)
        return _CausalAttention.apply(q, k, v, p)

    out = ours(q, k, v)
    torch.testing.assert_close(out, reference(q, k, v))
    grad_out = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, (q, k, v), grad_out)
    reference_grads = torch.autograd.grad(reference(q, k, v), (q, k, v), grad_out)
    for got, expected in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("autocast", "tolerance"), [(False, 1e-5), (True, 3e-2)])
def test_attention_without_dropout_is_sdpas_with_its_gradients(autocast, tolerance):
    """The p = 0 path that replaces the CPU flash kernel in training, also under bf16-mixed."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 3, 16, 8)

    def output_and_grads(attention):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = attention(q, k, v)
        return (out.float(), *torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype)))

    ours = output_and_grads(lambda q, k, v: _CausalAttention.apply(q, k, v, 0.0))
    reference = output_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    for got, expected in zip(ours, reference, strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("dtype", "autocast", "dropout_p", "hand_written"),
    [
        (torch.float32, False, 0.0, False),  # float32 training: the flash kernel is the faster one
        (torch.float32, True, 0.0, True),  # bf16-mixed: its bf16 backward is the slow one
        (torch.bfloat16, False, 0.0, True),
        (torch.float32, False, 0.1, True),  # dropout: SDPA would take its unfused math path
    ],
)
def test_training_attention_takes_the_hand_written_kernel_for_dropout_and_bf16_only(
    monkeypatch, dtype, autocast, dropout_p, hand_written
):
    calls = []
    monkeypatch.setattr(_CausalAttention, "apply", lambda *args: calls.append("hand") or args[0])
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append("sdpa") or q)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        causal_attention(q, k, v, dropout_p)
        with torch.no_grad():  # validation and prompts: the flash kernel, unless dropout is asked for
            causal_attention(q, k, v, 0.0)
    assert calls == ["hand" if hand_written else "sdpa", "sdpa"]


@pytest.mark.parametrize(
    ("autocast", "dtype"), [(False, torch.float32), (True, torch.float32), (False, torch.float64)]
)
def test_relu_squared_has_the_values_and_gradients_of_autograds(autocast, dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 8, 48, dtype=dtype)
    x[0, 0, :4] = 0.0  # the kink: both give gradient 0 there
    grad_out = torch.randn(4, 8, 48, dtype=dtype)

    def output_and_grad(activation):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = activation(inputs.to(torch.bfloat16) if autocast else inputs)
        return out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))

    ours = output_and_grad(relu_squared)
    reference = output_and_grad(lambda t: F.relu(t).square())
    for got, expected in zip(ours, reference, strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_hand_written_backwards_refuse_a_second_derivative_instead_of_a_wrong_one():
    x = torch.randn(2, 3, 8, 4, requires_grad=True)
    for out in (relu_squared(x), _CausalAttention.apply(x, x, x, 0.0)):
        # Squared, so that the incoming gradient depends on x: without the guard, the second
        # derivative would follow that path only and silently miss the one through the kernel.
        (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            grad.sum().backward()


def test_attention_dropout_drops_weights_and_keeps_their_expectation():
    """Averaged over many masks, attention with dropout gives attention without it."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    v = torch.eye(6).view(1, 1, 6, 6)  # the output rows are then the attention weights themselves
    weights = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # 4,000 independent draws of the mask: the same inputs, repeated along the batch dimension.
    draws = _CausalAttention.apply(*(t.expand(4000, 1, 6, -1) for t in (q, k, v)), 0.2)
    # Each weight is kept (scaled by 1/0.8) or zeroed, never anything else.
    assert torch.all((draws == 0) | torch.isclose(draws, weights / 0.8))
    assert (draws[..., 1:] == 0).float().mean() > 0.1  # some weights really are dropped
    torch.testing.assert_close(draws.mean(dim=0, keepdim=True), weights, atol=0.02, rtol=0)


def test_training_with_dropout_under_bf16_autocast():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.2))
    inputs, targets = seed_batch(block_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(inputs, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_dropout_is_applied_in_training_only_and_at_every_site():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.5))
    inputs, targets = seed_batch(block_size=32)
    zero_fractions = {}

    def record(name):
        def hook(module, args, output):
            zero_fractions[name] = (output == 0).float().mean().item()

        return hook

    for name, module in model.named_modules():
        if isinstance(module, Dropout):
            module.register_forward_hook(record(name))
    model.train()
    _, train_loss = model(inputs, targets)
    _, train_loss_again = model(inputs, targets)
    # Embedding, and per block the attention output and the MLP output (the attention weights'
    # dropout is inside the attention, checked above).
    assert set(zero_fractions) == {
        "drop",
        *(f"blocks.{i}.{s}" for i in range(2) for s in ("attn.resid_dropout", "mlp.dropout")),
    }
    assert all(f == pytest.approx(0.5, abs=0.03) for f in zero_fractions.values()), zero_fractions
    assert train_loss.item() != train_loss_again.item()
    model.eval()
    with torch.no_grad():
        _, eval_loss = model(inputs, targets)
        _, eval_loss_again = model(inputs, targets)
    assert eval_loss.item() == eval_loss_again.item()
    assert all(f < 0.01 for f in zero_fractions.values()), zero_fractions


def test_compiled_run_checkpoint_loads_uncompiled_and_samples(tmp_path, corpus):
    run_dir = tmp_path / "compiled"
    run_train(
        run_dir,
        *TINY,
        "model.compile=true",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "+trainer.limit_val_batches=2",
        f"data.path={corpus}",
    )
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    # Architecture only: the run's compile flag is not part of the model users rebuild.
    assert "compile" not in checkpoint["hyper_parameters"]["model"]
    keys = list(checkpoint["state_dict"])
    assert "model.lm_head.weight" in keys and not any("_orig_mod" in key for key in keys)
    model, _ = load_checkpoint(run_dir, "cpu")
    assert type(model) is GPT  # a plain module: not torch.compile's wrapper
    sample = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), f"ckpt={run_dir}", "max_new_tokens=30", "stream=false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert len(sample.stdout.strip()) >= 20


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")],
)
def test_recipes_take_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    for accelerator in ("auto", "cpu"):
        assert bf16_if_native(accelerator) == expected


def test_cpu_2min_recipe_composes_trains_and_resumes(tmp_path, corpus):
    run_dir = tmp_path / "cpu_2min"
    common = (
        "experiment=cpu_2min",
        "+trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "callbacks.text_samples.num_chars=20",
        f"data.path={corpus}",
    )
    run_train(run_dir, *common, "trainer.max_steps=3")
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert cfg.trainer.max_time == "00:00:02:00"
    # bf16 autocast exactly where the CPU has bf16 instructions (AVX512-BF16 or AMX).
    assert cfg.trainer.precision == ("bf16-mixed" if native_bf16() else "32-true")
    assert cfg.data.val_fraction == 0.1
    assert cfg.trainer.val_check_interval == 3  # validates once, at the end of the run
    assert cfg.model.dropout == 0.0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["hyper_parameters"]["model"]["n_embd"] == cfg.model.n_embd
    (optimizer_state,) = checkpoint["optimizer_states"]
    assert set(optimizer_state) == {"muon", "adamw"}  # optimizer=muon: MuonWithAdamW's state
    hparams = tensorboard_hparams(run_dir)  # the recipe's choices, to compare runs by in TensorBoard
    assert (hparams["optimizer"], hparams["scheduler"], hparams["decay_by"]) == ("muon", "cosine", "time")
    assert (hparams["position"], hparams["smear"], hparams["max_time"]) == ("rope", True, "00:00:02:00")

    run_train(run_dir, *common, "trainer.max_steps=6", "ckpt_path=last")
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6
    assert resumed["optimizer_states"][0]["muon"]["state"]  # Muon's momentum buffers carried on

    model, tokenizer = load_checkpoint(run_dir, "cpu")  # a RoPE / ReLU² model samples
    assert model.config.position == "rope" and model.pos_emb is None
    ids = model.generate(torch.tensor([tokenizer.encode("ROMEO:")]), 2 * model.config.block_size)
    assert len(tokenizer.decode(ids[0].tolist())) == 6 + 2 * model.config.block_size
