"""What the benchmark ran on: chip or CPU, memory, OS, Python, MLX and its backend, BLAS."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from typing import List, Optional

import mlx.core as mx

# A 1024² float32 matmul below this rate means an unoptimised BLAS: the netlib
# reference BLAS bundled with the mlx-cpu wheel runs at ~2-6 GFLOP/s, OpenBLAS
# at tens to hundreds.
REFERENCE_BLAS_GFLOPS = 15.0


def backend() -> str:
    """"metal", "cuda" or "cpu": where MLX's default device computes."""
    if mx.default_device().type == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "gpu"


def _cpu_model() -> Optional[str]:
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def loaded_blas_libraries() -> List[str]:
    """Shared BLAS libraries mapped into this process (Linux), numpy's private copy left out."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return []
    found = set(re.findall(r"(/\S*/lib(?:open)?blas[^/\s]*\.so[\w.\-]*|/\S*/lib(?:mkl|blis)[^/\s]*\.so[\w.\-]*)",
                           maps))
    return sorted(p for p in found if "numpy" not in p and "scipy_openblas" not in p)


def _kind(path: str) -> Optional[str]:
    real = os.path.realpath(path).lower()
    for name in ("openblas", "mkl", "blis"):
        if name in real:
            return name
    if "mlx_cpu.libs" in real or "mlx.libs" in real:
        return "reference"  # the netlib BLAS inside the mlx-cpu wheel
    return None


def matmul_gflops(n: int = 1024, repeats: int = 3) -> float:
    """float32 n×n matmul rate on the default device, best of `repeats`."""
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def blas_info(measure: bool = True) -> dict:
    """Which BLAS MLX's CPU backend calls, judged from the loaded libraries and a timed matmul."""
    libs = loaded_blas_libraries()
    preload = os.environ.get("LD_PRELOAD", "")
    preloaded = [p for p in re.split(r"[:\s]+", preload) if p and _kind(p) not in (None, "reference")]
    if sys.platform == "darwin":
        library = "accelerate"
    elif preloaded:  # a preloaded BLAS answers MLX's cblas calls first
        library = _kind(preloaded[0])
    else:
        kinds = [_kind(p) for p in libs]
        library = "reference" if "reference" in kinds else next((k for k in kinds if k), "unknown")
    info = {"library": library, "loaded": libs, "ld_preload": preload or None, "matmul_gflops": None,
            "slow": False}
    if measure and backend() == "cpu":
        with mx.stream(mx.cpu):
            info["matmul_gflops"] = round(matmul_gflops(), 2)
        info["slow"] = info["matmul_gflops"] < REFERENCE_BLAS_GFLOPS
        if library == "unknown" and info["slow"]:
            info["library"] = "reference"
    return info


def openblas_hint() -> str:
    arch = platform.machine() or "x86_64"
    triple = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}.get(
        arch, f"{arch}-linux-gnu")
    return ("MLX's CPU backend is calling the reference BLAS bundled with the mlx-cpu wheel, which is "
            "10-30x slower than an optimised one. Preload OpenBLAS:\n"
            "    sudo apt-get install libopenblas0-pthread\n"
            f"    LD_PRELOAD=/usr/lib/{triple}/openblas-pthread/libblas.so.3 mlx-sdxl bench ...")


def machine_info(measure_blas: bool = True) -> dict:
    import mlx_sdxl
    from mlx_sdxl.runtime import mlx_environment

    device = {}
    try:
        device = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except (AttributeError, RuntimeError):
        pass
    kind = backend()
    info = {
        "backend": kind,
        "chip": device.get("device_name") if kind != "cpu" else None,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpu_memory_bytes": device.get("memory_size") or device.get("total_memory") if kind != "cpu" else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx_version": mx.__version__,
        "mlx_sdxl_version": getattr(mlx_sdxl, "__version__", None),
        "blas": blas_info(measure_blas) if kind == "cpu" else {"library": "n/a (GPU backend)"},
        "mlx_environment": mlx_environment(),
    }
    return info


def describe(info: dict) -> str:
    """One line for the Markdown report and the console."""
    mem = info.get("memory_bytes")
    parts = [info.get("chip") or info.get("cpu") or "unknown CPU",
             f"{info.get('cpu_count')} cores" if info.get("cpu_count") else None,
             f"{mem / 2 ** 30:.0f} GiB RAM" if mem else None,
             info.get("os"), f"Python {info.get('python')}",
             f"MLX {info.get('mlx_version')} ({info.get('backend')})"]
    if info.get("backend") == "cuda":
        env = info.get("mlx_environment") or {}
        graphs = env.get("MLX_USE_CUDA_GRAPHS", "1") != "0"
        parts.append("CUDA graphs " + (f"on (MLX_MAX_OPS_PER_BUFFER={env['MLX_MAX_OPS_PER_BUFFER']})"
                                       if graphs and "MLX_MAX_OPS_PER_BUFFER" in env else "on" if graphs else "off"))
    blas = info.get("blas") or {}
    if info.get("backend") == "cpu":
        rate = blas.get("matmul_gflops")
        parts.append(f"BLAS {blas.get('library')}" + (f" ({rate:g} GFLOP/s fp32 1024² matmul)" if rate else ""))
    return ", ".join(p for p in parts if p)
