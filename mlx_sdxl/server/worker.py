"""One FIFO queue and the one thread that runs it, and so owns the models.

Jobs run in the order they were submitted. A job whose future was cancelled before the
worker reached it (its client went away, or the server is stopping) is dropped unrun.
A job's failure is its future's exception; the worker goes on with the next one.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Deque, Optional


def _release_streams() -> None:
    """MLX gives each thread that computes its own stream, served by a thread of MLX's own; one
    left behind when Python exits can abort the process ("terminate called without an active
    exception"), even after the Python thread was joined. The worker releases its streams last."""
    import mlx.core as mx

    mx.synchronize()
    mx.clear_streams()


class QueueFull(RuntimeError):
    """More jobs are waiting than --max-queue allows."""


class Job:
    def __init__(self, name: str, run: Callable[[], object]):
        self.name, self.run = name, run
        self.future: Future = Future()


class Worker:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._jobs: Deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.started = self.finished = self.dropped = 0
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mlx-sdxl-worker")
        self._thread.start()

    def waiting(self) -> int:
        with self._cond:
            return sum(not job.future.cancelled() for job in self._jobs)

    def submit(self, name: str, run: Callable[[], object]) -> Job:
        job = Job(name, run)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if sum(not j.future.cancelled() for j in self._jobs) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting (--max-queue); try again later")
            self._jobs.append(job)
            self._cond.notify()
        return job

    def _next(self) -> Optional[Job]:
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            return self._jobs.popleft() if self._jobs else None

    def _loop(self) -> None:
        try:
            self._run_jobs()
        finally:
            _release_streams()

    def _run_jobs(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                self.dropped += 1
                continue
            self.started += 1
            try:
                job.future.set_result(job.run())
            except BaseException as e:  # the job failed; the worker goes on
                job.future.set_exception(e)
            self.finished += 1

    def close(self) -> None:
        """Accept no more jobs and cancel the waiting ones; the running one goes on."""
        with self._cond:
            self._stopping = True
            for job in self._jobs:
                job.future.cancel()
            self._cond.notify_all()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
