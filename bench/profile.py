"""Where a whole UNet step's time goes, on the GPU: wall time against the time the GPU spends
in kernels, by kernel family, for MLX and for diffusers/PyTorch in the same process.

    python -m bench.profile --models base,refiner --dtype float16 --json profile.json

For each MLX variant (eager or compiled forward; both with the prompt's cross-attention keys
and values made beforehand, as the sampler makes them once per stage) it records:
- `step_s`: one forward evaluated on its own (what `bench` reports per step);
- `build_s`: the Python time to build the lazy graph, before any evaluation;
- `pipelined_s`: per step, when each step's graph is built while the previous one runs
  (`mx.async_eval`), as a sampler can;
- with `--kernels` and a CUDA build of PyTorch: the GPU kernel time per forward, by kernel
  family (GEMM, convolution, attention, normalisation, reductions, copies, elementwise,
  (de)quantization), taken by PyTorch's profiler (CUPTI sees every kernel launched in the
  process, MLX's included).
  One model and one variant per process with `--kernels`: MLX GPU work after a profiling
  session in the same process hung or ended the process on an H200.
The same for diffusers' UNet (random weights, same configuration) with `--torch`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List

import mlx.core as mx

from mlx_sdxl import quantize
from mlx_sdxl.models.unet import UNetConfig
from mlx_sdxl.spec import BASE, BITS, REFINER
from mlx_sdxl.weights import parse_dtype

from .compare_diffusers import _unet_config
from .machine import backend, machine_info
from .models import FULL, TINY, build_random, unet_inputs
from .run import free, stats

FAMILIES = [  # (family, pattern on the kernel name), first match wins
    ("quantized", r"quantize|qmm|qmv"),  # MLX's dequantize and quantized-matmul kernels
    ("attention", r"sdpa|fmha|flash|attention|attn"),
    ("convolution", r"conv|fprop|dgrad|implicit_gemm|implicit_convolve|winograd"),
    ("gemm", r"gemm|nvjet|cublas|cutlass|matmul|xmma"),
    ("normalisation", r"norm|welford"),
    ("reduction", r"reduce|reduction"),
    ("copy/layout", r"copy|transpose|nchw|nhwc|concat|cat_|gather|pad|slice"),
    ("elementwise", r"elementwise|unary|binary|ternary|fused|vectorized|compiled|silu|gelu|add|mul|kernel"),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def kernel_profile(run: Callable[[], None], sync: Callable[[], None], n: int) -> Dict[str, object]:
    """GPU kernel time per call of `run`, by family and by kernel, from PyTorch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            run()
        sync()
    by_family: Dict[str, float] = defaultdict(float)
    kernels = []
    for e in prof.key_averages():
        t = float(getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)) * 1e-6 / n
        if t <= 0 or e.key.startswith("ProfilerStep"):
            continue
        by_family[family(e.key)] += t
        kernels.append({"name": e.key[:160], "family": family(e.key), "calls": e.count / n, "seconds": t})
    kernels.sort(key=lambda k: -k["seconds"])
    return {"kernel_seconds": sum(by_family.values()), "families": dict(sorted(by_family.items(),
                                                                             key=lambda kv: -kv[1])),
            "top_kernels": kernels[:40]}


def safe_kernel_profile(run, sync, n) -> dict:
    try:
        return kernel_profile(run, sync, n)
    except Exception as e:  # a profiler that cannot attach costs the kernels table, not the timings
        return {"error": f"{type(e).__name__}: {e}"}


def cuda_profiler() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return backend() == "cuda" and torch.cuda.is_available()


