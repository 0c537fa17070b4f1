"""One progress bar for a whole batch: images made of those to make, the current image's
steps, and the time left (from the rate images have been finishing at, on every rank).

On a terminal the bar is redrawn in place; elsewhere nothing is drawn and only the
ledger's one line per image appears. Log lines go through `line()`, which keeps the
bar below them. Thread-safe: the dispatcher thread reports other ranks' images.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional

from ..progress import format_duration


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class BatchProgress:
    """`progress(stage, step, total, latents)` is also a pipeline callback (for this process's images)."""

    def __init__(self, to_make: int, stream=None, *, quiet: bool = False, bar: Optional[bool] = None,
                 width: int = 24, min_interval: float = 0.1):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.bar = (not quiet) and (_isatty(self.stream) if bar is None else bar)
        self.to_make, self.finished, self.width = to_make, 0, width
        self.min_interval = min_interval
        self._start = time.perf_counter()
        self._first_end: Optional[float] = None
        self._units = self._expected = 0
        self._last_event = None
        self._drawn = 0.0
        self._open = False
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- events
    def begin_image(self, steps: int) -> None:
        """This process starts an image of `steps` sampler steps (plus one decode)."""
        with self._lock:
            self._units, self._expected, self._last_event = 0, steps + 1, None

    def __call__(self, stage: str, step: int, total: int, latents=None) -> None:
        with self._lock:
            if (stage, step) != self._last_event:
                self._units += 1
                self._last_event = (stage, step)
            self._draw(force=False)

    def image_finished(self) -> None:
        """An image was made, here or on another rank."""
        with self._lock:
            self.finished += 1
            self._first_end = self._first_end or time.perf_counter()
            self._units = 0
            self._draw(force=True)

    def line(self, text: str, always: bool = False) -> None:
        """A log line above the bar (`always`: even when quiet, e.g. an error)."""
        with self._lock:
            if self.quiet and not always:
                return
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()
            self._draw(force=True)

    def end(self) -> None:
        with self._lock:
            self._clear()

    # ---------------------------------------------------------------- drawing
    def eta(self) -> Optional[float]:
        """Seconds left at the rate images have finished since the first one (None before that)."""
        if self._first_end is None or self.finished < 2:
            return None
        rate = (self.finished - 1) / max(time.perf_counter() - self._first_end, 1e-9)
        return (self.to_make - self.finished) / rate

    def _clear(self) -> None:
        if self._open:
            self.stream.write("\r\033[K")
            self._open = False

    def _draw(self, force: bool) -> None:
        now = time.perf_counter()
        if not self.bar or (not force and now - self._drawn < self.min_interval):
            return
        part = min(self._units / self._expected, 0.99) if self._expected else 0.0
        share = (self.finished + part) / max(self.to_make, 1)
        filled = min(self.width, int(self.width * share))
        text = f"\rbatch [{'#' * filled}{'-' * (self.width - filled)}] {self.finished}/{self.to_make} images"
        eta = self.eta()
        if eta is not None:
            text += f"  ETA {format_duration(eta)}"
        self.stream.write(text + "\033[K")
        self.stream.flush()
        self._open, self._drawn = True, now
