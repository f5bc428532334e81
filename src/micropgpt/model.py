"""A character-level GPT in one file: pure PyTorch, no Lightning, no Hydra.

    ids -> token embedding + position embedding -> n_layer x Block -> LayerNorm -> Linear -> logits
    Block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x))      (pre-LayerNorm, as GPT-2)

`generate` samples with a key/value cache: the prompt runs once, then every new character costs
one position of attention per layer against the cached keys and values, and one row through each
weight matrix (`Linear` below makes that row cheap on the CPU).

Dropout on the CPU: PyTorch draws each Bernoulli decision from a serial, double-precision random
stream and `scaled_dot_product_attention` with `dropout_p > 0` leaves its fused kernel for the
unfused math path, which together make a dropout-0.2 step ~1.4x the cost of a dropout-0 step.
`dropout` and `causal_attention` below compute the same thing in eager CPU training more cheaply;
on GPUs and under torch.compile the standard ops are used, whose kernels are already fused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from micropgpt.errors import UserError


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = True
    # Off in the seed model; options for short, compute-bound runs (experiment=cpu_2min):
    position: str = "learned"  # "learned": a position embedding table; "rope": rotary, in attention
    activation: str = "gelu"  # the MLP's: "gelu", or "relu2" (ReLU squared)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name}={getattr(self, name)} must be at least 1")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "each head gets n_embd / n_head channels; pick values where it divides"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")
        for name, choices in (("position", POSITIONS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in choices:
                raise UserError(f"model.{name}={getattr(self, name)} is not one of: {', '.join(choices)}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(
                f"model.position=rope rotates channel pairs: head size n_embd / n_head = "
                f"{self.n_embd // self.n_head} must be even"
            )


POSITIONS = ("learned", "rope")
ACTIVATIONS = ("gelu", "relu2")


def keep_mask(shape: torch.Size, keep_prob: float, device: torch.device) -> torch.Tensor:
    """Independent Bernoulli(keep_prob) decisions as a bool tensor of `shape`.

    Each decision compares 31 uniform random bits with keep_prob * 2^31, so the keep probability is
    exact to 2^-31. The bits come from 64-bit words (63 random bits each, read as two 31-bit
    halves), which the CPU generator draws ~5x faster per decision than `bernoulli_`.
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_()
    halves = words.view(torch.int32)[:numel].bitwise_and_(0x7FFFFFFF)
    return (halves < round(keep_prob * 2**31)).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout: zero each element with probability p, scale the rest by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    return x * keep_mask(x.shape, 1.0 - p, x.device) * (1.0 / (1.0 - p))


