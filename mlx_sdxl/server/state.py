"""What the server is doing now, shared between the worker and the request handlers.

The worker writes (a job begins, a step ends, a preview is made); handlers read a snapshot
and set flags (interrupt, skip, "a client wants a preview"). Everything is guarded by one
lock and holds plain Python values, so reading it never waits for MLX.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional


@dataclass
class _Job:
    name: str = ""
    count: int = 0               # iterations (A1111's job_count = n_iter)
    number: int = 0              # the iteration running (job_no)
    step: int = 0                # sampler steps done in this iteration
    steps: int = 0               # sampler steps per iteration
    started: float = 0.0
    timestamp: str = "0"
    interrupted: bool = False
    skipped: bool = False
    interrupt_step: Optional[int] = None   # the step the interrupt arrived at
    preview: Optional[str] = None          # base64 PNG of the latest preview
    preview_step: int = 0


@dataclass
class ServerState:
    preview_every: int = 1
    previews_made: int = 0               # over the server's life (tests read it)
    _job: _Job = field(default_factory=_Job)
    _preview_wanted: bool = False
    _closing: bool = False               # the server is stopping: every job stops at its next step
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---------------------------------------------------------------- the worker
    def begin(self, name: str, count: int, steps: int) -> None:
        stamp = datetime.now().strftime("%Y%m%d%H%M%S")
        with self._lock:
            self._job = _Job(name, count, 0, 0, steps, time.time(), stamp)
            self._preview_wanted = False

    def next_iteration(self, number: int) -> None:
        with self._lock:
            self._job.number, self._job.step, self._job.skipped = number, 0, False

    def at_step(self, step: int) -> bool:
        """Record a finished step; True when the job must stop now (interrupt or skip)."""
        with self._lock:
            self._job.step = step
            return self._job.interrupted or self._job.skipped or self._closing

    def preview_due(self) -> bool:
        """True when a client asked for a preview and none was made in the last `preview_every` steps."""
        with self._lock:
            job = self._job
            return self._preview_wanted and (job.preview is None or job.step - job.preview_step >= self.preview_every)

    def set_preview(self, image_b64: str, step: int) -> None:
        with self._lock:
            self._job.preview, self._job.preview_step = image_b64, step
            self._preview_wanted = False
            self.previews_made += 1

    def end(self) -> None:
        with self._lock:
            self._job = _Job()
            self._preview_wanted = False

    # ---------------------------------------------------------------- the handlers
    def interrupt(self) -> bool:
        """Stop the running job at the end of its current step; False when nothing runs."""
        with self._lock:
            if not self._job.name:
                return False
            if not self._job.interrupted:
                self._job.interrupted, self._job.interrupt_step = True, self._job.step
            return True

    def skip(self) -> bool:
        """Stop the running iteration (the job goes on with the next); False when nothing runs."""
        with self._lock:
            if not self._job.name:
                return False
            self._job.skipped = True
            return True

    def close(self) -> None:
        """The server is stopping: the running job (and any that starts now) stops at its next step."""
        with self._lock:
            self._closing = True
            self._job.interrupted = bool(self._job.name) or self._job.interrupted

    @property
    def interrupted(self) -> bool:
        with self._lock:
            return self._job.interrupted or self._closing

    @property
    def skipped(self) -> bool:
        with self._lock:
            return self._job.skipped

    @property
    def interrupt_step(self) -> Optional[int]:
        with self._lock:
            return self._job.interrupt_step

    def progress(self, want_image: bool) -> dict:
        """GET /sdapi/v1/progress, A1111's shape. `want_image` asks the worker for a preview."""
        with self._lock:
            job = self._job
            if want_image and job.name:
                self._preview_wanted = True
            return _progress_body(job, want_image)


def _progress_body(job: _Job, want_image: bool) -> dict:
    state = {"skipped": job.skipped, "interrupted": job.interrupted, "job": job.name, "job_count": job.count,
             "job_timestamp": job.timestamp, "job_no": job.number, "sampling_step": job.step,
             "sampling_steps": job.steps}
    if not job.name or job.count <= 0:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    done = (job.number + (job.step / job.steps if job.steps else 0.0)) / job.count
    progress = min(max(done, 0.01), 1.0)  # A1111 starts at 0.01 so the ETA is finite
    elapsed = time.time() - job.started
    return {"progress": progress, "eta_relative": max(elapsed / progress - elapsed, 0.0), "state": state,
            "current_image": job.preview if want_image else None, "textinfo": None}
