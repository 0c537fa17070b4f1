"""What a batch did: counts, `DIR/batch-log.jsonl`, image paths on stdout, lines on stderr.

Every run appends to the log, one JSON object a line, each with the time, the run's id
and an `event`:

    start     jobs, images, to_make, ranks, mode
    skipped   job, line, file: already made with the same settings
    done      job, line, file, seed, rank, seconds
    failed    job, line, error (and file, seed, rank when one image of the job failed)
    stopped   reason: why the batch stopped before its end (--fail-fast, a lost rank, ...)
    end       status, done, failed, skipped, left, seconds, ranks (per-rank models and memory)

Only rank 0 (or the single process) keeps the ledger; other ranks report to it.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ..spec import BATCH_LOG
from .progress import BatchProgress


def one_line(error) -> str:
    return " ".join(str(error).split())


class Ledger:
    def __init__(self, out: Path, run: str, progress: BatchProgress, prog: str, stdout=None):
        self.path = Path(out) / BATCH_LOG
        self.run, self.progress, self.prog = run, progress, prog
        self.stdout = stdout if stdout is not None else sys.stdout
        self.done = self.failed = self.skipped = 0
        self.failed_images = 0   # failures of tasks (images), not of job lines that could not be read
        self.stopped: Optional[str] = None
        self._t0 = time.perf_counter()
        self._lock = threading.RLock()
        self._file = open(self.path, "a", encoding="utf-8")

    def event(self, event: str, **fields) -> None:
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "run": self.run,
                 "event": event, **fields}
        with self._lock:
            self._file.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
            self._file.flush()

    # ---------------------------------------------------------------- what happened
    def image_done(self, task, path: Path, seconds: float, rank: int) -> None:
        with self._lock:
            self.done += 1
            self.event("done", job=task.job, line=task.line, file=task.name, seed=task.seed, rank=rank,
                       seconds=round(seconds, 3))
            self.progress.image_finished()
            if not self.progress.bar:  # a terminal shows the bar; a log gets one line per image
                self.progress.line(f"[{self.progress.finished}/{self.progress.to_make}] {task.name} (job {task.job}, "
                                   f"line {task.line}, seed {task.seed}, rank {rank}, {seconds:.1f} s)")
            print(path, file=self.stdout, flush=True)

    def image_skipped(self, task) -> None:
        with self._lock:
            self.skipped += 1
            self.event("skipped", job=task.job, line=task.line, file=task.name)

    def job_failed(self, job: int, line: int, error, task=None, rank: Optional[int] = None) -> None:
        """A job that could not be read, or one image of it that failed (`task`)."""
        message = one_line(error)
        extra = {} if task is None else {"file": task.name, "seed": task.seed, "rank": rank}
        with self._lock:
            self.failed += 1
            self.failed_images += task is not None
            self.event("failed", job=job, line=line, error=message, **extra)
            self.progress.line(f"{self.prog}: job {job} (line {line}) failed: {message}", always=True)

    def stop(self, reason: str) -> None:
        """The batch stops handing out images (the first reason is the one kept)."""
        with self._lock:
            if self.stopped is None:
                self.stopped = one_line(reason)
                self.event("stopped", reason=self.stopped)
                self.progress.line(f"{self.prog}: stopping: {self.stopped}", always=True)

    def note(self, text: str) -> None:
        self.progress.line(text)

    # ---------------------------------------------------------------- the end
    def finish(self, status: str, left: int, ranks=None) -> str:
        """Log the end and return the closing summary line."""
        seconds = time.perf_counter() - self._t0
        with self._lock:
            self.event("end", status=status, done=self.done, failed=self.failed, skipped=self.skipped, left=left,
                       seconds=round(seconds, 3), ranks=ranks or [])
            self.progress.end()
            self._file.close()
        summary = (f"{self.prog}: {self.done} made, {self.failed} failed, {self.skipped} skipped (already made)"
                   + (f", {left} not made" if left else "") + f" in {seconds:.1f} s; log: {self.path}")
        return summary
