"""Progress reporting for the command line: a pipeline callback that draws one
bar per stage (base steps, refiner steps, decode) on a terminal, and plain log
lines everywhere else.

    progress = Progress(timings=pipe.models.load_seconds.copy)
    result = pipe.generate(prompt, callback=progress)
    progress.summary(result.timings)
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional

from .spec import BASE, DECODE, ENCODE, REFINER


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Pipeline callback `(stage, step, total_steps, latents)` that reports progress.

    On a TTY it redraws a bar with `\\r` (it/s and ETA); otherwise it writes a
    plain line when a stage ends (and every `line_interval` seconds during long
    stages). `quiet=True` writes nothing. `timings` returns the pipeline's model
    load times (`pipe.models.load_seconds`) so loads are reported as they happen. It never
    cancels a run.
    """

    def __init__(self, stream=None, *, quiet: bool = False, bar: Optional[bool] = None, width: int = 24,
                 timings: Optional[Callable[[], dict]] = None, min_interval: float = 0.1,
                 line_interval: float = 15.0):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.bar = _isatty(self.stream) if bar is None else bar
        self.width = width
        self.timings = timings
        self.min_interval = min_interval
        self.line_interval = line_interval
        self._reported_loads = set()
        self.begin()

    # ---------------------------------------------------------------- output
    def _write(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(text)
            self.stream.flush()

    def log(self, message: str) -> None:
        """A plain line (a drawn bar is finished first)."""
        self._end_bar()
        self._write(message + "\n")

    def _end_bar(self) -> None:
        if self._bar_open:
            self._write("\n")
            self._bar_open = False

    # ---------------------------------------------------------------- events
    def begin(self) -> None:
        """Start a new run: the next callback opens a fresh stage."""
        self._stage = None
        self._step = 0
        self._mark = time.perf_counter()
        self._bar_open = False

    def __call__(self, stage: str, step: int, total: int, latents=None) -> None:
        now = time.perf_counter()
        if stage != self._stage or step <= self._step:
            self._end_bar()
            self._report_loads()
            self._stage, self._total = stage, total
            self._stage_start = self._mark   # the previous event: this stage's work began after it
            self._first_step = now            # the first step's time includes one-off work (compilation)
            self._last_draw, self._last_line = 0.0, now
        self._step, self._mark = step, now
        done = step >= total
        if self.bar:
            if done or now - self._last_draw >= self.min_interval:
                self._draw(now, done)
                self._last_draw = now
        elif done or now - self._last_line >= self.line_interval:
            self._line(now, done)
            self._last_line = now
        if done:
            self._end_bar()

    def end(self) -> None:
        self._end_bar()

    # ---------------------------------------------------------------- rendering
    def _rate(self, now: float) -> Optional[float]:
        """Steps per second after the first step (which also pays for loading and compilation)."""
        if self._step > 1 and now > self._first_step:
            return (self._step - 1) / (now - self._first_step)
        return None

    def _elapsed(self, now: float) -> float:
        """Time spent on this stage's steps: the steps after the first, scaled up to all of them."""
        if self._step > 1:
            return (now - self._first_step) * self._step / (self._step - 1)
        return now - self._stage_start

    def _stats(self, now: float, done: bool) -> str:
        rate = self._rate(now) if self._total > 1 else None
        parts = [f"{self._step}/{self._total}"]
        if rate:
            parts.append(f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it")
        if done:
            parts.append(f"{self._elapsed(now):.1f} s")
        elif rate:
            parts.append(f"ETA {format_duration((self._total - self._step) / rate)}")
        return "  ".join(parts)

    def _draw(self, now: float, done: bool) -> None:
        filled = int(self.width * self._step / max(self._total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        self._write(f"\r{self._stage:<8} [{bar}] {self._stats(now, done)}\033[K")
        self._bar_open = True

    def _line(self, now: float, done: bool) -> None:
        self._write(f"{self._stage}: {self._stats(now, done)}\n")

    def _report_loads(self, timings: Optional[dict] = None) -> None:
        if timings is None:
            if self.timings is None:
                return
            timings = self.timings()
        for key, seconds in list(timings.items()):
            if key.startswith("load_") and key not in self._reported_loads:
                self._reported_loads.add(key)
                role, _, part = key[len("load_"):].partition("_")
                self.log(f"loaded {role} {part} in {seconds:.2f} s")

    def summary(self, timings: dict, total_seconds: Optional[float] = None) -> None:
        """A closing summary: loads not yet reported, time per stage, peak memory."""
        self._end_bar()
        self._report_loads(timings)
        parts = []
        for stage in (ENCODE, BASE, REFINER, DECODE):
            t = timings.get(stage)
            if t is None:
                continue
            if isinstance(t, (int, float)):
                parts.append(f"{stage.replace('_', ' ')} {t:.2f} s")
                continue
            text = f"{stage} {t.seconds:.2f} s"
            if stage != "decode" and t.steps:
                text += f" ({t.steps} step{'s' if t.steps != 1 else ''})"
            if t.peak_memory:
                text += f", peak {format_bytes(t.peak_memory)}"
            parts.append(text)
        if total_seconds is not None:
            parts.append(f"total {total_seconds:.2f} s")
        if parts:
            self.log("; ".join(parts))
