"""Building blocks shared by the UNet and the VAE (NHWC, diffusers parameter names)."""

from __future__ import annotations

import math
import shutil
from functools import lru_cache
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

# ----------------------------------------------------------------------------- CPU kernels
# MLX-CPU evaluates exp, erf and sigmoid one element at a time through library
# calls (15-35 ns per float32 element on x86), while compiled chains of adds,
# multiplies and integer bit operations become vectorised loops. So in float32 on
# the CPU backend, SiLU, the GEGLU gate and the attention softmax are written as
# plain arithmetic with the polynomials MLX's CPU exp and erf use (Cephes exp2,
# Abramowitz-Stegun 7.1.26): results equal nn.silu / nn.gelu / fast sdpa up to
# float rounding (rel. L2 ~5e-8). Other devices and dtypes use those MLX ops.

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: y + _ROUND holds round(y) in its low mantissa bits
_EXP2 = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
         2.402264791363012e-1, 6.931472028550421e-1, 1.0)  # 2**f on [-1/2, 1/2], highest power first
_ERF = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


@lru_cache(maxsize=None)
def _can_compile_cpu() -> bool:
    return shutil.which("g++") is not None  # MLX builds compiled CPU kernels with g++


def use_cpu_kernels(x: mx.array) -> bool:
    """True where the arithmetic versions below replace MLX's activations."""
    return x.dtype == mx.float32 and mx.default_device().type == mx.cpu and _can_compile_cpu()


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
def _silu_from(x, p, scale):
    return x / (1.0 + p * scale)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) = x / (1 + exp(-x))."""
    if not use_cpu_kernels(x):
        return nn.silu(x)
    return _silu_from(x, *_exp(-x))


_silu = silu  # for GroupNorm, whose `silu` flag shadows the name


@mx.compile
def _erf_parts(g):
    """For erf(|g|/√2) = 1 - r * exp(q) (A&S 7.1.26): q = -(g²/2), r = t * poly(t), t = 1 / (1 + k|g|/√2)."""
    a = mx.abs(g) * (1 / math.sqrt(2))
    t = 1.0 / (1.0 + 0.3275911 * a)
    c = _ERF
    t2 = t * t
    r = t * ((c[4] + c[3] * t) + t2 * (c[2] + c[1] * t + t2 * c[0]))
    return -(a * a), r


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


# On the CPU, attention scores and feed-forward hidden activations are computed a
# chunk of tokens at a time, each chunk's arrays about this size: they stay in
# cache, and come from malloc's heap (blocks over 32 MB are fresh mmaps, whose
# pages fault in on every use).
CPU_CHUNK_BYTES = 4 << 20


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


class GroupNorm(nn.GroupNorm):
    """PyTorch-compatible GroupNorm over NHWC (diffusers' names: weight, bias);
    `silu=True` applies SiLU to the result."""

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__(groups, channels, eps=eps, pytorch_compatible=True)

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        y = super().__call__(x)
        return _silu(y) if silu else y


def group_norm(channels: int, eps: float, groups: int = 32) -> GroupNorm:
    return GroupNorm(groups, channels, eps)


class ResnetBlock2D(nn.Module):
    """GN → SiLU → conv → (+ time projection) → GN → SiLU → conv, plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int] = None,
                 groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = group_norm(in_channels, eps, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, eps, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: Optional[mx.array] = None) -> mx.array:
        h = self.conv1(self.norm1(x, silu=True))
        if temb is not None:
            h = h + self.time_emb_proj(silu(temb))[:, None, None, :]
        h = self.conv2(self.norm2(h, silu=True))
        shortcut = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return shortcut + h


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv. `padding=1` is the UNet's; `padding=0` is the VAE's
    asymmetric form, which pads only the bottom and right edges by one."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding == 0:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


def upsample_nearest(x: mx.array, size: Optional[Tuple[int, int]] = None) -> mx.array:
    """Nearest-neighbour 2× upsampling of NHWC `x`.

    With `size`, the result is cropped to (H, W); for targets of at most twice the
    input, this equals torch's `interpolate(size=..., mode="nearest")`.
    """
    b, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    if size is not None and tuple(size) != (2 * h, 2 * w):
        x = x[:, : size[0], : size[1], :]
    return x


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: Optional[Tuple[int, int]] = None) -> mx.array:
        return self.conv(upsample_nearest(x, size))


class Attention(nn.Module):
    """Multi-head attention with diffusers' names: to_q, to_k, to_v, to_out.0."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: Optional[int] = None,
                 bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim_head)
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = [nn.Linear(inner, query_dim)]

    def kv(self, context: mx.array) -> Tuple[mx.array, mx.array]:
        """Keys and values of `context` (B, tokens, dim), split into heads: (B, heads, tokens, dim_head)."""
        b, m, _ = context.shape
        k = self.to_k(context).reshape(b, m, self.heads, -1).transpose(0, 2, 1, 3)
        v = self.to_v(context).reshape(b, m, self.heads, -1).transpose(0, 2, 1, 3)
        return k, v

    def __call__(self, x: mx.array, context: Optional[mx.array] = None,
                 kv: Optional[Tuple[mx.array, mx.array]] = None) -> mx.array:
        """Attention of `x` to `context` (default: itself), or to precomputed `kv = self.kv(context)`."""
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)
        k, v = kv if kv is not None else self.kv(x if context is None else context)
        o = attention(q, k, v, self.scale)
        return self.to_out[0](o.transpose(0, 2, 1, 3).reshape(b, n, -1))
