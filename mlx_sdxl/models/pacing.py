"""Bounded run-ahead: evaluate a long lazy computation in segments.

MLX builds a whole step's graph lazily and then hands it to the device. On a GPU the host encodes
kernels far ahead of their execution, and every buffer of every encoded kernel stays allocated
until the device has run it: with CUDA graphs off, a 1024² UNet step peaked at 11–12 GiB for
4–5 GiB of weights (docs/performance.md). Models call `pace(x)` at their layer boundaries (every
resnet, transformer layer and resampler: about 100 in an SDXL base step). Inside
`pacing(Pacer())`, every `STRIDE`-th boundary ends a segment: `x` is scheduled (`mx.async_eval`)
and the host then waits until the segment before it has finished, so at most two segments are in
flight while the device keeps working. Outside a pacing context (the default, and always inside
`mx.compile` traces) `pace` does nothing.

STRIDE trades the bound against the cost of ending a segment (about 50 µs of host time on an
H100). Measured there (fp16, 1024², batch 2, paced and unpaced step for step in one process,
bench/measured/h100-2026-11-27): a segment at every boundary (STRIDE 1) bounded the base step's
peak from 6.91 to 5.48 GiB (the 4-bit refiner's from 4.21 to 1.98 GiB) and cost 9.6% of the base's
54 ms step (the 4-bit refiner's ran 7% faster), the same with 2 or 4 segments in flight; every 4th
boundary: 8.41 → 6.62 GiB at 47.5 → 42.3 ms; every 8th: 8.02 → 6.26 GiB at 54.4 → 57.3 ms. STRIDE
is 1 because memory is what decides whether SDXL runs on a Mac, and a Mac's step takes seconds, so
100 segment ends cost well under 1% there (not measured on a Mac). On the CPU backend (fp32, 256²)
paced steps took 4347 vs 4350 ms (base) and 8218 vs 8073 ms (4-bit refiner).

The pacer in use is a context variable, so threads (the server's worker) and nested calls each
have their own.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, List, Optional

import mlx.core as mx

_current: ContextVar[Optional["Pacer"]] = ContextVar("mlx_sdxl_pacer", default=None)


STRIDE = 1  # boundaries per segment


class Pacer:
    """Ends a segment every `stride`-th boundary; keeps at most `depth` scheduled segments
    unfinished behind the newest one."""

    def __init__(self, stride: int = STRIDE, depth: int = 1):
        self.stride, self.depth = stride, depth
        self.boundaries = 0  # how many pace() calls reached it
        self.segments = 0  # how many segments were scheduled (for tests and benchmarks)
        self._pending: List[tuple] = []

    def __call__(self, *arrays: mx.array) -> None:
        self.boundaries += 1
        if self.boundaries % self.stride:
            return
        mx.async_eval(*arrays)
        self.segments += 1
        self._pending.append(arrays)
        while len(self._pending) > self.depth:
            mx.eval(*self._pending.pop(0))

    def finish(self) -> None:
        """Wait for every scheduled segment and drop the references to them."""
        pending, self._pending = self._pending, []
        for arrays in pending:
            mx.eval(*arrays)


@contextmanager
def pacing(pacer: Optional[Pacer]) -> Iterator[Optional[Pacer]]:
    """Within: `pace(x)` calls go to `pacer` (None: pacing off, e.g. around a compiled function)."""
    token = _current.set(pacer)
    try:
        yield pacer
    finally:
        _current.reset(token)
        if pacer is not None:
            pacer._pending = []


def pace(*arrays: mx.array) -> None:
    """A segment boundary: hand `arrays` to the current pacer, if any."""
    pacer = _current.get()
    if pacer is not None:
        pacer(*arrays)
