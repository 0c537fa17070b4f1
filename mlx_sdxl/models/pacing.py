"""Bounded run-ahead: evaluate a long lazy computation in segments.

MLX builds a whole step's graph lazily and then hands it to the device. On a GPU the host encodes
kernels far ahead of their execution, and every buffer of every encoded kernel stays allocated
until the device has run it: with CUDA graphs off, a 1024² UNet step peaked at 11–12 GiB for
4–5 GiB of weights (docs/performance.md). Models call `pace(x)` at their block boundaries; inside
`pacing(Pacer())` that schedules `x` (`mx.async_eval`) and then waits until the segment before it
has finished, so at most two segments are in flight while the device never waits for the host.
Outside a pacing context (the default, and always inside `mx.compile` traces) `pace` does nothing.

The pacer in use is a context variable, so threads (the server's worker) and nested calls each
have their own.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, List, Optional

import mlx.core as mx

_current: ContextVar[Optional["Pacer"]] = ContextVar("mlx_sdxl_pacer", default=None)


class Pacer:
    """Keeps at most `depth` scheduled segments unfinished behind the newest one."""

    def __init__(self, depth: int = 1):
        self.depth = depth
        self.segments = 0  # how many segments were scheduled (for tests and benchmarks)
        self._pending: List[tuple] = []

    def __call__(self, *arrays: mx.array) -> None:
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
