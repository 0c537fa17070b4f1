"""The machine's memory: how much there is, and keeping resident weights wired on a Mac.

- `device_memory()`: the memory a generation can use, in bytes, and what it is: on Apple silicon
  the GPU's recommended working set (`mx.device_info()["max_recommended_working_set_size"]`, a share
  of the unified memory), else the device memory MLX reports, or the system RAM where it
  reports none (the CPU backend).
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


MEMORY_KEYS = (("max_recommended_working_set_size", "recommended GPU working set"), ("memory_size", "memory"),
               ("total_memory", "memory"))


def device_memory() -> Tuple[int, str]:
    """(bytes, what they are) of the memory a generation can use: on a Mac, the GPU's recommended
    working set (macOS keeps the rest of the unified memory for itself);
    else the device's memory as MLX reports it, or the system RAM."""
    info = _info()
    for key, what in MEMORY_KEYS:
        if info.get(key):
            return int(info[key]), f"{info.get('device_name') or 'GPU'} {what}"
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
