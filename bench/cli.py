"""Command line of the benchmark: `mlx-sdxl bench` or `python -m bench`."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from typing import List, Optional

from mlx_sdxl.spec import BITS

from . import report
from .run import STAGES, Runner, Settings

CPU_DTYPE_NOTE = ("CPU backend: measuring float32. MLX-CPU has no fast half-precision GEMM, so float16 and "
                  "bfloat16 matmuls run ~40x slower than float32 there; pass --dtype to measure them anyway.")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark SDXL in MLX: per-step UNet latency (base, refiner, 4-bit refiner), VAE decode, "
                    "text encoding, whole images, model load times and peak memory per stage, "
                    "optionally against diffusers/PyTorch in the same run.",
        epilog="Examples:\n"
               f"  {prog} --random-weights --only unet --width 512 --height 512\n"
               f"  {prog} --model stabilityai/stable-diffusion-xl-base-1.0 "
               "--refiner stabilityai/stable-diffusion-xl-refiner-1.0 --refiner-bits 4 --json out.json\n"
               f"  {prog} --random-weights --compare diffusers --only unet,vae --markdown table.md --chart chart.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("models")
    src.add_argument("--model", metavar="PATH|ID", help="SDXL base: diffusers folder, hub id, single-file "
                     "checkpoint or converted folder")
    src.add_argument("--refiner", metavar="PATH|ID", help="SDXL refiner (same forms; 'none' for no refiner)")
    src.add_argument("--random-weights", action="store_true",
                     help="no download: random weights at the real SDXL architecture (base, refiner, VAE, CLIP-L, "
                          "bigG)")
    src.add_argument("--tiny", action="store_true", help="random weights at a tiny version of the architecture "
                     "(for smoke tests)")
    run = p.add_argument_group("what to measure")
    run.add_argument("--width", type=int, default=1024)
    run.add_argument("--height", type=int, default=1024)
    run.add_argument("--steps", type=int, default=40, help="steps of a whole image (default 40)")
    run.add_argument("--high-noise-frac", "--split", dest="high_noise_frac", type=float, default=0.8,
                     help="share of the steps the base runs before the refiner (default 0.8)")
    run.add_argument("--batch", type=int, default=2, choices=(1, 2),
                     help="UNet batch: 2 = one image with classifier-free guidance (default), 1 = without")
    run.add_argument("--dtype", action="append", metavar="LIST",
                     help="float16, bfloat16, float32, comma-separated or repeated; UNets are measured in each, "
                          "the other stages in the first (default: float16 on a GPU, float32 on the CPU)")
    run.add_argument("--refiner-bits", type=int, choices=BITS,
                     help="also measure the refiner quantized to this many bits (and use it for whole images)")
    run.add_argument("--only", metavar="LIST", default=",".join(STAGES),
                     help=f"stages to run, comma-separated from {', '.join(STAGES)} (default: all)")
    run.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (default 3)")
    run.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    run.add_argument("--e2e-limit", type=float, default=30.0, metavar="MINUTES",
                     help="skip whole images whose estimate (from the stage timings) exceeds this; 0 = no limit "
                          "(default 30)")
    run.add_argument("--few-steps", type=int, metavar="N",
                     help="also time a whole image of N steps as few-step models run (the base alone, Euler "
                          "with trailing spacing, guidance 0: one UNet batch per step), after the --steps one")
    run.add_argument("--low-memory", action="store_true", help="whole images free each model after its stage")
    run.add_argument("--base-bits", type=int, choices=BITS, help="--memory-profile: quantize the base UNet")
    run.add_argument("--memory-profile", action="store_true",
                     help="instead of timing: one whole image (--steps, the first call, loads included) with the "
                          "weights, peak and working memory of each stage against estimate_memory's figures")
    run.add_argument("--compile", action="store_true",
                     help="time the UNet steps through the compiled forward pass (the pipeline's compile=True)")
    run.add_argument("--compare", choices=("diffusers",),
                     help="also run the same stages in diffusers/PyTorch with the same weights and report the ratio")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the results as JSON (see bench/SCHEMA.md)")
    out.add_argument("--markdown", metavar="PATH", help="write the Markdown table")
    out.add_argument("--chart", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    return p


def _dtypes(values: Optional[List[str]], backend: str) -> List[str]:
    from mlx_sdxl.weights import parse_dtype

    if not values:
        return ["float32"] if backend == "cpu" else ["float16"]
    names = []
    for v in values:
        for item in v.split(","):
            if item.strip():
                name = str(parse_dtype(item.strip())).replace("mlx.core.", "")
                if name not in names:
                    names.append(name)
    return names


def _check(args, parser) -> Optional[str]:
    if not (args.model or args.random_weights or args.tiny):
        return "pass --model PATH|ID (real weights) or --random-weights (no download)"
    if args.model and (args.random_weights or args.tiny):
        return "--model and --random-weights/--tiny exclude each other"
    for name in ("width", "height"):
        v = getattr(args, name)
        if v < 64 or v % 8:
            return f"--{name} must be a multiple of 8 and at least 64, got {v}"
    if args.steps < 1:
        return f"--steps must be at least 1, got {args.steps}"
    if args.few_steps is not None and args.few_steps < 1:
        return f"--few-steps must be at least 1, got {args.few_steps}"
    if not 0 < args.high_noise_frac <= 1:
        return f"--high-noise-frac must be in (0, 1], got {args.high_noise_frac}"
    if args.repeats < 1 or args.warmup < 0:
        return "--repeats must be at least 1 and --warmup at least 0"
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in STAGES]
    if bad or not only:
        return f"--only takes {', '.join(STAGES)}; got {args.only!r}"
    args.only = only
    return None


def _memory_profile(args, base, refiner, dtype: str, machine: dict, log) -> int:
    import json

    from mlx_sdxl.weights import parse_dtype

    from .memory_profile import profile

    out = profile(base, refiner, dtype=parse_dtype(dtype), width=args.width, height=args.height, steps=args.steps,
                  high_noise_frac=args.high_noise_frac, low_memory=args.low_memory, base_bits=args.base_bits,
                  refiner_bits=args.refiner_bits if refiner is not None else None, log=print)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "memory_profile": out}, f, indent=1)
        log(f"wrote {args.json}")
    return 0


def main(argv: Optional[List[str]] = None, prog: str = "python -m bench") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    problem = _check(args, parser)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2

    from mlx_sdxl.errors import SDXLError
    from mlx_sdxl.models.cpu_kernels import use_cpu_kernels

    from .machine import backend, describe, machine_info, openblas_hint

    try:
        dtypes = _dtypes(args.dtype, backend())
    except SDXLError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    machine = machine_info()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    log(f"machine: {describe(machine)}")
    notes = []
    if machine["backend"] == "cpu":
        if machine["blas"].get("slow") or machine["blas"].get("library") == "reference":
            log(openblas_hint())
            notes.append(openblas_hint())
        if args.dtype is None:
            log(CPU_DTYPE_NOTE)
            notes.append(CPU_DTYPE_NOTE)
        elif any(d != "float32" for d in dtypes):
            log("note: " + CPU_DTYPE_NOTE.split(". ", 1)[1])

    from .models import open_sources

    try:
        base, refiner = open_sources(args.model, args.refiner, args.random_weights, args.tiny,
                                     lazy=args.memory_profile)
    except SDXLError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if refiner is None and args.refiner_bits:
        log("note: --refiner-bits has no effect without a refiner")

    if args.memory_profile:
        return _memory_profile(args, base, refiner, dtypes[0], machine, log)
    compare = None
    compare_info = {}
    if args.compare == "diffusers":
        from .compare_diffusers import DiffusersComparison, DiffusersUnavailable

        try:
            compare = DiffusersComparison(args.repeats, args.warmup)
        except DiffusersUnavailable as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        compare_info = {"diffusers": compare.info}
        log(f"comparing with diffusers on PyTorch {compare.info['torch_version']} ({compare.device})")

    settings = Settings(width=args.width, height=args.height, steps=args.steps, high_noise_frac=args.high_noise_frac,
                        batch=args.batch, dtypes=dtypes, repeats=args.repeats, warmup=args.warmup,
                        refiner_bits=args.refiner_bits if refiner is not None else None, only=args.only,
                        compare=args.compare, e2e_limit_minutes=args.e2e_limit, low_memory=args.low_memory,
                        compile=args.compile, few_steps=args.few_steps)
    runner = Runner(base, refiner, settings, compare, log)
    started = time.perf_counter()
    try:
        runner.run()
    except SDXLError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130

    import mlx.core as mx

    weights = "tiny random" if args.tiny else "random (full-size SDXL architecture)" if args.random_weights \
        else base.description
    result = {
        "schema_version": report.SCHEMA_VERSION,
        "tool": prog,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_seconds": time.perf_counter() - started,
        "machine": machine,
        "settings": {
            "weights": weights, "model": base.description,
            "refiner": refiner.description if refiner is not None else None,
            "width": args.width, "height": args.height, "steps": args.steps,
            "high_noise_frac": args.high_noise_frac, "batch": args.batch, "dtypes": dtypes,
            "refiner_bits": settings.refiner_bits, "only": args.only, "repeats": args.repeats,
            "warmup": args.warmup, "compare": args.compare, "low_memory": args.low_memory,
            "compile": args.compile, "few_steps": args.few_steps,
            "cpu_kernels": use_cpu_kernels(mx.zeros((1,))) if machine["backend"] == "cpu" else False,
        },
        "results": runner.results,
        "skipped": runner.skipped,
        "compare": compare_info,
        "notes": notes,
    }
    table = report.markdown(result)
    print(table)
    if args.json:
        report.write_json(result, args.json)
        log(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
        log(f"wrote {args.markdown}")
    if args.chart:
        why = report.chart(result, args.chart)
        log(f"chart skipped: {why}" if why else f"wrote {args.chart}")
    return 0