class Dropout(nn.Module):
    """nn.Dropout through `dropout` above."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _CausalAttentionWithDropout(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + causal mask), dropout on those weights, times v; with its backward.

    What `scaled_dot_product_attention(..., dropout_p=p, is_causal=True)` computes, in fewer
    passes over the (B, H, T, T) weights than its CPU math path: the masks are bool, no check for
    fully masked rows (a causal row always sees itself), the 1 / (1 - p) scale is applied to the
    (B, H, T, head_size) output instead of the weights.
    """

    @staticmethod
    # Under CPU autocast (bf16-mixed) in float32: the hand-written backward then sees one dtype,
    # whatever autocast would have chosen for each op.
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        T, head_size = q.size(-2), q.size(-1)
        scale = 1.0 / math.sqrt(head_size)
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
        weights = torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)
        keep = keep_mask(weights.shape, 1.0 - p, weights.device)
        dropped = weights * keep
        ctx.save_for_backward(q, k, v, weights, keep, dropped)
        ctx.scale, ctx.keep_scale = scale, 1.0 / (1.0 - p)
        return torch.matmul(dropped, v).mul_(ctx.keep_scale)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, weights, keep, dropped = ctx.saved_tensors
        grad_out = grad_out * ctx.keep_scale
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out)
        grad_weights = torch.matmul(grad_out, v.transpose(-2, -1)).mul_(keep)
        grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal scaled dot-product attention of (B, n_head, T, head_size) tensors, with dropout_p on
    the attention weights."""
    if dropout_p > 0.0 and q.device.type == "cpu" and not torch.compiler.is_compiling():
        return _CausalAttentionWithDropout.apply(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class KVCache:
    """Keys and values of the positions seen so far, one preallocated buffer per layer."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        head_size = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled; every layer is filled to the same length
        self.capacity = config.block_size

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values and return all of them so far."""
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class Linear(nn.Linear):
    """nn.Linear, with a faster kernel for a few rows on the CPU outside autograd.

    Decoding with the KV cache sends one row per sequence through every weight matrix, so each
    step reads all the weights once. For such a (rows, in) x (in, out) product on the CPU, torch's
    addmm calls MKL's gemm, which on the AMD EPYC of README's measurements (torch 2.13) reads the
    weights at ~14 GB/s; the same product as two (out/2, in) x (in, rows) halves of one bmm goes to
    a kernel that reads them at ~60 GB/s: KV-cache decoding 1.7x faster (benchmarks/generate.py).
    Training, validation and prompts (many rows) take nn.Linear's path. Same result up to float
    rounding.
    """

    FEW_ROWS = 8  # measured faster here for 1 to 8 rows; from 16 rows bmm calls the same gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (
            rows > self.FEW_ROWS
            or self.out_features % 2
            or x.device.type != "cpu"
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
        ):
            return super().forward(x)
        halves = self.weight.view(2, self.out_features // 2, self.in_features)
        columns = x.reshape(rows, self.in_features).T.expand(2, -1, -1)
        if self.bias is None:
            y = torch.bmm(halves, columns)
        else:
            y = torch.baddbmm(self.bias.view(2, -1, 1), halves, columns)
        return y.view(self.out_features, rows).T.reshape(*x.shape[:-1], self.out_features)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021): rotates each pair of query/key
    channels by an angle proportional to the position, so q . k depends on relative distance."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        frequencies = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), frequencies)
        # Derived from the config, not learned: kept out of checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: (B, n_head, T, head_size) at positions start, start + 1, ..."""
        T = x.size(-2)
        cos, sin = self.cos[start : start + T].to(x.dtype), self.sin[start : start + T].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)
        head_size = config.n_embd // config.n_head
        self.rotary = Rotary(head_size, config.block_size) if config.position == "rope" else None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            start = cache.length if cache is not None else 0
            q, k = self.rotary(q, start), self.rotary(k, start)
        # Without a cache, or filling an empty one, position t sees positions <= t. A single new
        # position appended to a cache sees every cached position, so it needs no mask at all.
        is_causal = cache is None or cache.length == 0
        if cache is not None:
            if T > 1 and cache.length > 0:
                raise ValueError("a KV cache takes several positions only when it is empty")
            k, v = cache.append(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if is_causal and T > 1:
            y = causal_attention(q, k, v, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.activation = F.gelu if config.activation == "gelu" else relu_squared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.activation(self.fc(x))))


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """ReLU(x)^2 (So et al. 2021, "Primer"): with RoPE, 0.03 to 0.05 lower val loss than GELU with
    learned positions in the cpu_2min search (README, Performance)."""
    return F.relu(x).square()


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = (
            nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        )
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance does not grow
        # with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position of `idx` (B, T); with `targets`, also the cross-entropy loss.

        With a `cache`, `idx` continues the cached positions, which are not recomputed.
        """
        start = cache.length if cache is not None else 0
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} positions is longer than block_size={self.config.block_size}"
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        kv_cache: bool = True,
        cache_keep: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend `idx` (B, T) by `max_new_tokens` sampled ids and return the whole (B, T + new)."""
        new = list(
            self.generate_stream(
                idx, max_new_tokens, temperature, top_k, top_p, kv_cache, cache_keep, generator
            )
        )
        return torch.cat([idx, *new], dim=1)

    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        kv_cache: bool = True,
        cache_keep: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield each new (B, 1) column of ids as soon as it is sampled.

        temperature=0 picks the most likely character. `top_k` keeps the k most likely, `top_p`
        the smallest set whose probability reaches p (nucleus sampling).

        Learned absolute positions stop at block_size, so a longer sequence must drop its oldest
        characters. Without the cache (`kv_cache=False`, nanoGPT's way) the last block_size
        characters are re-run for every new one: exact, but each step costs a whole forward pass.
        With the cache, a full cache is rebuilt once from the last `cache_keep` characters
        (default block_size // 2) at positions 0.., and generation continues one position per
        step: every character still conditions on at least `cache_keep` previous ones.

        Arguments are checked here, before the first id is produced, not at the first `next()`.
        """
        validate_sampling(max_new_tokens, temperature, top_k, top_p)
        block_size = self.config.block_size
        keep = block_size // 2 if cache_keep is None else cache_keep
        if not 1 <= keep <= block_size:
            raise UserError(f"cache_keep={keep} must be between 1 and block_size={block_size}")
        if idx.size(1) == 0:
            raise UserError("the prompt is empty: give at least one character to continue from")
        pick = _sampler(temperature, top_k, top_p, generator)
        if kv_cache:
            return self._stream_with_cache(idx, max_new_tokens, pick, keep)
        return self._stream_without_cache(idx, max_new_tokens, pick)

    @torch.no_grad()
    def _stream_without_cache(
        self, idx: torch.Tensor, max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor]
    ) -> Iterator[torch.Tensor]:
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            next_id = pick(logits[:, -1])
            idx = torch.cat([idx, next_id], dim=1)
            yield next_id

    @torch.no_grad()
    def _stream_with_cache(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        pick: Callable[[torch.Tensor], torch.Tensor],
        keep: int,
    ) -> Iterator[torch.Tensor]:
        if max_new_tokens == 0:
            return
        cache = KVCache(self.config, idx.size(0), idx.device, self.lm_head.weight.dtype)
        logits, _ = self(idx[:, -self.config.block_size :], cache=cache)
        for step in range(max_new_tokens):
            next_id = pick(logits[:, -1])
            yield next_id
            if step == max_new_tokens - 1:
                break
            idx = torch.cat([idx, next_id], dim=1)
            if cache.length == cache.capacity:
                cache.length = 0
                logits, _ = self(idx[:, -keep:], cache=cache)
            else:
                logits, _ = self(next_id, cache=cache)


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


def _sampler(
    temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from last-position logits (B, V) to next ids (B, 1)."""

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
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)

    return pick
