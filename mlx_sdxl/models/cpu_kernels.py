"""The activations and attention of the models, with MLX-CPU's float32 arithmetic kernels.

The models call `silu`, `geglu`, `attention`, `geglu_halves` and `by_row_chunks`
from here. Each one asks `use_cpu_kernels(x)`, the one switch between two paths:

- plain (GPU, any non-float32 dtype, or no C++ compiler for MLX's CPU kernels):
  MLX's own ops, `nn.silu`, `nn.gelu` and `mx.fast.scaled_dot_product_attention`;
- CPU float32: the same functions as plain arithmetic. MLX-CPU evaluates exp,
  erf and sigmoid one element at a time through library calls, while compiled
  chains of adds, multiplies and integer bit operations become vectorised loops.
  So SiLU, the GEGLU gate and the attention softmax use the polynomials MLX's CPU
  exp and erf use (Cephes exp2, Abramowitz-Stegun 7.1.26); results equal MLX's
  ops up to float32 rounding. Attention scores and feed-forward activations are
  also computed a chunk of tokens at a time (see CPU_CHUNK_BYTES).
"""

from __future__ import annotations

import math
import shutil
from functools import lru_cache
from typing import Callable, Tuple

import mlx.core as mx
import mlx.nn as nn

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: y + _ROUND holds round(y) in its low mantissa bits
_EXP2 = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
         2.402264791363012e-1, 6.931472028550421e-1, 1.0)  # 2**f on [-1/2, 1/2], highest power first
_ERF = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)

# On the CPU, attention scores and feed-forward hidden activations are computed a
# chunk of tokens at a time, each chunk's arrays about this size: they stay in
# cache, and come from malloc's heap (blocks over 32 MB are fresh mmaps, whose
# pages fault in on every use).
CPU_CHUNK_BYTES = 4 << 20


@lru_cache(maxsize=None)
def _can_compile_cpu() -> bool:
    return shutil.which("g++") is not None  # MLX builds compiled CPU kernels with g++


def use_cpu_kernels(x: mx.array) -> bool:
    """The backend switch: True where the CPU arithmetic kernels replace MLX's ops for `x`
    (float32 on the CPU device, with a C++ compiler for MLX's compiled kernels)."""
    return x.dtype == mx.float32 and mx.default_device().type == mx.cpu and _can_compile_cpu()


# ----------------------------------------------------------------------------- exp and erf as arithmetic


def _max0(n: mx.array) -> mx.array:
    """max(n, 0) for int32, branch-free."""
    return mx.bitwise_and(n, mx.bitwise_invert(mx.right_shift(n, 31)))


@mx.compile
def _exp_parts(x: mx.array):
    """exp(x) = p * 2**i: p = 2**f by polynomial (Estrin form), with i = round(x log2 e) in s's low bits."""
    y = x * _LOG2E
    s = y + _ROUND
    f = y - (s - _ROUND)
    f2 = f * f
    c = _EXP2
    p = (c[6] + c[5] * f + f2 * (c[4] + c[3] * f)) + (f2 * f2) * (c[2] + c[1] * f + f2 * c[0])
    return p, s


@mx.compile
def _pow2_bits(s_bits: mx.array) -> mx.array:
    """The float32 bits of 2**i (0 below 2**-126, inf above 2**127) from the bits of s = i + 1.5 * 2**23."""
    n = _max0(_max0(s_bits) - (0x4B400000 - 127))  # biased exponent i + 127, at least 0
    d = n - 255
    n = 255 + mx.bitwise_and(d, mx.right_shift(d, 31))  # at most 255
    return mx.left_shift(n, 23)


def _exp(x: mx.array):
    """(p, 2**i) with exp(x) = p * 2**i, float32 (inputs beyond ±1e19 give NaN)."""
    p, s = _exp_parts(x)
    return p, _pow2_bits(s.view(mx.int32)).view(mx.float32)


