"""Time and peak memory of the full-size SDXL VAE (random weights): untiled, exactly tiled
(whole-image GroupNorm statistics, mlx_sdxl/models/vae_tiling.py) and diffusers-style blended.

    python -m bench.vae_memory --size 512 --tile-size 256 --json out.json                  (exact)
    python -m bench.vae_memory --size 512 --mode untiled --op encode --json out.json
    python -m bench.vae_memory --size 1024 --modes untiled,exact:256,exact:512,blend --json out.json

`--modes` takes a comma-separated list of MODE[:TILE] (MODE untiled, exact or blend; TILE in
image pixels, default `--tile-size`), measured one after another in this process. Each mode
runs once untimed, then `--repeats` timed runs (mx.eval synchronised); `peak_memory_bytes` is
the largest `mx.get_peak_memory()` of a timed run, reset before each, weights included
(`weights_bytes`; `working_bytes` = peak − weights); `rel_l2_vs_untiled` compares the output
(the posterior mean for encode) with an earlier untiled mode's, when the list has one.
`unfold_bytes` is the largest im2col buffer of one conv call (output pixels × 9 × input
channels): MLX-CPU materialises it, and so, by the H100 peaks of 2026-11-27, does MLX-CUDA for
these shapes. Run on Linux CPUs with OpenBLAS preloaded:
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m bench.vae_memory ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_sdxl.models.vae import AutoencoderKL, VAEConfig
from mlx_sdxl.models.vae_tiling import DEFAULT_TILE_SIZE
from mlx_sdxl.spec import BASE
from mlx_sdxl.weights import parse_dtype

from .machine import machine_info
from .models import FULL, TINY, build_random
from .run import stats

MODES = ("untiled", "exact", "blend")


def parse_modes(spec: str, tile: int) -> List[Tuple[str, int]]:
    """"untiled,exact:256,blend" → [(mode, tile pixels), ...]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        mode, _, size = item.partition(":")
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; accepted: {', '.join(MODES)} (optionally :TILE)")
        out.append((mode, int(size) if size else tile))
    return out


