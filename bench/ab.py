"""A/B timings of the UNet's execution variants, in one process, on the same random
full-size weights and inputs, so that the differences are the variants' alone:

- `eager`: the model called op by op;
- `compiled`: the whole forward pass through `UNet2DConditionModel.compiled()`;
- `eager_kv`, `compiled_kv`: the same with the text context's cross-attention keys
  and values made once beforehand (`cross_attention_kv`), as the sampler runs its steps;
  the plain variants make them in every call;
- `eager_kv_paced`: `eager_kv` evaluated in segments at the UNet's block boundaries, as the
  sampler runs its steps (mlx_sdxl.models.pacing: bounded run-ahead, so a lower peak);
- for the quantized refiner, also the token threshold at which QLinear switches from
  `quantized_matmul` to dequantize + dense GEMM (0 = always dense, huge = never),
  and linear-only quantization.

    python -m bench.ab --dtype float16 --size 1024 --json ab.json

With `--interleave`, the listed models are then built again, kept side by side, and
timed step for step in turn (A B A B ...), rows `<variant>+interleaved`: a model timed
second in a process can run a few percent slower or faster than the first one (H200:
up to 10%), and interleaving takes that order out of the ratio. (Peaks come from the
rows measured alone: with both models resident, a peak would count both.)

The JSON is rewritten after every measurement, so a run cut short keeps what it got.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, List

import mlx.core as mx

from mlx_sdxl import quantize
from mlx_sdxl.models.pacing import Pacer, pacing
from mlx_sdxl.models.unet import UNetConfig
from mlx_sdxl.spec import BASE, BITS, REFINER
from mlx_sdxl.weights import parse_dtype

from .machine import machine_info
from .models import FULL, TINY, build_random, unet_inputs
from .run import free, param_bytes, stats

NEVER = 1 << 40  # a token threshold no input reaches
VARIANTS = ("eager", "compiled", "eager_kv", "compiled_kv", "eager_kv_paced")


def inputs(cfg: UNetConfig, role: str, size: int, batch: int, dtype):
    """The UNet's positional arguments, in `dtype`, with the timestep as an array."""
    d = unet_inputs(cfg, role, size, size, batch)
    args = (d["sample"].astype(dtype), mx.array(500.0), d["encoder_hidden_states"].astype(dtype),
            d["text_embeds"].astype(dtype), d["time_ids"].astype(dtype))
    mx.eval(args)
    return args


def step_function(model, variant: str, context: mx.array) -> Callable:
    """fn(x, t, c, text_embeds, time_ids) -> the UNet's output, called as `variant` says."""
    forward = model.compiled() if variant.startswith("compiled") else model
    kv = None
    if "_kv" in variant:
        kv = model.cross_attention_kv(context)
        mx.eval(kv)
    paced = variant.endswith("_paced")

    def fn(x, t, c, te, ids):
        with pacing(Pacer() if paced else None):
            return forward(x, t, c, text_embeds=te, time_ids=ids, cross_kv=kv)

    return fn


def measure(fn: Callable, args, repeats: int, warmup: int) -> dict:
    free()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for _ in range(warmup):
        mx.eval(fn(*args))
    first = time.perf_counter() - t0
    runs: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn(*args))
        runs.append(time.perf_counter() - t0)
    return {"seconds": stats(runs), "warmup_seconds": first, "peak_memory_bytes": mx.get_peak_memory()}


