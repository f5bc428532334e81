"""GPT.generate called directly: KV cache against the full recomputation, conditioning length past
block_size, and the sets top-k / top-p sample from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from micropgpt.decoding import inverse_cdf, row_generators
from micropgpt.model import GPT, GPTConfig

VOCAB = 13
BLOCK = 16


def random_gpt(dtype: torch.dtype = torch.float64, **options) -> GPT:
    """Random weights, sharpened so the next-character distribution is far from uniform.

    float64 keeps the cached and the full computation equal to well below any logit gap, so
    greedy choices compare exactly.
    """
    torch.manual_seed(0)
    options = {"n_layer": 2, **options}
    config = GPTConfig(VOCAB, block_size=BLOCK, n_head=2, n_embd=32, dropout=0.0, **options)
    model = GPT(config).to(dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
        if model.smear is not None:  # it starts at zero: a share that does something
            model.smear.normal_()
    return model


def prompt_of(length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("prompt_length", [1, 5, BLOCK - 4])
def test_greedy_with_cache_equals_without_while_sequence_fits(prompt_length):
    model = random_gpt()
    idx = prompt_of(prompt_length, batch=3)
    new = BLOCK - prompt_length  # the last sampled character still sees a sequence of block_size
    cached = model.generate(idx, new, temperature=0, kv_cache=True)
    uncached = model.generate(idx, new, temperature=0, kv_cache=False)
    assert torch.equal(cached, uncached)
    # The cached path must really be generating, not echoing a constant.
    assert len(set(cached[0, prompt_length:].tolist())) > 1


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"position": "rope"},
        {"activation": "relu2"},
        {"qk_norm": True, "position": "rope"},
        {"logit_softcap": 5.0},
        {"value_embeddings": True},
        {"smear": True},
        {"unet_skips": True, "n_layer": 3},
    ],
    ids=["seed", "rope", "relu2", "qk_norm", "softcap", "value_embeddings", "smear", "unet_skips"],
)
def test_cached_logits_match_full_forward_in_float32(options):
    model = random_gpt(torch.float32, **options)
    idx = prompt_of(3)
    with forward_calls(model) as logits_seen:
        ids = model.generate(idx, BLOCK - 3, temperature=0, kv_cache=True)
    for step, (length, logits) in enumerate(logits_seen):
        end = 3 + step
        assert length == end
        full, _ = model(ids[:, :end])
        torch.testing.assert_close(logits, full[:, -1], rtol=1e-4, atol=1e-4)


@contextmanager
def forward_calls(model: GPT) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Filled during generation: per forward call, the number of characters its last position
    attended to (the cache length after the call) and that position's logits."""
    calls = []

    def record(module, args, kwargs, output):
        calls.append((kwargs["cache"].length, output[0][:, -1].clone()))

    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("cache_keep", [None, 3, BLOCK - 1])
def test_past_block_size_every_character_conditions_on_at_least_cache_keep(cache_keep):
    model = random_gpt()
    keep = BLOCK // 2 if cache_keep is None else cache_keep
    prompt_length, new = 4, 5 * BLOCK
    with forward_calls(model) as calls:
        ids = model.generate(prompt_of(prompt_length), new, temperature=0, cache_keep=cache_keep)

    assert len(calls) == new  # one forward per character: the prompt, then a step or a rebuild each
    context_lengths = [length for length, _ in calls]
    assert min(context_lengths) >= min(keep, prompt_length)
    assert min(context_lengths[BLOCK:]) == keep  # rebuilds happened and kept exactly cache_keep
    assert max(context_lengths) == BLOCK
    for step, (length, logits) in enumerate(calls):
        end = prompt_length + step  # ids[:, end] is the character these logits chose
        # The logits are exactly those of the last `length` characters run from position 0 ...
        full, _ = model(ids[:, end - length : end])
        torch.testing.assert_close(logits, full[:, -1])
        assert ids[0, end] == logits.argmax()


def test_cache_keep_block_size_reproduces_crop_to_last_block():
    model = random_gpt()
    idx = prompt_of(2)
    # Rebuilding from the whole window on every step is what the no-cache path computes.
    cached = model.generate(idx, 3 * BLOCK, temperature=0, cache_keep=BLOCK)
    uncached = model.generate(idx, 3 * BLOCK, temperature=0, kv_cache=False)
    assert torch.equal(cached, uncached)
    # ... while the default half-window rebuild conditions on less, so it may diverge.
    assert not torch.equal(model.generate(idx, 3 * BLOCK, temperature=0), uncached)


