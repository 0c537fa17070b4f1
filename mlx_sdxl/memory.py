"""The machine's memory: how much there is, and keeping resident weights wired on a Mac.

- `device_memory()`: the memory a generation can use, in bytes, and what it is: the GPU's memory
  as MLX reports it (`mx.device_info()["memory_size"]`: on Apple silicon, the unified memory), or
  the system RAM where MLX reports none (the CPU backend).
- `wired_limit()`: on Metal, for the duration of a generation, MLX's wired limit is raised to the
  GPU's recommended working set (`max_recommended_working_set_size`), as mlx-lm does for large
  models. Memory under the wired limit stays resident: macOS does not compress or page out the
  weights between steps, which would otherwise stall a step on page faults when memory is tight.
  The previous limit is restored afterwards. Elsewhere it does nothing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Tuple

import mlx.core as mx


def _info() -> dict:
    try:
        return dict(mx.device_info())
    except (AttributeError, RuntimeError):  # an older MLX, or a backend without device information
        return {}


def system_ram() -> int:
    """Bytes of physical memory (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def device_memory() -> Tuple[int, str]:
    """(bytes, what they are) of the memory MLX computes in."""
    info = _info()
    for key in ("memory_size", "total_memory"):
        if info.get(key):
            return int(info[key]), f"{info.get('device_name') or 'GPU'} memory"
    return system_ram(), "system RAM"


def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except AttributeError:
        return False


@contextmanager
def wired_limit() -> Iterator[None]:
    """Within: on Metal, the wired limit is the recommended working set (see the module docstring)."""
    size = _info().get("max_recommended_working_set_size") if metal_available() else None
    if not size:
        yield
        return
    old = mx.set_wired_limit(int(size))
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)
