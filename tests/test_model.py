"""The pure-PyTorch GPT: output shapes, causality, learning, the few-row Linear kernel, and its
configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from micropgpt import model as model_module
from micropgpt.cpu_kernels import Linear
from micropgpt.errors import UserError
from micropgpt.model import GPT, GPTConfig, Rotary
from micropgpt.module import parameter_groups

VOCAB = 11


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    config = {"vocab_size": VOCAB, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
    return GPT(GPTConfig(**{**config, **overrides}))


def test_forward_returns_logits_and_loss():
    model = tiny_gpt()
    idx = torch.randint(0, VOCAB, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, VOCAB)
    assert loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, VOCAB)
    assert loss.ndim == 0
    # A fresh GPT-2-style init predicts nearly uniformly.
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=0.2)


def test_later_tokens_do_not_change_earlier_logits():
    model = tiny_gpt().eval()
    idx = torch.randint(0, VOCAB, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    with torch.no_grad():
        logits, _ = model(idx)
        changed_logits, _ = model(changed)
    torch.testing.assert_close(changed_logits[:, :9], logits[:, :9])
    assert not torch.allclose(changed_logits[:, 9:], logits[:, 9:])


def test_tiny_model_overfits_one_batch():
    model = tiny_gpt()
    idx = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, first_loss = model(inputs, targets)
    for _ in range(60):
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first_loss.item() > 2.0
    assert loss.item() < 0.2


def test_n_embd_not_divisible_by_n_head_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model\.n_embd=100 is not divisible by model\.n_head=3"):
        GPTConfig(vocab_size=VOCAB, n_embd=100, n_head=3)


def test_input_longer_than_block_size_is_a_clear_error():
    model = tiny_gpt(block_size=8)
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="9 positions is longer than block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_generate_extends_the_prompt_with_valid_ids():
    model = tiny_gpt(block_size=8).eval()
    prompt = torch.randint(0, VOCAB, (2, 3))
    out = model.generate(prompt, max_new_tokens=20)
    assert out.shape == (2, 23)
    assert torch.equal(out[:, :3], prompt)
    assert out.min() >= 0 and out.max() < VOCAB


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading_shape", [(1, 1), (3, 1), (2, 4), (9,)])
def test_linear_few_rows_path_computes_what_nn_linear_does(bias, leading_shape):
    torch.manual_seed(0)
    layer = Linear(24, 10, bias=bias)
    x = torch.randn(*leading_shape, 24)
    with torch.no_grad():  # outside autograd: a few rows take the bmm kernel
        y = layer(x)
    assert y.shape == (*leading_shape, 10)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))


def test_rope_attention_scores_depend_only_on_relative_position():
    rotary = Rotary(head_size=8, block_size=32)
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    at_start = rotary(q, 0) @ rotary(k, 0).transpose(-2, -1)
    shifted = rotary(q, 7) @ rotary(k, 7).transpose(-2, -1)
    torch.testing.assert_close(shifted, at_start)
    assert not torch.allclose(rotary(q, 0), q)  # positions > 0 are rotated
    assert tiny_gpt(position="rope").pos_emb is None


@pytest.mark.parametrize(
    "override, message",
    [
        ({"position": "sinusoidal"}, "model.position=sinusoidal is not one of: learned, rope"),
        ({"activation": "swish"}, "model.activation=swish is not one of: gelu, relu2"),
        ({"position": "rope", "n_embd": 30, "n_head": 2}, "head size n_embd / n_head = 15 must be even"),
        ({"logit_softcap": -1.0}, "model.logit_softcap=-1.0 must be 0"),
    ],
)
def test_unknown_architecture_options_are_clear_errors(override, message):
    with pytest.raises(UserError, match=message):
        tiny_gpt(**override)


def test_logit_softcap_bounds_the_logits_and_keeps_their_order():
    capped, plain = tiny_gpt(logit_softcap=2.0), tiny_gpt()
    with torch.no_grad():
        for model in (capped, plain):
            model.lm_head.weight.mul_(1000)  # logits far beyond the cap
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    capped_logits, _ = capped(idx)
    plain_logits, _ = plain(idx)
    assert plain_logits.abs().max() > 10 and capped_logits.abs().max() <= 2.0
    torch.testing.assert_close(capped_logits, 2.0 * torch.tanh(plain_logits / 2.0))


def test_zero_initialised_projections_make_every_block_start_as_the_identity():
    model = tiny_gpt(zero_init_proj=True)
    projections = [p for name, p in model.named_parameters() if name.endswith("proj.weight")]
    assert len(projections) == 2 * model.config.n_layer and all(not p.any() for p in projections)
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(8))
    for block in model.blocks:
        torch.testing.assert_close(block(x, idx), x)
    # ... and they learn: one step moves them off zero.
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert all(p.grad.any() for p in projections)


def test_qk_norm_gives_unit_rms_queries_and_keys_to_attention(monkeypatch):
    model = tiny_gpt(qk_norm=True, position="rope")
    seen = []
    real_attention = model_module.causal_attention
    monkeypatch.setattr(
        model_module, "causal_attention", lambda q, k, v, p: seen.append((q, k)) or real_attention(q, k, v, p)
    )
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(100)  # queries and keys far from unit RMS
        model(torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0)))
    for q, k in seen:  # rotation keeps each position's norm, so RMS stays 1 after RoPE
        for t in (q, k):
            rms = t.square().mean(-1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)


def test_value_embeddings_reach_the_values_and_train_with_the_other_tables():
    model = tiny_gpt(value_embeddings=True)
    tables = [block.attn.value_embedding for block in model.blocks]
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    before, _ = model(idx)
    with torch.no_grad():
        tables[-1].weight[idx[0, 0]] += 1.0  # the last layer's value for one token
    after, _ = model(idx)
    assert not torch.allclose(before, after)
    (_, embeddings, _) = parameter_groups(model)
    assert {id(table.weight) for table in tables} <= {id(p) for p in embeddings["params"]}


def test_smear_adds_a_share_of_the_previous_characters_embedding_and_starts_at_none():
    model = tiny_gpt(smear=True, position="rope")  # no position table: the first block sees the embeddings
    idx = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(idx)
    embeddings = model.tok_emb(idx)
    torch.testing.assert_close(seen[-1], embeddings)  # the share starts at zero
    with torch.no_grad():
        model.smear.copy_(torch.linspace(-1.0, 1.0, 32))
    model(idx)
    previous = torch.cat([torch.zeros_like(embeddings[:, :1]), embeddings[:, :-1]], dim=1)
    torch.testing.assert_close(seen[-1], embeddings + model.smear * previous)
    (_, _, no_decay) = parameter_groups(model)
    assert any(p is model.smear for p in no_decay["params"])


@pytest.mark.parametrize("n_layer", [4, 5])
def test_unet_skips_add_each_first_half_output_to_its_mirror_blocks_input(n_layer):
    model = tiny_gpt(unet_skips=True, n_layer=n_layer)
    assert model.skip_weights.tolist() == [1.0, 1.0]  # both skips on from the start
    idx = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs, outputs = [], []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: inputs.append(args[0]) or outputs.append(out))
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.5, -2.0]))
        model(idx)
    # Block 0 pairs with the last, block 1 with the one before it; an odd middle block has none.
    last = n_layer - 1
    torch.testing.assert_close(inputs[last], outputs[last - 1] + 0.5 * outputs[0])
    torch.testing.assert_close(inputs[last - 1], outputs[last - 2] + -2.0 * outputs[1])
    for layer in range(1, n_layer - 2):
        torch.testing.assert_close(inputs[layer], outputs[layer - 1])
    (_, _, no_decay) = parameter_groups(model)
    assert any(p is model.skip_weights for p in no_decay["params"])


def test_without_unet_skips_the_model_has_no_skip_weights():
    assert tiny_gpt().skip_weights is None
    assert tiny_gpt(unet_skips=True, n_layer=1).skip_weights.numel() == 0
