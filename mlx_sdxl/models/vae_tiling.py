"""Tiled VAE decode and encode: exact (global GroupNorm statistics) and diffusers' blended form.

Exact tiling (`decode_exact`, `encode_exact`) gives the untiled result up to float rounding.
The full-resolution part of the network runs as a sequence of *passes*; each pass makes one
feature map tile by tile, and a GroupNorm that reads a map separates two passes:

- A map is a `Grid` of NHWC tiles (evaluated, or scheduled). Tile edges are set in image pixels, every
  `tile` pixels from the top left (the last tile may be smaller), and divided by 2^k at a
  stage 2^k times smaller, so the tiles of every stage nest exactly.
- GroupNorm with global statistics: the pass that makes a tile also computes, in float32,
  its per-(batch, group) mean μ_i and M2_i = Σ(x − μ_i)² over its n_i values (in the same
  evaluation). After the pass they combine as in Chan et al.'s parallel algorithm:
  n = Σ n_i, μ = Σ n_i μ_i / n, M2 = Σ M2_i + Σ n_i (μ_i − μ)², σ² = M2 / n (the
  population variance, as torch's GroupNorm and MLX's pytorch-compatible one use).
  The norm is then a per-channel affine: y = (x − μ)·a + β with a = γ·rsqrt(σ² + eps).
- A 3×3 convolution (padding 1) of act(x) on a tile reads the tile with a one-pixel halo
  from its neighbours, applies act (GroupNorm + SiLU) to that window, and convolves it with
  zero padding only on the sides that lie on the image border (the conv pads its activated
  input); the ResnetBlock2D, Upsample2D and the VAE's Downsample2D follow from it.
- Each tile goes through one `Pacer` (at most one tile in flight behind the newest), and the
  input tiles no later output tile needs are dropped as the pass goes, so the peak is a few
  full-resolution maps (which global statistics force us to keep) plus a tile's working set.
  The moments stay lazy between passes (no host synchronisation at a pass boundary).

Only the mid blocks' self-attention (global by nature, at latent resolution) runs on the whole
map, as many query rows at a time as a tile has latent positions (scores of B·(tile/8)²·(H/8)·(W/8)
floats per chunk); the decoder's conv_in (no GroupNorm) runs untiled too.

Blended tiling (`blended`) is diffusers' enable_tiling: each tile runs alone (its own
statistics, its own attention) and overlapping tiles are cross-faded; it changes the image.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .blocks import Attention, upsample_nearest
from .cpu_kernels import silu
from .pacing import Pacer

# Exact tiling's tile edge in image pixels (a multiple of the VAE's scale factor). Full-size VAE,
# fp32, 1024² decode (bench/measured): on an H100, 128 px took 0.50 s and peaked at 1.70 GiB, 256 px
# 0.20 s and 2.14 GiB (whole image: 0.09 s, 22.7 GiB); on the 2-core CPU VM 71 s / 2.11 GiB against
# 107 s / 4.01 GiB. 128 keeps a 16 GB Mac's default mode (4-bit refiner) under 10 GB at 1024².
DEFAULT_TILE_SIZE = 128

Moments = Tuple[mx.array, mx.array]  # (mean, var), float32, shape (batch, groups)


# ----------------------------------------------------------------------------- grids

def edges(size: int, tile: int, div: int = 1) -> List[int]:
    """Tile edges of a `size`-pixel side cut every `tile` pixels, at a stage `div` times smaller."""
    return [e // div for e in list(range(0, size, tile)) + [size]]


class Grid:
    """A feature map as NHWC tiles: tiles[r][c] holds rows ys[r]:ys[r+1], columns xs[c]:xs[c+1].
    `moments` are its global GroupNorm statistics when a GroupNorm reads it next."""

    def __init__(self, ys: Sequence[int], xs: Sequence[int]):
        self.ys, self.xs = list(ys), list(xs)
        self.tiles: List[List[Optional[mx.array]]] = [[None] * self.cols for _ in range(self.rows)]
        self.moments: Optional[Moments] = None

    @property
    def rows(self) -> int:
        return len(self.ys) - 1

    @property
    def cols(self) -> int:
        return len(self.xs) - 1

    @classmethod
    def split(cls, x: mx.array, ys: Sequence[int], xs: Sequence[int]) -> "Grid":
        grid = cls(ys, xs)
        for r in range(grid.rows):
            for c in range(grid.cols):
                grid.tiles[r][c] = x[:, ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
        return grid

    def clear(self) -> None:
        self.tiles = [[None] * self.cols for _ in range(self.rows)]

    def drop_row(self, r: int) -> None:
        """Release row r (no later tile needs it); rows outside the grid are ignored."""
        if 0 <= r < self.rows:
            self.tiles[r] = [None] * self.cols

    def assemble(self) -> mx.array:
        """The whole map (and the grid lets go of its tiles)."""
        rows = [mx.concatenate(row, axis=2) if len(row) > 1 else row[0] for row in self.tiles]
        self.tiles = []
        return mx.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]


# ----------------------------------------------------------------------------- global GroupNorm

def tile_moments(t: mx.array, groups: int) -> Tuple[mx.array, mx.array]:
    """Per (batch, group) float32 mean μ_i and M2_i = Σ (x − μ_i)² of one tile. Each sum runs
    over a row first, then over the rows: far smaller float32 rounding than one long sum
    (the M2 of a 256×256×4 group: 5e-7 relative instead of 8e-6)."""
    return _moments(groups)(t)


@lru_cache(maxsize=None)
def _moments(groups: int) -> Callable[[mx.array], Tuple[mx.array, mx.array]]:
    def moments(t):
        b, h, w, c = t.shape
        g = t.astype(mx.float32).reshape(b, h, w, groups, c // groups)
        mean = mx.sum(mx.sum(g, axis=(2, 4)), axis=1) / (h * w * (c // groups))
        return mean, mx.sum(mx.sum(mx.square(g - mean[:, None, None, :, None]), axis=(2, 4)), axis=1)

    return mx.compile(moments)


def combine(parts: Sequence[Tuple[int, mx.array, mx.array]]) -> Moments:
    """Chan's parallel combination of per-tile (n_i, μ_i, M2_i): n = Σ n_i, μ = Σ n_i μ_i / n,
    M2 = Σ M2_i + Σ n_i (μ_i − μ)², returning (μ, σ² = M2 / n)."""
    n = mx.array([float(p[0]) for p in parts])[:, None, None]
    means = mx.stack([p[1] for p in parts])
    total = mx.sum(n)
    mean = mx.sum(n * means, axis=0) / total
    m2 = mx.sum(mx.stack([p[2] for p in parts]), axis=0) + mx.sum(n * mx.square(means - mean), axis=0)
    return mean, m2 / total


@mx.compile
def _affine(x, mu, a, beta):
    return (x - mu) * a + beta


@mx.compile
def _affine_silu(x, mu, a, beta):
    return silu((x - mu) * a + beta)


def norm_silu(norm, moments: Moments, dtype: mx.Dtype, act: bool = True) -> Callable[[mx.array], mx.array]:
    """GroupNorm `norm` with the global `moments`, then SiLU (unless not `act`), as a
    per-channel affine: x ↦ silu((x − μ)·a + β), a = γ·rsqrt(σ² + eps), computed in `dtype`
    (one fused kernel)."""
    mean, var = moments
    per = norm.weight.shape[0] // mean.shape[1]

    def channels(v):  # (batch, groups) → (batch, 1, 1, channels)
        return mx.repeat(v, per, axis=1)[:, None, None, :]

    a = (channels(mx.rsqrt(var + norm.eps)) * norm.weight.astype(mx.float32)).astype(dtype)
    mu, beta = channels(mean).astype(dtype), norm.bias.astype(dtype)
    fn = _affine_silu if act else _affine
    return lambda x: fn(x, mu, a, beta)


# ----------------------------------------------------------------------------- halos and convolutions

def window(grid: Grid, r: int, c: int, halo: Tuple[int, int, int, int]):
    """Tile (r, c) with up to `halo` = (top, bottom, left, right) pixels of its neighbours
    (corners included), and the halo it got: less where the image ends."""
    top, bottom = (halo[0] if r > 0 else 0), (halo[1] if r < grid.rows - 1 else 0)
    left, right = (halo[2] if c > 0 else 0), (halo[3] if c < grid.cols - 1 else 0)

    def band(row: int, rows: slice) -> mx.array:
        t = grid.tiles[row]
        parts = ([t[c - 1][:, rows, -left:]] if left else []) + [t[c][:, rows]]
        parts += [t[c + 1][:, rows, :right]] if right else []
        return mx.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]

    bands = ([band(r - 1, slice(-top, None))] if top else []) + [band(r, slice(None))]
    bands += [band(r + 1, slice(0, bottom))] if bottom else []
    x = mx.concatenate(bands, axis=1) if len(bands) > 1 else bands[0]
    return x, (top, bottom, left, right)


def conv_padded(conv, x: mx.array, lo=(0, 0), hi=(0, 0), stride: int = 1) -> mx.array:
    """`conv`'s weights and bias applied with `lo` (top, left) and `hi` (bottom, right) zero
    padding: the conv pads only the sides of a tile window that lie on the image border."""
    y = mx.conv_general(x, conv.weight, stride=stride, padding=(list(lo), list(hi)))
    return y + conv.bias if "bias" in conv else y


def conv3x3(grid: Grid, r: int, c: int, conv, act: Optional[Callable] = None) -> mx.array:
    """Tile (r, c) of conv(act(x)) for a 3×3 conv with padding 1: the tile and a one-pixel halo,
    activated, convolved with zero padding where the halo leaves the image."""
    x, (t, b, l, rt) = window(grid, r, c, (1, 1, 1, 1))
    x = act(x) if act is not None else x
    return conv_padded(conv, x, (1 - t, 1 - l), (1 - b, 1 - rt))


def upsample_conv3x3(grid: Grid, r: int, c: int, conv) -> mx.array:
    """Tile (r, c) of conv(nearest_2×(x)), output rows [2a, 2b) of input rows [a, b): input rows
    [a − 1, b + 1) (as far as the image reaches) → 2× → output rows [2a − 1, 2b + 1) (one of
    the two copies of each halo row is cropped) → 3×3 conv, zero-padded at the image border."""
    x, (t, b, l, rt) = window(grid, r, c, (1, 1, 1, 1))
    x = upsample_nearest(x)
    x = x[:, t:x.shape[1] - b, l:x.shape[2] - rt]
    return conv_padded(conv, x, (1 - t, 1 - l), (1 - b, 1 - rt))


def downsample_conv3x3(grid: Grid, r: int, c: int, conv) -> mx.array:
    """Tile (r, c) of the VAE's Downsample2D (pad bottom/right by one zero, 3×3 stride 2):
    output rows [a, b) read input rows [2a, 2b], row 2b a zero row where 2b is the image height."""
    x, (_, b, _, rt) = window(grid, r, c, (0, 1, 0, 1))
    return conv_padded(conv, x, (0, 0), (1 - b, 1 - rt), stride=2)


# ----------------------------------------------------------------------------- passes

class Passes:
    """The tiled passes of one encode or decode: GroupNorm `groups`, compute `dtype`, and one
    Pacer for all of them. A pass schedules its tiles (mx.async_eval, at most one unfinished
    behind the newest) and returns at once: its moments stay lazy (a few small arrays) and the
    next pass's first tile waits for them on the device, so the GPU never idles between passes."""

    def __init__(self, groups: int, dtype: mx.Dtype):
        self.groups, self.dtype, self.pacer = groups, dtype, Pacer()

    def run(self, ys: Sequence[int], xs: Sequence[int], make: Callable[[int, int], Tuple[mx.array, ...]],
            moments: bool = True, done_row: Optional[Callable[[int], None]] = None) -> List[Grid]:
        """One grid per array `make(r, c)` returns, built tile by tile in row-major order, the
        first with its moments when `moments`; `done_row(r)` is called once output row r is
        scheduled, to drop the inputs no later tile reads."""
        parts, grids = [], None
        for r in range(len(ys) - 1):
            for c in range(len(xs) - 1):
                tiles = make(r, c)
                grids = grids or [Grid(ys, xs) for _ in tiles]
                stats = tile_moments(tiles[0], self.groups) if moments else ()
                self.pacer(*tiles, *stats)
                for grid, t in zip(grids, tiles):
                    grid.tiles[r][c] = t
                if moments:
                    b, h, w, ch = tiles[0].shape
                    parts.append((h * w * (ch // self.groups), *stats))
            if done_row is not None:
                done_row(r)
        if moments:
            grids[0].moments = combine(parts)
        return grids

    def resnet(self, block, x: Grid, moments: bool = True) -> Grid:
        """A ResnetBlock2D without time embedding, consuming `x` (which must carry its moments):
        pass 1: h = conv1(silu(norm1(x))) and s = conv_shortcut(x) if the block has one;
        pass 2: out = (s or x) + conv2(silu(norm2(h))), with its moments when `moments`."""
        act1 = norm_silu(block.norm1, x.moments, self.dtype)
        shortcut = "conv_shortcut" in block

        def first(r, c):
            h = conv3x3(x, r, c, block.conv1, act1)
            return (h, conv_padded(block.conv_shortcut, x.tiles[r][c])) if shortcut else (h,)

        # with a 1×1 shortcut, pass 2 does not read x: drop each row once the halo is past it
        grids = self.run(x.ys, x.xs, first, True, (lambda r: x.drop_row(r - 1)) if shortcut else None)
        h, skip = (grids[0], grids[1]) if shortcut else (grids[0], x)
        if shortcut:
            x.clear()
        act2 = norm_silu(block.norm2, h.moments, self.dtype)

        def second(r, c):
            return (skip.tiles[r][c] + conv3x3(h, r, c, block.conv2, act2),)

        def done(r):
            h.drop_row(r - 1)
            skip.drop_row(r)

        return self.run(h.ys, h.xs, second, moments, done)[0]

    def upsample(self, upsampler, x: Grid) -> Grid:
        """Upsample2D (nearest 2× then 3×3 conv) onto the grid of twice the edges, with moments."""
        ys, xs = [2 * e for e in x.ys], [2 * e for e in x.xs]
        make = lambda r, c: (upsample_conv3x3(x, r, c, upsampler.conv),)
        return self.run(ys, xs, make, True, lambda r: x.drop_row(r - 1))[0]

    def downsample(self, downsampler, x: Grid) -> Grid:
        """The VAE's Downsample2D onto the grid of half the edges, with moments."""
        ys, xs = [e // 2 for e in x.ys], [e // 2 for e in x.xs]
        make = lambda r, c: (downsample_conv3x3(x, r, c, downsampler.conv),)
        return self.run(ys, xs, make, True, x.drop_row)[0]

    def conv(self, conv, x: Grid, act: Optional[Callable] = None, moments: bool = False) -> Grid:
        """conv(act(x)) for a 3×3 conv with padding 1."""
        make = lambda r, c: (conv3x3(x, r, c, conv, act),)
        return self.run(x.ys, x.xs, make, moments, lambda r: x.drop_row(r - 1))[0]

    def whole(self, x: mx.array, ys: Sequence[int], xs: Sequence[int]) -> Grid:
        """A grid of the (latent-resolution) map `x`, carrying its global moments."""
        mean, m2 = tile_moments(x, self.groups)
        grid = Grid.split(x, ys, xs)
        grid.moments = (mean, m2 / (x.shape[1] * x.shape[2] * (x.shape[3] // self.groups)))
        return grid

    def attention(self, block, x: mx.array, moments: Moments, rows: int) -> mx.array:
        """The VAE's AttentionBlock (one head over all positions, its GroupNorm on the global
        `moments`) `rows` query rows at a time, each chunk through the Pacer: the scores held
        are (rows × positions), not positions² (16384² for a 1024² image)."""
        b, h, w, c = x.shape
        n = h * w
        normed = norm_silu(block.group_norm, moments, self.dtype, act=False)(x).reshape(b, n, c)
        kv = block.kv(normed)
        flat, out = x.reshape(b, n, c), []
        for i in range(0, n, rows):
            out.append(flat[:, i:i + rows] + Attention.__call__(block, normed[:, i:i + rows], kv=kv))
            self.pacer(out[-1])
        return (mx.concatenate(out, axis=1) if len(out) > 1 else out[0]).reshape(b, h, w, c)

    def mid(self, mid, x: Grid, rows: int) -> Grid:
        """MidBlock (resnet, global attention, resnet) at latent resolution: the resnets tiled,
        the attention on the whole map by chunks of `rows` query rows; the output with moments."""
        x = self.resnet(mid.resnets[0], x)
        ys, xs, moments = x.ys, x.xs, x.moments
        y = self.attention(mid.attentions[0], x.assemble(), moments, rows)
        return self.resnet(mid.resnets[1], self.whole(y, ys, xs))


# ----------------------------------------------------------------------------- decoder and encoder

def decode_exact(decoder, z: mx.array, tile: int, groups: int) -> mx.array:
    """Decoder(z) with every GroupNorm on whole-image statistics, `tile`-pixel tiles: conv_in
    untiled at latent resolution, then the mid block, up blocks and output layers tiled
    (the mid block's attention on the whole latent map, a tile's latent positions at a time)."""
    run = Passes(groups, z.dtype)
    f = 2 ** (len(decoder.up_blocks) - 1)
    ys, xs = edges(z.shape[1] * f, tile, f), edges(z.shape[2] * f, tile, f)
    grid = run.mid(decoder.mid_block, run.whole(decoder.conv_in(z), ys, xs), (tile // f) ** 2)
    for block in decoder.up_blocks:
        upsample = "upsamplers" in block
        for i, resnet in enumerate(block.resnets):
            grid = run.resnet(resnet, grid, moments=not (upsample and i == len(block.resnets) - 1))
        if upsample:
            grid = run.upsample(block.upsamplers[0], grid)
    act = norm_silu(decoder.conv_norm_out, grid.moments, z.dtype)
    out = run.conv(decoder.conv_out, grid, act)
    run.pacer.finish()
    return out.assemble()


def encode_exact(encoder, x: mx.array, tile: int, groups: int) -> mx.array:
    """Encoder(x) with every GroupNorm on whole-image statistics, `tile`-pixel tiles: all of it
    tiled but the mid block's attention (on the whole latent map, a tile's positions at a time)."""
    run = Passes(groups, x.dtype)
    grid = run.conv(encoder.conv_in, Grid.split(x, edges(x.shape[1], tile), edges(x.shape[2], tile)), moments=True)
    for block in encoder.down_blocks:
        downsample = "downsamplers" in block
        for i, resnet in enumerate(block.resnets):
            grid = run.resnet(resnet, grid, moments=not (downsample and i == len(block.resnets) - 1))
        if downsample:
            grid = run.downsample(block.downsamplers[0], grid)
    grid = run.mid(encoder.mid_block, grid, (tile // 2 ** (len(encoder.down_blocks) - 1)) ** 2)
    out = run.conv(encoder.conv_out, grid, norm_silu(encoder.conv_norm_out, grid.moments, x.dtype))
    run.pacer.finish()
    return out.assemble()


# ----------------------------------------------------------------------------- blended (diffusers)

def _blend(a: mx.array, b: mx.array, extent: int, axis: int) -> mx.array:
    """Cross-fade the end of `a` into the start of `b` along `axis` with a linear ramp."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e == 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = e
    w = np.arange(e, dtype=np.float64) / e
    w_b = mx.array(w.reshape(shape), dtype=b.dtype)
    w_a = mx.array((1 - w).reshape(shape), dtype=b.dtype)
    a_tail = mx.split(a, [a.shape[axis] - e], axis=axis)[1]
    b_head, b_rest = mx.split(b, [e], axis=axis)
    return mx.concatenate([a_tail * w_a + b_head * w_b, b_rest], axis=axis)


def blended(fn: Callable[[mx.array], mx.array], x: mx.array, tile: int, stride: int, blend: int,
            keep: int) -> mx.array:
    """diffusers' tiled_decode / _tiled_encode: apply `fn` to tile×tile windows of NHWC `x`
    that start every `stride`, evaluating each on its own; blend each output tile into its
    blended upper, then left neighbour over `blend` rows/columns and keep its first `keep`
    rows and columns."""
    height, width = x.shape[1:3]
    above, rows = [], []
    for i in range(0, height, stride):
        row = []
        for j in range(0, width, stride):
            t = fn(x[:, i:i + tile, j:j + tile])
            if above:
                t = _blend(above[len(row)], t, blend, axis=1)
            if row:
                t = _blend(row[-1], t, blend, axis=2)
            mx.eval(t)
            row.append(t)
        rows.append(mx.concatenate([t[:, :keep, :keep] for t in row], axis=2))
        above = row
    return mx.concatenate(rows, axis=1)
