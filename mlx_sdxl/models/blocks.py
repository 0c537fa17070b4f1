"""Building blocks shared by the UNet and the VAE (NHWC, diffusers parameter names).

Activations and attention come from `cpu_kernels`, which picks MLX's ops or, for float32
on the CPU, its arithmetic kernels."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .cpu_kernels import attention, silu

_silu = silu  # for GroupNorm, whose `silu` flag shadows the name


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
