"""Data-parallel batches: rank 0 hands each task to whichever rank is free.

Rank 0 makes images itself and, in a dispatcher thread, answers the other ranks: each
says `ready` (then `done` or `failed` after every task) and gets the next `task`, or
`stop` when none is left. With `--gather` a rank sends its image's pixels and recorded
settings, and rank 0 writes the file; otherwise every rank writes into the shared
output folder (checked at the start: a rank must find rank 0's run in its log).

A rank that is lost (its process ended, its machine went away) stops the batch: no
more tasks are handed out, the others finish the image they are on and stop, and a
rerun makes what is left.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..errors import InputError, SDXLError
from ..metadata import normalize_settings
from ..spec import BATCH_LOG
from .comm import Link, Message, PeerLost, receive
from .ledger import one_line
from .local import Batch, TaskQueue, run_queue, save, save_from_rank
from .options import Defaults
from .tasks import Task
from .work import JOB_ERRORS, Embeddings, make_image, open_pipeline, rank_stats


# ---------------------------------------------------------------- rank 0
def lead(pipe, pending: List[Task], batch: Batch, links: Dict[int, Link], inbox: queue.Queue) -> List[dict]:
    """Run `pending` here and on the other ranks (`links`: to ranks 1, 2, ..., listening always, into
    `inbox`); the other ranks' stats (models, memory)."""
    for link in links.values():
        link.send("hello", {"run": batch.run, "gather": batch.gather})
    tasks, stats = TaskQueue(pending), {}
    dispatcher = threading.Thread(target=_dispatch, args=(links, inbox, tasks, batch, stats), daemon=True,
                                  name="batch-dispatch")
    dispatcher.start()
    try:
        run_queue(pipe, tasks, batch, rank=0)
    except BaseException:
        tasks.stop()  # Ctrl-C / SIGTERM here: hand out nothing more and leave at once
        raise
    while dispatcher.is_alive():
        dispatcher.join(0.2)
    return [stats[r] for r in sorted(stats)]


def _dispatch(links: Dict[int, Link], inbox: queue.Queue, tasks: TaskQueue, batch: Batch, stats: dict) -> None:
    active, busy = set(links), {}
    while active:
        item = inbox.get()
        if isinstance(item, PeerLost):
            if item.rank in active:
                active.discard(item.rank)
                batch.trouble = batch.trouble or f"lost {item}"
                batch.ledger.stop(f"lost {item}; run the same command again to make what is left")
                tasks.stop()
            continue
        rank = item.sender
        if item.kind == "bye":
            stats[rank] = item.meta
            active.discard(rank)
            continue
        try:
            _report(item, busy.pop(rank, None), batch, tasks)
        except (OSError, SDXLError) as e:  # e.g. a full disk while writing a gathered image
            batch.trouble = batch.trouble or one_line(e)
            batch.ledger.stop(one_line(e))
            tasks.stop()
        if item.kind in ("ready", "done", "failed"):
            task = tasks.take()
            if task is None:
                links[rank].send("stop")
            else:
                busy[rank] = task
                links[rank].send("task", {"task": task.to_json()})


def _report(item: Message, task: Task, batch: Batch, tasks: TaskQueue) -> None:
    """Log what a rank reported about its task (`done`, `failed`) or itself (`fatal`)."""
    rank = item.sender
    if item.kind == "done":
        if batch.gather:
            from PIL import Image

            path = save(Image.fromarray(np.array(item.arrays[0])), item.meta["record"], batch, task)
        else:
            path = batch.out / task.name
        batch.ledger.image_done(task, path, item.meta["seconds"], rank)
    elif item.kind == "failed":
        batch.ledger.job_failed(task.job, task.line, item.meta["error"], task, rank)
        if batch.fail_fast:
            batch.ledger.stop(f"--fail-fast: {task.where} failed")
            tasks.stop()
    elif item.kind == "fatal":
        batch.trouble = batch.trouble or f"rank {rank}: {item.meta['error']}"
        batch.ledger.stop(f"rank {rank} cannot run: {item.meta['error']}")
        tasks.stop()


# ---------------------------------------------------------------- the other ranks
def check_shared(out: Path, run: str) -> None:
    """Refuse an output folder that is not the one rank 0 writes (a folder of the same name on another machine)."""
    try:
        with open(out / BATCH_LOG, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - (1 << 20)))
            seen = f'"run": "{run}"'.encode() in f.read()
    except OSError:
        seen = False
    if not seen:
        raise InputError(f"{out} is not the folder rank 0 writes (its {BATCH_LOG} does not hold this run); give a "
                         "folder every rank shares, or --gather to send the images to rank 0")


def follow(group, defaults: Defaults, out: Path, prog: str) -> int:
    """A rank other than 0: make the tasks rank 0 sends until it says stop. The exit status."""
    rank, inbox = group.rank(), queue.Queue()
    link = Link(group, 0, inbox)
    pipe = None
    try:
        link.want()
        hello = receive(inbox)
        if hello.kind == "abort":  # rank 0 could not start the batch and said why
            return 2
        try:
            if not hello.meta["gather"]:
                check_shared(out, hello.meta["run"])
            pipe = open_pipeline(defaults)
        except (SDXLError, OSError) as e:
            print(f"{prog}: error: rank {rank}: {one_line(e)}", file=sys.stderr, flush=True)
            link.send("fatal", {"error": one_line(e)})
            link.send("bye", rank_stats(rank, pipe, "worker"))
            link.flush()
            return 2
        link.send("ready")
        _serve(pipe, link, inbox, hello.meta, out, Embeddings(defaults.args.embedding_dir), rank)
        link.send("bye", rank_stats(rank, pipe, "worker"))
        link.flush()
        return 0
    except PeerLost as e:
        print(f"{prog}: error: rank {rank} lost rank 0 ({e}); run the same command again to make what is left",
              file=sys.stderr, flush=True)
        return 3


def _serve(pipe, link: Link, inbox: queue.Queue, hello: dict, out: Path, embeddings: Embeddings, rank: int) -> None:
    import mlx.core as mx

    while True:
        link.want()
        message = receive(inbox)
        if message.kind in ("stop", "abort"):
            return
        task = Task.from_json(message.meta["task"])
        t0 = time.perf_counter()
        try:
            image, record = make_image(pipe, task, embeddings)
        except JOB_ERRORS as e:
            link.send("failed", {"task": task.name, "error": one_line(e)})
            continue
        meta = {"task": task.name, "seconds": time.perf_counter() - t0}
        if hello["gather"]:
            link.send("done", dict(meta, record=normalize_settings(record)), [mx.array(np.asarray(image))])
        else:
            save_from_rank(image, record, out / task.name, hello["run"], rank)
            link.send("done", meta)
