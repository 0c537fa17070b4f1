"""Process-wide settings of MLX's backends that mlx_sdxl chooses by default.

MLX's CUDA backend records kernels into CUDA graphs of up to 100 operations (on Hopper GPUs)
before launching them. For SDXL's UNets, whose steps are 1,400-2,200 mostly short kernels, the
recording costs more CPU time than the GPU spends computing, and the GPU waits. Launching the
kernels directly (MLX_USE_CUDA_GRAPHS=0) measured, on an H200 with MLX 0.32.4, fp16, 1024×1024,
batch 2 (bench/measured/h200-2026-11-26):

    base UNet step     60.3 ms → 46.1 ms (compiled 58.2 → 45.3 ms)
    refiner UNet step  76.0 ms → 46.1 ms (compiled 60.0 → 43.9 ms)

at a cost in memory: with the CPU further ahead of the GPU, more intermediate buffers are alive
at once (the base step's peak went from 6.3 to 11.6 GiB). With graphs kept, smaller ones were
faster (MLX_MAX_OPS_PER_BUFFER=10: base 47.7 ms, refiner 48.2 ms, peaks 6.0 and 5.6 GiB).

`apply_cuda_defaults()` runs when mlx_sdxl is imported and sets CUDA_DEFAULTS in the
environment where it has no value of its own, so a variable set before the import wins, e.g.
`MLX_USE_CUDA_GRAPHS=1 MLX_MAX_OPS_PER_BUFFER=10` for the lower peak. MLX reads these variables
at its first GPU evaluation in the process; they do nothing on Metal or on the CPU.
"""

from __future__ import annotations

import os
from typing import Dict

CUDA_DEFAULTS = {"MLX_USE_CUDA_GRAPHS": "0"}


def apply_cuda_defaults() -> Dict[str, str]:
    """Set each of CUDA_DEFAULTS that the environment does not already set; the values in effect."""
    for name, value in CUDA_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in CUDA_DEFAULTS}


def mlx_environment() -> Dict[str, str]:
    """The MLX_* environment variables of this process (recorded with benchmark results)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLX_")}