def conv_inputs(cfg: VAEConfig, op: str) -> List[Tuple[str, int, int, int]]:
    """(name, input channels, input stage divisor d, stride) of each 3×3 conv at d ≤ 8."""
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    f = cfg.scale_factor
    if op == "decode":
        rev = ch[::-1]
        convs = [("conv_in", cfg.latent_channels, f, 1)] + [("mid", rev[0], f, 1)]
        for i in range(n):
            d = f >> i
            convs += [(f"up{i}.resnet", rev[max(i - 1, 0)], d, 1), (f"up{i}.resnet", rev[i], d, 1)]
            if i < n - 1:
                convs.append((f"up{i}.upsample", rev[i], d // 2, 1))  # at the upsampled (output) size
        return convs + [("conv_out", rev[-1], 1, 1)]
    convs = [("conv_in", cfg.in_channels, 1, 1)]
    for i in range(n):
        convs += [(f"down{i}.resnet", ch[max(i - 1, 0)], 1 << i, 1), (f"down{i}.resnet", ch[i], 1 << i, 1)]
        if i < n - 1:
            convs.append((f"down{i}.downsample", ch[i], 1 << i, 2))
    return convs + [("mid", ch[-1], f, 1), ("conv_out", ch[-1], f, 1)]


def unfold_bytes(cfg: VAEConfig, op: str, batch: int, height: int, width: int, itemsize: int,
                 tile: Optional[int]) -> Tuple[int, str]:
    """The largest im2col buffer (output pixels × 9 × input channels) of one conv call, and its
    conv: over the whole image, or (`tile`) over one tile (the decoder's conv_in never tiles)."""
    best = (0, "")
    for name, cin, d, stride in conv_inputs(cfg, op):
        h, w = height // d, width // d
        if tile is not None and not (op == "decode" and name == "conv_in"):
            h, w = min(h, tile // d), min(w, tile // d)
        best = max(best, (batch * (h // stride) * (w // stride) * 9 * cin * itemsize, name))
    return best


def measure(vae: AutoencoderKL, op: str, mode: str, tile: int, x: mx.array, repeats: int) -> dict:
    tiled = {"untiled": False, "exact": "exact", "blend": "blend"}[mode]
    if op == "decode":
        run = lambda: vae.decode(x, tiled=tiled, tile_size=tile)
    else:
        run = lambda: vae.encode(x, tiled=tiled, tile_size=tile).mean
    mx.clear_cache()
    mx.eval(run())  # warm-up
    times, peaks = [], []
    for _ in range(repeats):
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - t0)
        peaks.append(mx.get_peak_memory())
    return {"seconds": stats(times), "peak_memory_bytes": max(peaks), "peaks": peaks,
            "output": np.array(run().astype(mx.float32), dtype=np.float64)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vae_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="image side in pixels (square)")
    p.add_argument("--height", type=int, help="image height (default --size)")
    p.add_argument("--width", type=int, help="image width (default --size)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--op", choices=["decode", "encode"], default="decode")
    p.add_argument("--mode", choices=MODES, default="exact")
    p.add_argument("--modes", help="comma-separated MODE[:TILE] list (overrides --mode)")
    p.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE, help="tile side in image pixels")
    p.add_argument("--dtype", default="float32", help="weights dtype (float16: computed in float32, as SDXL's VAE)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="the tiny VAE (a smoke test)")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    height, width = a.height or a.size, a.width or a.size
    modes = parse_modes(a.modes or f"{a.mode}:{a.tile_size}", a.tile_size)
    config = (TINY if a.tiny else FULL)[BASE]["vae"]
    vae = build_random("vae", config, parse_dtype(a.dtype), seed=3)
    cfg = vae.config
    weights = sum(v.nbytes for _, v in tree_flatten(vae.parameters()))
    itemsize = vae.compute_dtype.size
    key = mx.random.key(0)
    f = cfg.scale_factor
    if a.op == "decode":
        x = mx.random.normal((a.batch, height // f, width // f, cfg.latent_channels), key=key)
    else:
        x = mx.random.uniform(-1, 1, (a.batch, height, width, cfg.in_channels), key=key)
    mx.eval(x)
    results, reference = [], None
    out = {"machine": machine_info(measure_blas=False), "settings": vars(a), "results": results}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    for mode, tile in modes:
        rec = dict(op=a.op, mode=mode, tile_size=None if mode == "untiled" else tile, height=height, width=width,
                   batch=a.batch, dtype=a.dtype, compute_dtype=str(vae.compute_dtype), weights_bytes=weights)
        rec.update(measure(vae, a.op, mode, tile, x, a.repeats))
        y = rec.pop("output")
        reference = y if mode == "untiled" and reference is None else reference
        rec["rel_l2_vs_untiled"] = None if reference is None else \
            float(np.linalg.norm(y - reference) / np.linalg.norm(reference))
        rec["working_bytes"] = rec["peak_memory_bytes"] - weights
        unfold_tile = tile if mode != "untiled" and max(height, width) > tile else None
        rec["unfold_bytes"], rec["unfold_conv"] = unfold_bytes(cfg, a.op, a.batch, height, width, itemsize, unfold_tile)
        results.append(rec)
        print(f"{a.op} {height}x{width} {mode:8} tile {rec['tile_size'] or '-':>4}: "
              f"{rec['seconds']['median']:7.2f} s  peak {rec['peak_memory_bytes'] / 2**30:6.2f} GiB "
              f"(weights {weights / 2**30:.2f}, largest im2col {rec['unfold_bytes'] / 2**30:.2f} GiB)"
              f"  rel L2 vs untiled {rec['rel_l2_vs_untiled']}", flush=True)
        Path(a.json).write_text(json.dumps(out, indent=1))  # after each mode: a run cut short keeps the rest
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
