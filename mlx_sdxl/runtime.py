"""Process-wide settings of MLX's backends that mlx_sdxl chooses by default.

MLX's CUDA backend records kernels into CUDA graphs before launching them. SDXL's UNet steps are
thousands of mostly short kernels, for which the recording costs more CPU time than the GPU spends
computing, so the GPU waits; launching the kernels directly (MLX_USE_CUDA_GRAPHS=0) makes each step
faster, at the cost of a higher memory peak (the CPU runs further ahead of the GPU, so more
intermediate buffers are alive at once). Measurements: see docs/performance.md.

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
