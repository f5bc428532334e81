"""CPU fast paths behind the GPT's standard operations: same results, fewer passes over memory.

model.py calls four things from here, each a drop-in for a standard PyTorch operation (and
`native_bf16` tells the recipes and Muon whether bf16 is fast on this CPU):

    Dropout / dropout     nn.Dropout / F.dropout
    causal_attention      F.scaled_dot_product_attention(q, k, v, dropout_p, is_causal=True)
    relu_squared          F.relu(x).square()
    Linear                nn.Linear

Why: on the CPU, PyTorch draws each Bernoulli decision of dropout from a serial, double-precision
random stream, `scaled_dot_product_attention` with `dropout_p > 0` leaves its fused kernel for
the unfused math path, and its flash kernel's backward is slow for small heads in bf16;
`dropout` and `causal_attention` compute the same thing in eager CPU training with cheaper random
bits and fewer passes over the attention weights. Autograd's backward of `F.relu(x).square()`
makes four passes over the MLP's widest activation; `relu_squared`'s makes two. `Linear` takes a
faster kernel for the few-row products of KV-cache decoding. Each is used only in eager mode on
the CPU; on GPUs and under torch.compile the standard ops run, whose kernels are already fused.
README's Performance section has the measurements.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere torch emulates
    bf16 matmuls, many times slower than float32 ones (README, Performance)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _eager_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def keep_mask(shape: torch.Size, keep_prob: float, device: torch.device) -> torch.Tensor:
    """Independent Bernoulli(keep_prob) decisions as a bool tensor of `shape`.

    Each decision compares 31 uniform random bits with keep_prob * 2^31, so the keep probability is
    exact to 2^-31. The bits come from 64-bit words (63 random bits each, read as two 31-bit
    halves), which the CPU generator draws faster per decision than `bernoulli_`.
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_()
    halves = words.view(torch.int32)[:numel].bitwise_and_(0x7FFFFFFF)
    return (halves < round(keep_prob * 2**31)).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout: zero each element with probability p, scale the rest by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    if not _eager_cpu(x):
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


class _CausalAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + causal mask), dropout p (may be 0) on those weights, times v; with
    its backward.

    What `scaled_dot_product_attention(..., dropout_p=p, is_causal=True)` computes. With p > 0, in
    fewer passes over the (B, H, T, T) weights than its CPU math path: the masks are bool, no check
    for fully masked rows (a causal row always sees itself), the 1 / (1 - p) scale is applied to
    the (B, H, T, head_size) output instead of the weights. With p = 0 in bf16, instead of the CPU
    flash kernel, whose bf16 backward is far slower for the small heads of short-run recipes
    (README, Performance); in float32 that kernel is the faster one.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        # Under CPU autocast (bf16-mixed) everything runs in autocast's dtype: torch's CPU softmax
        # and its backward compute in float32 inside for bf16 tensors, and the weights are kept in
        # bf16 between the products, as the flash kernel keeps them.
        ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else v.dtype
        with torch.autocast("cpu", enabled=False):
            q, k, v = (t.to(dtype) for t in (q, k, v))
            T, head_size = q.size(-2), q.size(-1)
            ctx.scale = 1.0 / math.sqrt(head_size)
            scaled_q = q * ctx.scale  # on the (T, head_size) queries, not the (T, T) scores
            scores = torch.matmul(scaled_q, k.transpose(-2, -1))
            future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
            weights = torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)
            keep = keep_mask(weights.shape, 1.0 - p, weights.device) if p > 0 else None
            dropped = weights * keep if p > 0 else weights
            ctx.save_for_backward(scaled_q, k, v, weights, keep, dropped)
            ctx.keep_scale = 1.0 / (1.0 - p)
            y = torch.matmul(dropped, v)
            return y.mul_(ctx.keep_scale) if p > 0 else y

    @staticmethod
    @once_differentiable  # a first-order backward: a second derivative through it raises
    def backward(ctx, grad_out: torch.Tensor):
        scaled_q, k, v, weights, keep, dropped = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.to(v.dtype) * ctx.keep_scale
            grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out)
            grad_weights = torch.matmul(grad_out, v.transpose(-2, -1))
            if keep is not None:
                grad_weights.mul_(keep)
            grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
            grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
            grad_k = torch.matmul(grad_scores.transpose(-2, -1), scaled_q)
        q_dtype, k_dtype, v_dtype = ctx.input_dtypes
        return grad_q.to(q_dtype), grad_k.to(k_dtype), grad_v.to(v_dtype), None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal scaled dot-product attention of (B, n_head, T, head_size) tensors, with dropout_p on
    the attention weights."""
    # Without dropout, the flash kernel is the fast one except for its backward in bf16 (training
    # under bf16-mixed, which runs attention in autocast's dtype).
    low_precision = q.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
    if _eager_cpu(q) and (dropout_p > 0.0 or (_needs_grad(q) and low_precision)):
        return _CausalAttention.apply(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class _ReluSquared(torch.autograd.Function):
    """relu(x)^2, keeping relu(x) for the backward: grad * 2 relu(x) is the whole gradient (zero
    where x < 0), two passes instead of autograd's pow, two products and the relu mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        positive = torch.relu(x)
        ctx.save_for_backward(positive)
        return positive.square()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (positive,) = ctx.saved_tensors
        return (positive + positive).mul_(grad_out)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """F.relu(x).square()."""
    if _eager_cpu(x) and _needs_grad(x):
        return _ReluSquared.apply(x)
    return F.relu(x).square()


class Linear(nn.Linear):
    """nn.Linear, with a faster kernel for a few rows on the CPU outside autograd.

    Decoding with the KV cache sends one row per sequence through every weight matrix, so each
    step reads all the weights once. For such a (rows, in) x (in, out) product on the CPU, torch's
    addmm calls MKL's gemm, which reads the weights slowly; the same product as two
    (out/2, in) x (in, rows) halves of one bmm goes to a kernel that reads them faster
    (benchmarks/generate.py measures it). Training, validation and prompts (many rows) take
    nn.Linear's path. Same result up to float rounding; same parameters, so the same state dict.
    """

    FEW_ROWS = 8  # faster here for 1 to 8 rows; from 16 rows bmm calls the same gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.FEW_ROWS or self.out_features % 2 or not _eager_cpu(x) or torch.is_grad_enabled():
            return super().forward(x)
        halves = self.weight.view(2, self.out_features // 2, self.in_features)
        columns = x.reshape(rows, self.in_features).T.expand(2, -1, -1)
        if self.bias is None:
            y = torch.bmm(halves, columns)
        else:
            y = torch.baddbmm(self.bias.view(2, -1, 1), halves, columns)
        # Rows back to contiguous (rows, out): a transposed view would send every later op of the
        # step, attention included, down its slow strided path.
        return y.view(self.out_features, rows).T.contiguous().view(*x.shape[:-1], self.out_features)