@mx.compile
def _erf_parts(g):
    """For erf(|g|/√2) = 1 - r * exp(q) (A&S 7.1.26): q = -(g²/2), r = t * poly(t), t = 1 / (1 + k|g|/√2)."""
    a = mx.abs(g) * (1 / math.sqrt(2))
    t = 1.0 / (1.0 + 0.3275911 * a)
    c = _ERF
    t2 = t * t
    r = t * ((c[4] + c[3] * t) + t2 * (c[2] + c[1] * t + t2 * c[0]))
    return -(a * a), r


# ----------------------------------------------------------------------------- activations


@mx.compile
def _silu_from(x, p, scale):
    return x / (1.0 + p * scale)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) = x / (1 + exp(-x))."""
    if not use_cpu_kernels(x):
        return nn.silu(x)
    return _silu_from(x, *_exp(-x))


@mx.compile
def _geglu_from(h, g, r, p, scale):
    # h * g * (1 + erf(g/√2)) / 2, with g * erf(g/√2) = |g| * erf(|g|/√2)
    return 0.5 * h * (g + mx.abs(g) * (1.0 - r * p * scale))


@mx.compile
def _geglu_fused(h, gate):  # one kernel, also in eager mode (the halves are strided views)
    return h * nn.gelu(gate)


def geglu(h: mx.array, gate: mx.array) -> mx.array:
    """h * gelu(gate), exact (erf) GELU."""
    if not use_cpu_kernels(gate):
        if mx.default_device().type == mx.cpu and not _can_compile_cpu():
            return h * nn.gelu(gate)
        return _geglu_fused(h, gate)
    q, r = _erf_parts(gate)
    return _geglu_from(h, gate, r, *_exp(q))


def geglu_halves(proj: nn.Module, x: mx.array) -> Tuple[mx.array, mx.array]:
    """(h, gate): the two halves of `proj(x)` that a GEGLU multiplies. With the CPU kernels
    and a dense nn.Linear they are two matmuls, so the gate kernels read contiguous arrays."""
    if use_cpu_kernels(x) and isinstance(proj, nn.Linear):
        w, b = proj.weight, proj.bias
        d = w.shape[0] // 2
        return mx.addmm(b[:d], x, w[:d].T), mx.addmm(b[d:], x, w[d:].T)
    h, gate = mx.split(proj(x), 2, axis=-1)
    return h, gate


def by_row_chunks(f: Callable[[mx.array], mx.array], x: mx.array, width: int) -> mx.array:
    """f(x) for a row-wise f on (..., dim) arrays that keeps the last dimension. With the CPU
    kernels, f runs on a few rows at a time so that its (rows, width) float32 intermediates
    stay about CPU_CHUNK_BYTES."""
    if not use_cpu_kernels(x):
        return f(x)
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, CPU_CHUNK_BYTES // (4 * width))
    if step >= rows.shape[0]:
        return f(x)
    out = [f(rows[i:i + step]) for i in range(0, rows.shape[0], step)]
    return mx.concatenate(out, axis=0).reshape(x.shape)


# ----------------------------------------------------------------------------- attention


def _attention_rows(q, kt, v):
    s = q @ kt
    p, b = _exp_parts(s - s.max(axis=-1, keepdims=True))
    e = p * _pow2_bits(b.view(mx.int32)).view(mx.float32)
    # normalising after the second matmul divides (tokens, dim) values, not (tokens, tokens)
    return (e @ v) / e.sum(axis=-1, keepdims=True)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q kᵀ · scale) v over (B, heads, tokens, dim) arrays."""
    if not use_cpu_kernels(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    # per-head matrices laid out once (the matmuls would copy strided operands at every chunk)
    q, k, v = mx.contiguous(q * scale), mx.contiguous(k), mx.contiguous(v)
    kt = k.swapaxes(-1, -2)
    b, h, n, _ = q.shape
    rows = max(1, CPU_CHUNK_BYTES // (4 * b * h * k.shape[2]))
    if rows >= n:
        return _attention_rows(q, kt, v)
    return mx.concatenate([_attention_rows(q[:, :, i:i + rows], kt, v) for i in range(0, n, rows)], axis=2)
