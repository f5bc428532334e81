"""A character-level GPT in one file: pure PyTorch, no Lightning, no Hydra.

    ids -> token embedding + position embedding -> n_layer x Block -> LayerNorm -> Linear -> logits
    Block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x))      (pre-LayerNorm, as GPT-2)

`KVCache` keeps the keys and values of the positions seen so far, so that generating a character
costs one position of attention per layer instead of a forward pass over the whole window;
`GPT.generate` samples with it (the decoding loop and the sampler are in micropgpt.decoding).

`Dropout`, `Linear`, `causal_attention` and `relu_squared` are nn.Dropout, nn.Linear, causal
scaled_dot_product_attention and F.relu(x).square() with faster paths for eager training and
decoding on the CPU (micropgpt.cpu_kernels); elsewhere they are the standard ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from micropgpt.cpu_kernels import Dropout, Linear, causal_attention, relu_squared
from micropgpt.decoding import Generators, generate_stream
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
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    zero_init_proj: bool = False  # residual projections start at zero: every block starts as identity
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap); 0: off
    value_embeddings: bool = False  # each attention layer adds a learned embedding of the token to v
    smear: bool = False  # each position's embedding gets a learned share of the previous one's
    unet_skips: bool = False  # the second half of the blocks also gets the first half's outputs

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
        if self.logit_softcap < 0:
            raise UserError(f"model.logit_softcap={self.logit_softcap} must be 0 (off) or more")
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


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021): rotates each pair of query/key
    channels by an angle proportional to the position, so q . k depends on relative distance."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        frequencies = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), frequencies)
        # Channel i of the first half pairs with channel i of the second: x = (a, b) turns into
        # (a cos - b sin, b cos + a sin) = x * (cos, cos) + (b, a) * (-sin, sin).
        # Derived from the config, not learned: kept out of checkpoints.
        self.register_buffer("cos", angles.cos().repeat(1, 2), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: (B, n_head, T, head_size) at positions start, start + 1, ..."""
        T = x.size(-2)
        cos, sin = self.cos[start : start + T].to(x.dtype), self.sin[start : start + T].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([second, first], dim=-1) * sin


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
        self.qk_norm = config.qk_norm
        # modded-nanogpt's value embeddings: the token's identity reaches every layer's values
        # directly, not only through the residual stream.
        self.value_embedding = (
            nn.Embedding(config.vocab_size, config.n_embd) if config.value_embeddings else None
        )

    def forward(
        self, x: torch.Tensor, idx: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        if self.value_embedding is not None:
            v = v + self.value_embedding(idx)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            # Unit-RMS queries and keys bound the attention logits, so a large lr cannot blow them up
            # (Dehghani et al. 2023; modded-nanogpt).
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
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
        # relu2: ReLU(x)^2 (So et al. 2021, "Primer"); with RoPE it beat GELU with learned positions
        # in the cpu_2min search (README, Performance).
        self.activation = F.gelu if config.activation == "gelu" else relu_squared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.activation(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, idx: torch.Tensor, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """x: the residual stream at the ids `idx` (B, T)."""
        x = x + self.attn(self.ln_1(x), idx, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = (
            nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        )
        # modded-nanogpt's smear: a per-channel share of the previous character's embedding, from
        # zero, so that the first layer sees the last two characters without attending.
        self.smear = nn.Parameter(torch.zeros(config.n_embd)) if config.smear else None
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # modded-nanogpt's U-net: block i of the first half hands its output to block n_layer-1-i of
        # the second, which adds it at a learned weight (from one) to its input.
        self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2)) if config.unet_skips else None
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections so the residual stream's variance does not grow
        # with depth; or start them at zero (modded-nanogpt), so that each block first learns what
        # to add.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
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
        if self.smear is not None:
            x = x + self.smear * self._previous_embeddings(x, cache)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        skips = []
        for layer, block in enumerate(self.blocks):
            mirror = self.config.n_layer - 1 - layer
            if self.skip_weights is not None and mirror < len(self.skip_weights):
                x = x + self.skip_weights[mirror] * skips.pop()
            x = block(x, idx, cache, layer)
            if self.skip_weights is not None and layer < len(self.skip_weights):
                skips.append(x)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))
        if self.config.logit_softcap > 0:
            # Bounded logits keep the output head from growing overconfident early (Gemma 2).
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @staticmethod
    def _previous_embeddings(x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """x (B, T, C) shifted one position later: each position gets the embedding before it; the
        first gets the cache's last (zeros when there is none, as at the start of a window)."""
        previous = F.pad(x[:, :-1], (0, 0, 1, 0))
        if cache is not None:
            if cache.length > 0:
                previous[:, 0] = cache.last_embedding
            cache.last_embedding = x[:, -1]
        return previous

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """An empty cache for `batch_size` sequences, on the model's device and in its dtype."""
        weight = self.lm_head.weight
        return KVCache(self.config, batch_size, weight.device, weight.dtype)

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
        generator: Generators = None,
    ) -> torch.Tensor:
        """Extend `idx` (B, T) by `max_new_tokens` sampled ids and return the whole (B, T + new).

        The arguments are micropgpt.decoding.generate_stream's, which explains them.
        """
        stream = generate_stream(
            self, idx, max_new_tokens, temperature, top_k, top_p, kv_cache, cache_keep, generator
        )
        return torch.cat([idx, *stream], dim=1)


class KVCache:
    """Keys and values of the positions seen so far, one preallocated buffer per layer."""

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        head_size = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled; every layer is filled to the same length
        self.last_embedding: torch.Tensor | None = None  # of the last position, for model.smear
        self.capacity = config.block_size

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values and return all of them so far."""
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
