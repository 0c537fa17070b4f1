"""`mlx-sdxl bench --memory-profile`: weights, peak and working memory per stage of one whole image.

The first `pipe.generate(...)` call in the process, so the models load inside it: its whole peak,
loads included (`GenerationResult.peak_memory`). Then, in the default mode, which keeps every
model loaded, a second call, whose stages see what repeated generation sees. For each stage of
the last call (text encoding, base steps, refiner steps, VAE decode): the bytes of model weights
resident, the stage's peak (`mx.get_peak_memory()`), the working memory (peak minus weights), and
what `SDXLPipeline.estimate_memory` expected (from `GenerationResult.timings`:
StageTiming.peak_memory / weights_memory).

    mlx-sdxl bench --random-weights --memory-profile --width 1024 --height 1024 --refiner-bits 4
"""

from __future__ import annotations

import time
from typing import Callable, Optional


GIB = 2 ** 30


def profile(base, refiner, *, dtype, width: int, height: int, steps: int, high_noise_frac: float,
            low_memory: bool = False, base_bits: Optional[int] = None, refiner_bits: Optional[int] = None,
            log: Callable[[str], None] = print) -> dict:
    """The memory profile of one image (see the module docstring), as a JSON-ready dict."""
    from mlx_sdxl import SDXLPipeline
    from mlx_sdxl.spec import STAGES

    from .run import NEGATIVE, PROMPT

    pipe = SDXLPipeline(base, refiner, dtype=dtype, low_memory=low_memory, base_bits=base_bits,
                        refiner_bits=refiner_bits)
    frac = high_noise_frac if refiner is not None else 1.0
    guess = pipe.estimate_memory(width, height, high_noise_frac=frac)
    calls = []
    for _ in range(1 if low_memory else 2):
        t0 = time.perf_counter()
        result = pipe.generate(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, width=width,
                               height=height, high_noise_frac=frac, seed=0, output_type="np")
        calls.append({"seconds": time.perf_counter() - t0, "peak_bytes": result.peak_memory})
    rows = []
    for stage in guess.stages:
        got = result.timings.get(stage.stage)
        if got is None:
            continue
        rows.append({"stage": stage.stage, "seconds": got.seconds, "weights_bytes": got.weights_memory,
                     "peak_bytes": got.peak_memory, "working_bytes": got.working_memory,
                     "estimated_weights_bytes": stage.weights, "estimated_working_bytes": stage.working,
                     "estimated_peak_bytes": stage.peak, "peak_ratio": got.peak_memory / stage.peak})
    out = {"mode": guess.mode.flags(), "low_memory": low_memory, "base_bits": base_bits,
           "refiner_bits": refiner_bits, "dtype": str(dtype).replace("mlx.core.", ""), "width": width,
           "height": height, "steps": steps, "high_noise_frac": frac,
           "unet_steps": {s: result.timings[s].steps for s in STAGES if s in result.timings},
           "seconds": calls[0]["seconds"], "call_peak_bytes": calls[0]["peak_bytes"], "calls": calls,
           "estimated_peak_bytes": guess.peak, "stages": rows}
    for line in table(out).splitlines():
        log(line)
    return out


def table(profile_: dict) -> str:
    """The profile as a plain-text table (GiB)."""
    lines = [f"memory profile, {profile_['width']}x{profile_['height']} {profile_['dtype']}, {profile_['mode']}",
             f"{'stage':<9} {'weights':>9} {'peak':>9} {'working':>9} {'estimated':>10} {'measured/est':>12}"]
    for r in profile_["stages"]:
        lines.append(f"{r['stage']:<9} {r['weights_bytes'] / GIB:>5.2f} GiB {r['peak_bytes'] / GIB:>5.2f} GiB "
                     f"{r['working_bytes'] / GIB:>5.2f} GiB {r['estimated_peak_bytes'] / GIB:>6.2f} GiB "
                     f"{r['peak_ratio']:>12.2f}")
    lines.append(f"first call, loads included: peak {profile_['call_peak_bytes'] / GIB:.2f} GiB "
                 f"({profile_['call_peak_bytes'] / 1e9:.2f} GB) in {profile_['seconds']:.1f} s; "
                 f"estimated {profile_['estimated_peak_bytes'] / GIB:.2f} GiB")
    if len(profile_["calls"]) > 1:
        again = profile_["calls"][-1]
        lines.append(f"second call (the stages above): peak {again['peak_bytes'] / GIB:.2f} GiB in "
                     f"{again['seconds']:.1f} s")
    return "\n".join(lines)