def test_same_generator_seed_same_sample():
    model = random_gpt()
    idx = prompt_of(4)
    first = model.generate(idx, 40, generator=torch.Generator().manual_seed(7))
    again = model.generate(idx, 40, generator=torch.Generator().manual_seed(7))
    other = model.generate(idx, 40, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


ROWS = 5
CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "sampling",
    [{}, {"temperature": 0}, {"top_k": 3, "temperature": 2.0}, {"top_p": 0.9}, {"kv_cache": False}],
)
def test_batched_rows_equal_the_rows_sampled_one_by_one(dtype, sampling):
    # 3 x BLOCK characters: past block_size, so the cache is rebuilt on the way.
    model, idx = random_gpt(dtype), prompt_of(4)
    batched = model.generate(
        idx.repeat(ROWS, 1), 3 * BLOCK, generator=row_generators(3, ROWS, CPU), **sampling
    )
    alone = [model.generate(idx, 3 * BLOCK, generator=g, **sampling) for g in row_generators(3, ROWS, CPU)]
    assert torch.equal(batched, torch.cat(alone))
    if sampling.get("temperature") != 0:
        assert len({tuple(row) for row in batched.tolist()}) == ROWS  # each row its own stream


def test_row_streams_depend_on_the_seed_and_the_row_only():
    model, idx = random_gpt(), prompt_of(4).repeat(ROWS, 1)
    first = model.generate(idx, 40, generator=row_generators(7, ROWS, CPU))
    assert torch.equal(first, model.generate(idx, 40, generator=row_generators(7, ROWS, CPU)))
    assert torch.equal(first[:2], model.generate(idx[:2], 40, generator=row_generators(7, 2, CPU)))
    # Row 0 is what one generator seeded with the seed gives; another seed gives other rows.
    assert torch.equal(first[:1], model.generate(idx[:1], 40, generator=torch.Generator().manual_seed(7)))
    other = model.generate(idx, 40, generator=row_generators(8, ROWS, CPU))
    assert not any(torch.equal(row, other_row) for row in first for other_row in other)
    assert row_generators(None, ROWS, CPU) is None


DRAWS = 4000


def next_character_draws(model: GPT, idx: torch.Tensor, **sampling) -> set[int]:
    """The distinct next characters of DRAWS independent samples after `idx` (one batch)."""
    batch = idx.expand(DRAWS, -1)
    ids = model.generate(batch, 1, generator=torch.Generator().manual_seed(0), **sampling)
    return set(ids[:, -1].tolist())


def next_character_probs(model: GPT, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    logits, _ = model(idx)
    return (logits[0, -1].float() / temperature).softmax(-1)


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_top_k_samples_only_the_k_most_likely(top_k):
    model, idx = random_gpt(), prompt_of(6)
    allowed = set(next_character_probs(model, idx, 1.0).topk(top_k).indices.tolist())
    drawn = next_character_draws(model, idx, top_k=top_k, temperature=2.0)
    assert drawn == allowed  # never outside; with temperature 2 and 4000 draws, each one appears
    assert not next_character_draws(model, idx, temperature=2.0) <= allowed


@pytest.mark.parametrize(("top_p", "temperature"), [(0.5, 1.0), (0.9, 1.0), (0.9, 3.0), (1e-6, 1.0)])
def test_top_p_samples_only_the_nucleus(top_p, temperature):
    model, idx = random_gpt(), prompt_of(6)
    probs = next_character_probs(model, idx, temperature)
    sorted_probs, order = probs.sort(descending=True)
    # The smallest prefix of the most likely characters whose probability reaches top_p.
    size = int((sorted_probs.cumsum(0) < top_p).sum()) + 1
    nucleus = set(order[:size].tolist())
    drawn = next_character_draws(model, idx, top_p=top_p, temperature=temperature)
    assert drawn <= nucleus
    if top_p < 1e-3:
        assert drawn == {order[0].item()}
    assert not next_character_draws(model, idx, temperature=temperature) <= nucleus


def test_top_k_and_top_p_together_sample_their_intersection():
    model, idx = random_gpt(), prompt_of(6)
    probs = next_character_probs(model, idx, 3.0)
    top2 = set(probs.topk(2).indices.tolist())
    drawn = next_character_draws(model, idx, top_k=2, top_p=0.999, temperature=3.0)
    assert drawn == top2


def test_inverse_cdf_draws_each_id_with_its_probability_and_never_a_zero_one():
    probs = torch.tensor([0.0, 0.45, 0.0, 0.3, 0.05, 0.2, 0.0])
    draws = 40_000
    u = torch.rand(draws, 1, generator=torch.Generator().manual_seed(0))
    ids = inverse_cdf(probs.expand(draws, -1), u).view(-1)
    frequencies = torch.bincount(ids, minlength=probs.numel()) / draws
    assert torch.all(frequencies[probs == 0] == 0)
    # Within 5 standard deviations of a binomial frequency for each id.
    assert torch.all((frequencies - probs).abs() <= 5 * (probs * (1 - probs) / draws).sqrt())


def test_inverse_cdf_at_the_ends_of_u_picks_the_first_and_last_nonzero_ids():
    # Rows as top-k / top-p leave them: zeros on both sides, totals a little off 1 by rounding.
    probs = torch.rand(1000, 9, generator=torch.Generator().manual_seed(0))
    probs[:, :2] = probs[:, -3:] = 0
    probs /= probs.sum(-1, keepdim=True)
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    assert torch.all(inverse_cdf(probs, torch.zeros(1000, 1)) == 2)
    assert torch.all(inverse_cdf(probs, below_one.expand(1000, 1)) == 5)
