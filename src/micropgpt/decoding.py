"""Autoregressive decoding: how a GPT picks its next characters, one at a time.

`generate_stream` checks the sampling options, then yields each new column of ids: the sampler
(temperature, top-k, top-p) picks from the last position's logits, and the loop runs the GPT
with its KV cache (or, with kv_cache=False, over the whole window each time). Every row of the
batch is one sample; `row_generators` gives each row its own random stream. `GPT.generate`
collects it; micropgpt.sampling turns it into text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from micropgpt.errors import UserError

if TYPE_CHECKING:  # model.py imports this module for GPT.generate
    from micropgpt.model import GPT

# One generator for the whole batch, one per row, or None for torch's global generator.
Generators = torch.Generator | Sequence[torch.Generator] | None


def row_generators(seed: int | None, num_rows: int, device: torch.device) -> list[torch.Generator] | None:
    """One random stream per row, so a row's sample depends only on `seed` and its row number.

    Row 0 is seeded with `seed` itself (one sample is what a single seeded generator gives), row
    r > 0 with 63 bits of BLAKE2b of "seed,r" (not seed + r, which would give seed s's second row
    the stream of seed s + 1's first). seed=None: None, a fresh draw from torch's global generator.
    """
    if seed is None:
        return None
    seeds = [seed] + [
        int.from_bytes(hashlib.blake2b(f"{seed},{row}".encode(), digest_size=8).digest(), "big") >> 1
        for row in range(1, num_rows)
    ]
    return [torch.Generator(device).manual_seed(row_seed) for row_seed in seeds]


def validate_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be 0 or more")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be 0 (greedy) or more")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} must be at least 1 (or null for no limit)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p} must be in (0, 1] (or null for no limit)")


def sampler(
    temperature: float, top_k: int | None, top_p: float | None, generator: Generators
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from last-position logits (B, V) to next ids (B, 1); with one generator per row,
    row r draws from generator[r] only, so it samples what it would sample alone."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.size(-1):
            # Exactly k survive, also when several logits tie with the k-th largest.
            kept = torch.topk(logits, top_k, dim=-1)
            logits = torch.full_like(logits, float("-inf")).scatter(-1, kept.indices, kept.values)
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Drop a character when the more likely ones already reach top_p; the first always stays.
            drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return inverse_cdf(logits.softmax(dim=-1), uniforms(logits.size(0), generator, logits.device))

    return pick


def uniforms(rows: int, generator: Generators, device: torch.device) -> torch.Tensor:
    """One uniform number in [0, 1) per row, (rows, 1): with one generator per row, row r's from
    generator[r] alone, so a row draws the same number in a batch as it would alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(rows, 1, generator=generator, device=device)
    return torch.cat([torch.rand(1, generator=g, device=device) for g in generator]).view(rows, 1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row r of probs (B, V) sampled with its uniform u[r] (B, 1): the first id whose cumulative
    probability exceeds u[r] times the row's total.

    One op for the whole batch, where torch.multinomial would take one call per row generator.
    A float cumsum of non-negative terms never decreases and rises only at ids of nonzero
    probability, so a zero-probability id (masked by top-k or top-p) is never picked while the
    threshold stays below the total: scaling by the total, not comparing u with a cumsum that
    rounds to a little under 1, keeps it there, since float32 u * total < total for any u < 1.
    """
    cdf = probs.cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)


def generate_stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    kv_cache: bool = True,
    cache_keep: int | None = None,
    generator: Generators = None,
) -> Iterator[torch.Tensor]:
    """Yield each new (B, 1) column of ids that `model` samples after `idx` (B, T), as soon as it is
    sampled.

    temperature=0 picks the most likely character. `top_k` keeps the k most likely, `top_p`
    the smallest set whose probability reaches p (nucleus sampling). `generator` is one
    torch.Generator for the batch or a sequence of one per row (`row_generators`).

    Learned absolute positions stop at block_size, so a longer sequence must drop its oldest
    characters. Without the cache (`kv_cache=False`, nanoGPT's way) the last block_size
    characters are re-run for every new one: exact, but each step costs a whole forward pass.
    With the cache, a full cache is rebuilt once from the last `cache_keep` characters
    (default block_size // 2) at positions 0.., and generation continues one position per
    step: every character still conditions on at least `cache_keep` previous ones.

    Arguments are checked here, before the first id is produced, not at the first `next()`.
    """
    validate_sampling(max_new_tokens, temperature, top_k, top_p)
    block_size = model.config.block_size
    keep = block_size // 2 if cache_keep is None else cache_keep
    if not 1 <= keep <= block_size:
        raise UserError(f"cache_keep={keep} must be between 1 and block_size={block_size}")
    if idx.size(1) == 0:
        raise UserError("the prompt is empty: give at least one character to continue from")
    if not (generator is None or isinstance(generator, torch.Generator)) and len(generator) != idx.size(0):
        raise ValueError(f"{len(generator)} generators for a batch of {idx.size(0)} rows: give one per row")
    pick = sampler(temperature, top_k, top_p, generator)
    if kv_cache:
        return _stream_with_cache(model, idx, max_new_tokens, pick, keep)
    return _stream_without_cache(model, idx, max_new_tokens, pick)


@torch.no_grad()
def _stream_without_cache(
    model: GPT, idx: torch.Tensor, max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[torch.Tensor]:
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        next_id = pick(logits[:, -1])
        idx = torch.cat([idx, next_id], dim=1)
        yield next_id


@torch.no_grad()
def _stream_with_cache(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    keep: int,
) -> Iterator[torch.Tensor]:
    if max_new_tokens == 0:
        return
    cache = model.new_kv_cache(idx.size(0))
    logits, _ = model(idx[:, -model.config.block_size :], cache=cache)
    # The whole sequence in one preallocated buffer, for the rebuilds to read their last `keep`
    # ids from: a torch.cat per step would copy the sequence so far every time.
    ids = torch.cat([idx, idx.new_empty(idx.size(0), max_new_tokens)], dim=1)
    end = idx.size(1)
    for step in range(max_new_tokens):
        next_id = pick(logits[:, -1])
        yield next_id
        if step == max_new_tokens - 1:
            break
        ids[:, end : end + 1] = next_id
        end += 1
        if cache.length == cache.capacity:
            cache.length = 0
            logits, _ = model(ids[:, end - keep : end], cache=cache)
        else:
            logits, _ = model(next_id, cache=cache)
