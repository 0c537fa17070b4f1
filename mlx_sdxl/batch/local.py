"""Running tasks in this process: the whole batch on one machine, and rank 0's own share
when the batch is spread over several."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..metadata import pnginfo, save_png
from .ledger import Ledger
from .progress import BatchProgress
from .tasks import Task
from .work import JOB_ERRORS, Embeddings, make_image

RANK_TEMP = re.compile(r"^\..+\.png\.[0-9a-f]+-r\d+\.tmp$")


@dataclass
class Batch:
    """What the ranks that keep the ledger need to run a batch."""

    out: Path
    run: str
    ledger: Ledger
    progress: BatchProgress
    embeddings: Embeddings
    fail_fast: bool = False
    gather: bool = False
    trouble: Optional[str] = None   # why the batch stopped early because of a rank (lost, cannot run, a write)

    def left(self) -> int:
        """Images neither made nor failed (yet)."""
        return self.progress.to_make - self.ledger.done - self.ledger.failed_images


class TaskQueue:
    """The tasks still to hand out, shared by rank 0's own loop and its dispatcher (thread-safe)."""

    def __init__(self, tasks: Iterable[Task]):
        self._tasks = deque(tasks)
        self._lock = threading.Lock()
        self.stopped = False

    def take(self) -> Optional[Task]:
        with self._lock:
            return None if self.stopped or not self._tasks else self._tasks.popleft()

    def stop(self) -> None:
        with self._lock:
            self.stopped = True


def save(image, record: dict, batch: Batch, task: Task) -> Path:
    """Write a task's image atomically, with its metadata (replacing a file that records other settings)."""
    return save_png(image, batch.out / task.name, record, overwrite=True)


def save_from_rank(image, record: dict, path: Path, run: str, rank: int) -> Path:
    """Write an image into the shared folder atomically from a rank other than 0.

    The temporary is named for the run and the rank (`.NAME.png.<run>-r<rank>.tmp`), not for a
    process id as save_png's are: every machine sharing the folder removes the temporaries of
    process ids that are dead *there*, so another machine's live one must not look like them.
    Rank 0 removes the leftovers of earlier runs when a batch starts (`remove_rank_temps`).
    """
    tmp = path.parent / f".{path.name}.{run}-r{rank}.tmp"
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG", pnginfo=pnginfo(record))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def remove_rank_temps(folder: Path) -> None:
    """Remove the temporaries that ranks of earlier runs left in `folder` (see save_from_rank)."""
    for entry in os.scandir(folder):
        if RANK_TEMP.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def make_and_save(pipe, task: Task, batch: Batch, rank: int = 0) -> bool:
    """Make and write one task's image here; False when the job failed (logged with its line)."""
    batch.progress.begin_image(task.settings["num_inference_steps"])
    t0 = time.perf_counter()
    try:
        image, record = make_image(pipe, task, batch.embeddings, callback=batch.progress)
    except JOB_ERRORS as e:
        batch.ledger.job_failed(task.job, task.line, e, task, rank)
        return False
    path = save(image, record, batch, task)
    batch.ledger.image_done(task, path, time.perf_counter() - t0, rank)
    return True


def run_queue(pipe, tasks: TaskQueue, batch: Batch, rank: int = 0) -> None:
    """Make the queue's tasks here until it is empty or stopped (--fail-fast stops it at a failure)."""
    while (task := tasks.take()) is not None:
        if not make_and_save(pipe, task, batch, rank) and batch.fail_fast:
            batch.ledger.stop(f"--fail-fast: {task.where} failed")
            tasks.stop()