def median_time(fn: Callable[[], None], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return stats(runs)["median"]


def profile_mlx(model, args, variant: str, repeats: int, warmup: int, kernels: bool) -> dict:
    forward = model.compiled() if variant == "compiled" else model
    cross_kv = model.cross_attention_kv(args[2])  # made once per stage, as the sampler does
    mx.eval(cross_kv)
    fn = lambda x, t, c, te, ids: forward(x, t, c, text_embeds=te, time_ids=ids, cross_kv=cross_kv)  # noqa: E731
    for _ in range(warmup):
        mx.eval(fn(*args))
    res: Dict[str, object] = {"step_s": median_time(lambda: mx.eval(fn(*args)), repeats)}
    built: List[mx.array] = []
    res["build_s"] = median_time(lambda: built.append(fn(*args)), repeats)
    mx.eval(built)
    built.clear()

    def pipelined():
        x = args[0]
        for _ in range(repeats):
            x = x + 0.0 * fn(x, *args[1:])
            mx.async_eval(x)
        mx.eval(x)

    t0 = time.perf_counter()
    pipelined()
    res["pipelined_s"] = (time.perf_counter() - t0) / repeats
    free()
    mx.reset_peak_memory()
    mx.eval(fn(*args))
    res["peak_memory_bytes"] = mx.get_peak_memory()
    if kernels:
        res["kernels"] = safe_kernel_profile(lambda: mx.eval(fn(*args)), mx.synchronize, 3)
    return res


def profile_torch(config: dict, role: str, size: int, batch: int, dtype_name: str, repeats: int, warmup: int,
                  kernels: bool) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_grad_enabled(False)
    device = {"metal": "mps", "cuda": "cuda"}.get(backend(), "cpu")
    dtype = getattr(torch, dtype_name)
    with torch.device(device):
        model = UNet2DConditionModel.from_config(config).to(dtype).eval()
    cfg = UNetConfig.from_dict(config)
    n_ids = 6 if role == BASE else 5
    pooled = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    x, ctx = r(batch, cfg.in_channels, size // 8, size // 8), r(batch, 77, cfg.cross_attention_dim)
    added = {"text_embeds": r(batch, pooled), "time_ids": r(batch, n_ids)}
    t = torch.full((batch,), 500.0, device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    def step():
        model(x, t, ctx, added_cond_kwargs=added)
        sync()

    for _ in range(warmup):
        step()
    res: Dict[str, object] = {"step_s": median_time(step, repeats), "device": device,
                              "torch_version": torch.__version__}
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(x, t, ctx, added_cond_kwargs=added)
    sync()
    res["pipelined_s"] = (time.perf_counter() - t0) / repeats
    if kernels:
        res["kernels"] = safe_kernel_profile(lambda: model(x, t, ctx, added_cond_kwargs=added), sync, 3)
    model = None  # noqa: F841 (frees the weights before the next model)
    if device == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="base,refiner",
                    help="comma-separated: base, refiner, refiner_q4 (or another bit width: refiner_q8, ...)")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default="eager,compiled")
    ap.add_argument("--kernels", action="store_true", help="kernel times by family (PyTorch's profiler, CUDA)")
    ap.add_argument("--torch", action="store_true", help="also diffusers' UNet in the same process")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    dtype = parse_dtype(a.dtype)
    out: Dict[str, object] = {"machine": machine_info(measure_blas=False), "settings": vars(a), "results": []}
    known = {BASE, REFINER} | {f"{REFINER}_q{b}" for b in BITS}
    unknown = [m for m in a.models.split(",") if m not in known]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    if a.kernels and (len(a.models.split(",")) > 1 or len(a.variants.split(",")) > 1):
        # On an H200, MLX GPU work after a profiling session in the same process hung once and
        # ended the process once: one MLX configuration per process (diffusers' may follow).
        ap.error("--kernels profiles one model and one variant per process; got "
                 f"--models {a.models} --variants {a.variants}")
    if a.kernels and not cuda_profiler():
        print("--kernels needs a CUDA build of PyTorch and MLX's CUDA backend; timing without it", file=sys.stderr)
        a.kernels = False

    def save(row: dict) -> None:
        out["results"].append(row)
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
        k = row.get("kernels")
        extra = f"; kernels: {k['error']}" if k and "error" in k else ""
        if k and "error" not in k:
            fams = ", ".join(f"{f} {s * 1e3:.1f}" for f, s in k["families"].items())
            extra = f"; kernels {k['kernel_seconds'] * 1e3:.1f} ms ({fams})"
        timing = "".join(f" {n} {row[n] * 1e3:.1f} ms" for n in ("step_s", "build_s", "pipelined_s") if n in row)
        print(f"{row['model']:<8} {row['impl']:<28}{timing}{extra}", flush=True)

    for name in a.models.split(","):
        role = BASE if name == BASE else REFINER
        config = (TINY if a.tiny else FULL)[role]["unet"]
        cfg = UNetConfig.from_dict(config)
        d = unet_inputs(cfg, role, a.size, a.size, a.batch)
        args = (d["sample"].astype(dtype), mx.array(500.0), d["encoder_hidden_states"].astype(dtype),
                d["text_embeds"].astype(dtype), d["time_ids"].astype(dtype))
        model = build_random("unet", config, dtype, seed=1)
        bits = int(name[len("refiner_q"):]) if name.startswith("refiner_q") else None
        if bits is not None:  # e.g. refiner_q4: the refiner quantized to 4 bits, convs included
            model = quantize.quantize_unet(model, bits=bits)
            free()
        for variant in a.variants.split(","):
            row = profile_mlx(model, args, variant, a.repeats, a.warmup, a.kernels)
            save({"model": name, "impl": f"mlx {variant}", **row})
        torch_config = _unet_config(model)
        model = None
        free()
        if a.torch and bits is None:
            row = profile_torch(torch_config, role, a.size, a.batch, a.dtype, a.repeats, a.warmup, a.kernels)
            save({"model": name, "impl": "diffusers eager", **row})
    print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