def alternating(a, chosen: List[str], build: Callable, model_inputs: Callable, record: Callable) -> None:
    """Per model, the chosen variants timed step for step in turn (rows <variant>+alternating);
    each variant's peak is the largest of its timed runs."""
    for name in a.models.split(","):
        model = build(name)
        args = model_inputs(name)
        fns = [step_function(model, variant, args[2]) for variant in chosen]
        runs = [[] for _ in fns]
        peaks = [0] * len(fns)
        for r in range(a.warmup + a.repeats):
            for i, fn in enumerate(fns):
                free()
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                mx.eval(fn(*args))
                if r >= a.warmup:
                    runs[i].append(time.perf_counter() - t0)
                    peaks[i] = max(peaks[i], mx.get_peak_memory())
        label = f"refiner_q{a.bits}" if name == "refiner_q" else name
        for variant, times, peak in zip(chosen, runs, peaks):
            record(label, f"{variant}+alternating",
                   {"seconds": stats(times), "warmup_seconds": None, "peak_memory_bytes": peak}, model)
        model = fns = None
        free()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (latents are size/8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bits", type=int, default=4, choices=BITS)
    p.add_argument("--models", default="base,refiner,refiner_q", help="comma-separated: base, refiner, refiner_q")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--thresholds", default="",
                   help="quantized refiner: QLinear token thresholds to try, e.g. 0,77,1024,never")
    p.add_argument("--interleave", action="store_true",
                   help="also time the models step for step in turn (rows <variant>+interleaved)")
    p.add_argument("--interleave-variants", action="store_true",
                   help="instead: per model, time the variants step for step in turn (rows <variant>+alternating)")
    p.add_argument("--tiny", action="store_true", help="tiny random models (a smoke test)")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    dtype = parse_dtype(a.dtype)
    configs = TINY if a.tiny else FULL
    out = {"machine": machine_info(measure_blas=False), "settings": vars(a), "results": []}

    def record(name: str, variant: str, res: dict, model) -> None:
        res.update(model=name, variant=variant, weights_bytes=param_bytes(model))
        out["results"].append(res)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        m = res["seconds"]
        peak, first = res["peak_memory_bytes"], res["warmup_seconds"]
        print(f"{name:<12} {variant:<24} median {m['median'] * 1e3:9.2f} ms  (min {m['min'] * 1e3:.2f}, max "
              f"{m['max'] * 1e3:.2f})" + (f"  peak {peak / 2 ** 30:6.2f} GiB" if peak is not None else "")
              + (f"  first {first:.1f} s" if first is not None else ""), flush=True)

    chosen = a.variants.split(",")

    def variants(name: str, model, args, which=VARIANTS) -> None:
        for variant in (v for v in which if v in chosen):
            record(name, variant, measure(step_function(model, variant, args[2]), args, a.repeats, a.warmup), model)

    def unet_config(name: str) -> dict:  # name: base, refiner or refiner_q
        return configs[BASE if name == BASE else REFINER]["unet"]

    def model_inputs(name: str):
        return inputs(UNetConfig.from_dict(unet_config(name)), BASE if name == BASE else REFINER, a.size,
                      a.batch, dtype)

    def build(name: str):
        model = build_random("unet", unet_config(name), dtype, seed=1)
        if name == "refiner_q":
            model = quantize.quantize_unet(model, bits=a.bits)
            free()
        return model

    def interleaved() -> None:
        names = a.models.split(",")
        models = [build(name) for name in names]
        labels = [f"refiner_q{a.bits}" if n == "refiner_q" else n for n in names]
        for variant in chosen:
            fns = []
            for name, model in zip(names, models):
                args = model_inputs(name)
                fns.append((step_function(model, variant, args[2]), args))
            runs = [[] for _ in fns]
            for r in range(a.warmup + a.repeats):
                for i, (fn, args) in enumerate(fns):
                    t0 = time.perf_counter()
                    mx.eval(fn(*args))
                    if r >= a.warmup:
                        runs[i].append(time.perf_counter() - t0)
            for label, model, times in zip(labels, models, runs):
                standalone = [r for r in out["results"] if r["model"] == label and r["variant"] == variant]
                peak = standalone[0]["peak_memory_bytes"] if standalone else None
                record(label, f"{variant}+interleaved",
                       {"seconds": stats(times), "warmup_seconds": None, "peak_memory_bytes": peak}, model)
            fns = None

    if a.interleave_variants:
        alternating(a, chosen, build, model_inputs, record)
        print(f"wrote {a.json}", file=sys.stderr)
        return 0
    for name in a.models.split(","):
        config = unet_config(name)
        args = model_inputs(name)
        if name != "refiner_q":
            model = build(name)
            variants(name, model, args)
        else:  # (peaks then hold the quantized weights only)
            for convs in (True, False):
                if not convs and not {"eager", "eager_kv"} & set(chosen):
                    continue  # linear-only is measured eager only
                q = quantize.quantize_unet(build_random("unet", config, dtype, seed=1), bits=a.bits, convs=convs)
                free()
                label = f"q{a.bits}" + ("" if convs else "_linear_only")
                variants(f"refiner_{label}", q, args, VARIANTS if convs else ("eager", "eager_kv", "eager_kv_paced"))
                if convs:
                    key = "gpu" if mx.default_device().type == mx.gpu else "cpu"
                    default = quantize.DENSE_TOKENS[key]
                    for threshold in [NEVER if v == "never" else int(v) for v in a.thresholds.split(",") if v]:
                        quantize.DENSE_TOKENS[key] = threshold
                        res = measure(lambda x, t, c, te, ids: q(x, t, c, text_embeds=te, time_ids=ids), args,
                                      a.repeats, a.warmup)
                        record(f"refiner_{label}", f"dense_tokens={threshold if threshold != NEVER else 'never'}",
                               res, q)
                    quantize.DENSE_TOKENS[key] = default
                q = None
        model = None
        free()
    if a.interleave:
        interleaved()
    print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
