"""Where a UNet step's time goes: the building blocks of SDXL's UNets at their real shapes
(1024×1024 images, guidance batch 2), timed in MLX and in PyTorch in one process.

    python -m bench.components --dtype float16 --json components.json

Each row is one operation at one shape: 3×3 convolutions, GroupNorm(+SiLU), attention
(self and cross), the Linear layers of a transformer block, LayerNorm and the GEGLU gate.
MLX is timed eager and compiled (`mx.compile`), PyTorch eager on the matching device (cuda,
mps or cpu). Every timing evaluates `--chain` independent calls at once and divides, so
launch and synchronisation costs are spread as they are inside a whole forward pass.
The ratio column is the better of MLX's two against PyTorch. Small operations mostly
measure launch overhead (about 20 µs per call on an H200 for both), the large ones the kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Callable, Dict, List

import mlx.core as mx
import numpy as np

from mlx_sdxl.models import blocks, cpu_kernels
from mlx_sdxl.spec import BASE, REFINER
from mlx_sdxl.weights import parse_dtype

from .machine import backend, machine_info

B = 2  # classifier-free guidance batch

# (name, latent side, channels, heads) of the UNet levels that matter, per model, at 1024².
LEVELS = {
    BASE: [("L0", 128, 320, None), ("L1", 64, 640, 10), ("L2", 32, 1280, 20)],
    REFINER: [("L0", 128, 384, None), ("L1", 64, 768, 12), ("L2", 32, 1536, 24), ("L3", 16, 1536, None)],
}


def _mlx_time(fn: Callable[[], object], chain: int, repeats: int) -> float:
    """Median seconds per call, `chain` calls evaluated together."""
    mx.eval(fn())
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(chain)])
        runs.append((time.perf_counter() - t0) / chain)
    return float(np.median(runs))


class Torch:
    def __init__(self, dtype_name: str):
        import torch

        self.torch = torch
        torch.set_grad_enabled(False)
        self.device = {"metal": "mps", "cuda": "cuda"}.get(backend(), "cpu")
        self.dtype = getattr(torch, dtype_name)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        elif self.device == "mps":
            self.torch.mps.synchronize()

    def time(self, fn: Callable[[], object], chain: int, repeats: int) -> float:
        fn()
        self.sync()
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(chain):
                fn()
            self.sync()
            runs.append((time.perf_counter() - t0) / chain)
        return float(np.median(runs))

    def randn(self, *shape):
        return self.torch.randn(*shape, device=self.device, dtype=self.dtype)


# ----------------------------------------------------------------------------- the table

def rows_for(models: List[str]):
    """(kind, name, params) for each measured operation."""
    seen = set()
    for model in models:
        for level, side, ch, heads in LEVELS[model]:
            n = side * side
            for kind, name, params in (
                ("conv3x3", f"{ch}ch {side}²", dict(side=side, cin=ch, cout=ch)),
                ("groupnorm_silu", f"{ch}ch {side}²", dict(side=side, ch=ch)),
            ):
                if (kind, name) not in seen:
                    seen.add((kind, name))
                    yield kind, f"{model} {level} {name}", params
            if heads is None:
                continue
            for kind, name, params in (
                ("self_attention", f"{heads}×64, {n} tokens", dict(heads=heads, n=n, m=n)),
                ("cross_attention", f"{heads}×64, {n}→77 tokens", dict(heads=heads, n=n, m=77)),
                ("linear", f"{n}×{ch} → {ch}", dict(n=n, cin=ch, cout=ch)),
                ("linear", f"{n}×{ch} → {8 * ch}", dict(n=n, cin=ch, cout=8 * ch)),
                ("linear", f"{n}×{4 * ch} → {ch}", dict(n=n, cin=4 * ch, cout=ch)),
                ("layernorm", f"{n}×{ch}", dict(n=n, ch=ch)),
                ("geglu_gate", f"{n}×{4 * ch}", dict(n=n, ch=4 * ch)),
            ):
                if (kind, name) not in seen:
                    seen.add((kind, name))
                    yield kind, f"{model} {level} {name}", params


def flops(kind: str, p: dict) -> float:
    if kind == "conv3x3":
        return 2.0 * B * p["side"] ** 2 * p["cin"] * p["cout"] * 9
    if kind.endswith("attention"):
        return 4.0 * B * p["heads"] * p["n"] * p["m"] * 64
    if kind == "linear":
        return 2.0 * B * p["n"] * p["cin"] * p["cout"]
    return 0.0


def mlx_case(kind: str, p: dict, dtype):
    """(function of no arguments, for timing) with its inputs made once."""
    key = mx.random.key(0)
    r = lambda *s: mx.random.normal(s, key=key).astype(dtype)  # noqa: E731
    if kind == "conv3x3":
        x, w = r(B, p["side"], p["side"], p["cin"]), r(p["cout"], 3, 3, p["cin"]) * 0.02
        f = lambda x, w: mx.conv2d(x, w, padding=1)  # noqa: E731
        args = (x, w)
    elif kind == "groupnorm_silu":
        norm = blocks.group_norm(p["ch"], 1e-5)
        norm.set_dtype(dtype)
        x = r(B, p["side"], p["side"], p["ch"])
        f = lambda x: norm(x, silu=True)  # noqa: E731
        args = (x,)
    elif kind.endswith("attention"):
        h = p["heads"]
        q, k, v = r(B, p["n"], h * 64), r(B, p["m"], h * 64), r(B, p["m"], h * 64)

        def f(q, k, v):
            split = lambda t: t.reshape(B, t.shape[1], h, 64).transpose(0, 2, 1, 3)  # noqa: E731
            o = mx.fast.scaled_dot_product_attention(split(q), split(k), split(v), scale=0.125)
            return o.transpose(0, 2, 1, 3).reshape(B, q.shape[1], -1)
        args = (q, k, v)
    elif kind == "linear":
        x, w = r(B, p["n"], p["cin"]), r(p["cout"], p["cin"]) * 0.02
        f = lambda x, w: x @ w.T  # noqa: E731
        args = (x, w)
    elif kind == "layernorm":
        x, w, b = r(B, p["n"], p["ch"]), r(p["ch"]), r(p["ch"])
        f = lambda x, w, b: mx.fast.layer_norm(x, w, b, 1e-5)  # noqa: E731
        args = (x, w, b)
    elif kind == "geglu_gate":
        x = r(B, p["n"], 2 * p["ch"])

        def f(x):
            h, g = mx.split(x, 2, axis=-1)
            return cpu_kernels.geglu(h, g)
        args = (x,)
    else:
        raise ValueError(kind)
    mx.eval(args)
    return f, args


def torch_case(t: Torch, kind: str, p: dict):
    F = t.torch.nn.functional
    r = t.randn
    if kind == "conv3x3":
        x, w = r(B, p["cin"], p["side"], p["side"]), r(p["cout"], p["cin"], 3, 3) * 0.02
        return lambda: F.conv2d(x, w, padding=1)
    if kind == "groupnorm_silu":
        x, w, b = r(B, p["ch"], p["side"], p["side"]), r(p["ch"]), r(p["ch"])
        return lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))
    if kind.endswith("attention"):
        h = p["heads"]
        q, k, v = r(B, p["n"], h * 64), r(B, p["m"], h * 64), r(B, p["m"], h * 64)

        def f():  # as diffusers' AttnProcessor2_0 does
            split = lambda z: z.view(B, -1, h, 64).transpose(1, 2)  # noqa: E731
            o = F.scaled_dot_product_attention(split(q), split(k), split(v))
            return o.transpose(1, 2).reshape(B, -1, h * 64)
        return f
    if kind == "linear":
        x, w = r(B, p["n"], p["cin"]), r(p["cout"], p["cin"]) * 0.02
        return lambda: F.linear(x, w)
    if kind == "layernorm":
        x, w, b = r(B, p["n"], p["ch"]), r(p["ch"]), r(p["ch"])
        return lambda: F.layer_norm(x, (p["ch"],), w, b, 1e-5)
    if kind == "geglu_gate":
        x = r(B, p["n"], 2 * p["ch"])

        def f():
            h, g = x.chunk(2, dim=-1)
            return h * F.gelu(g)
        return f
    raise ValueError(kind)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.components", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--models", default=f"{BASE},{REFINER}")
    ap.add_argument("--kinds", default="", help="comma-separated subset of the operation kinds")
    ap.add_argument("--chain", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--scale", type=int, default=1, help="divide the latent sides by this (a quick smoke test)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    dtype = parse_dtype(a.dtype)
    t = None if a.no_torch else Torch(a.dtype)
    kinds = set(a.kinds.split(",")) if a.kinds else None
    out: Dict[str, object] = {"machine": machine_info(measure_blas=False), "settings": vars(a), "rows": []}
    if t is not None:
        out["torch"] = {"version": t.torch.__version__, "device": t.device}
    print(f"{'operation':<44} {'MLX eager':>10} {'compiled':>10} {'torch':>10}  ratio", flush=True)
    for kind, name, p in rows_for(a.models.split(",")):
        if kinds and kind not in kinds:
            continue
        if a.scale > 1:
            p = {k: (max(1, v // a.scale) if k in ("side",) else v) for k, v in p.items()}
            p = {k: (max(1, v // a.scale ** 2) if k in ("n",) or (k == "m" and v != 77) else v) for k, v in p.items()}
        theirs = t.time(torch_case(t, kind, p), a.chain, a.repeats) if t is not None else None
        f, args = mlx_case(kind, p, dtype)
        eager = _mlx_time(lambda: f(*args), a.chain, a.repeats)
        cf = mx.compile(f)
        compiled = _mlx_time(lambda: cf(*args), a.chain, a.repeats)
        fl = flops(kind, p)
        out["rows"].append({"kind": kind, "name": name, "params": p, "mlx_eager_s": eager,
                            "mlx_compiled_s": compiled, "torch_s": theirs, "flops": fl})
        best = min(eager, compiled)
        ratio = f"{best / theirs:5.2f}" if theirs else "  -  "
        tflops = f" {fl / best / 1e12:6.1f} TFLOP/s" if fl else ""
        print(f"{kind + ' ' + name:<44} {eager * 1e6:8.1f}us {compiled * 1e6:8.1f}us "
              f"{(theirs or math.nan) * 1e6:8.1f}us {ratio}{tflops}", flush=True)
        mx.clear_cache()
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
