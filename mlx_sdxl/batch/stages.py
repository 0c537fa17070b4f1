"""Stage-parallel batches (`--stages base@0,refiner@1`): one image's stages on two ranks.

Rank 0 holds the text encoders and the base: it encodes every stage's conditioning,
runs the base, and sends the hand-off latents with the refiner's conditioning to rank 1
(`mx.distributed.send`, from a background thread). Rank 1 holds the refiner and the VAE:
it rebuilds the same plan from the task (no model needed for that), runs the refiner
on what it received, decodes, and writes the image (or, with `--gather`, sends its
pixels back). Rank 0 goes on with the next task's base while rank 1 finishes the last
one, and waits for rank 1's report of task k-1 only after handing over task k, so the
two stages overlap and at most two tasks are in flight.

The two halves are `SDXLPipeline.run_first_stage` and `run_last_stages`, which together
are the single-process run, so the images are the same bit for bit.
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import time
from collections import deque
from pathlib import Path
from typing import Deque, List, Tuple

import numpy as np

from .. import cli
from ..errors import InputError, SDXLError
from ..metadata import normalize_settings
from ..spec import BATCH_STAGES
from .comm import Link, PeerLost, receive
from .ledger import one_line
from .local import Batch, save, save_from_rank
from .options import Defaults
from .spread import check_shared
from .tasks import Task
from .work import JOB_ERRORS, Embeddings, open_pipeline, rank_stats, task_args

ROLES = {0: "base", 1: "refiner"}


def parse_stages(text: str) -> str:
    """Check a --stages value: the one split offered (text encoders + base on rank 0, refiner + VAE on rank 1)."""
    given = sorted(part.strip() for part in str(text).split(","))
    if given != sorted(BATCH_STAGES.split(",")):
        raise InputError(f"--stages {text}: accepted is {BATCH_STAGES} (rank 0 runs the text encoders and the base, "
                         "rank 1 the refiner and the VAE)")
    return BATCH_STAGES


def _plan(pipe, task: Task):
    kwargs = cli.generate_kwargs(task.settings, (None, None, []), task.seed, task_args(task))
    return pipe.plan(**kwargs)


# ---------------------------------------------------------------- rank 0: text encoders + base
def _first_half(pipe, task: Task, link: Link, batch: Batch) -> bool:
    """Run a task's base and hand its latents and conditioning to rank 1; False when it failed here."""
    batch.progress.begin_image(task.settings["num_inference_steps"])
    t0 = time.perf_counter()
    try:
        if task.settings["image"] is not None:
            raise InputError("a job with an --image does not run with --stages (the VAE that reads the image is on "
                             "rank 1); run it in a batch without --stages")
        batch.embeddings.prepare(pipe, task.settings)
        x, later = pipe.run_first_stage(_plan(pipe, task), callback=batch.progress)
    except JOB_ERRORS as e:
        batch.ledger.job_failed(task.job, task.line, e, task, 0)
        return False
    conditions = [stage.conditioning for stage in later]
    fields = [[f.name for f in dataclasses.fields(c) if getattr(c, f.name) is not None] for c in conditions]
    arrays = [x, *(getattr(c, name) for c, names in zip(conditions, fields) for name in names)]
    link.send("task", {"task": task.to_json(), "stages": [s.name for s in later], "fields": fields,
                       "seconds": time.perf_counter() - t0}, arrays)
    return True


def _collect(link: Link, inbox: queue.Queue, waiting: Deque[Task], batch: Batch) -> None:
    """Wait for rank 1's report on the oldest task handed over, and log it."""
    link.want()
    message = receive(inbox)
    task = waiting.popleft()
    if message.kind == "done":
        if batch.gather:
            from PIL import Image

            path = save(Image.fromarray(np.array(message.arrays[0])), message.meta["record"], batch, task)
        else:
            path = batch.out / task.name
        batch.ledger.image_done(task, path, message.meta["seconds"], 1)
    else:
        batch.ledger.job_failed(task.job, task.line, message.meta["error"], task, 1)
        if batch.fail_fast:
            batch.ledger.stop(f"--fail-fast: {task.where} failed")


def lead_stages(pipe, pending: List[Task], batch: Batch, link: Link, inbox: queue.Queue) -> List[dict]:
    """Run `pending` split over ranks 0 and 1; rank 1's stats (models, memory)."""
    link.send("hello", {"run": batch.run, "gather": batch.gather})
    try:
        link.want()
        first = receive(inbox)
        if first.kind == "fatal":
            batch.trouble = f"rank 1: {first.meta['error']}"
            batch.ledger.stop(f"rank 1 cannot run: {first.meta['error']}")
        waiting: Deque[Task] = deque()
        for task in pending if batch.trouble is None else []:
            if batch.ledger.stopped:
                break
            if _first_half(pipe, task, link, batch):
                waiting.append(task)
            elif batch.fail_fast:
                batch.ledger.stop(f"--fail-fast: {task.where} failed")
            while len(waiting) > 1 or (waiting and batch.ledger.stopped):
                _collect(link, inbox, waiting, batch)
        while waiting:
            _collect(link, inbox, waiting, batch)
        if first.kind != "fatal":
            link.send("stop")
        link.want()
        return [receive(inbox).meta]  # rank 1's "bye"
    except PeerLost as e:
        batch.trouble = f"lost {e}"
        batch.ledger.stop(f"lost {e}; run the same command again to make what is left")
        return []


# ---------------------------------------------------------------- rank 1: refiner + VAE
def _second_half(pipe, message, embeddings: Embeddings) -> Tuple[Task, object, dict]:
    task = Task.from_json(message.meta["task"])
    from ..pipeline import Conditioning

    embeddings.prepare(pipe, task.settings)  # the record names the embeddings the prompts used
    plan = _plan(pipe, task)
    later = plan.stages[1:]
    if [s.name for s in later] != message.meta["stages"]:
        raise InputError(f"rank 0 ran a plan of other stages ({message.meta['stages']}); are both ranks on the "
                         "same version with the same models?")
    arrays = iter(message.arrays[1:])
    later = tuple(dataclasses.replace(stage, conditioning=Conditioning(**{n: next(arrays) for n in names}))
                  for stage, names in zip(later, message.meta["fields"]))
    result = pipe.run_last_stages(plan, message.arrays[0], later)
    image, record = cli.finish_image(result, pipe, task.settings, task.seed, task_args(task))
    return task, image, record


def follow_stages(group, defaults: Defaults, out: Path, prog: str) -> int:
    """Rank 1 of a --stages batch. The exit status."""
    inbox: queue.Queue = queue.Queue()
    link, pipe = Link(group, 0, inbox), None
    try:
        link.want()
        hello = receive(inbox)
        if hello.kind == "abort":
            return 2
        try:
            if not hello.meta["gather"]:
                check_shared(out, hello.meta["run"])
            pipe = open_pipeline(defaults)
        except (SDXLError, OSError) as e:
            print(f"{prog}: error: rank 1: {one_line(e)}", file=sys.stderr, flush=True)
            link.send("fatal", {"error": one_line(e)})
            link.send("bye", rank_stats(1, pipe, ROLES[1]))
            link.flush()
            return 2
        link.send("ready")
        _serve(pipe, link, inbox, hello.meta, out, Embeddings(defaults.args.embedding_dir), 1)
        link.send("bye", rank_stats(1, pipe, ROLES[1]))
        link.flush()
        return 0
    except PeerLost as e:
        print(f"{prog}: error: rank 1 lost rank 0 ({e}); run the same command again to make what is left",
              file=sys.stderr, flush=True)
        return 3


def _serve(pipe, link: Link, inbox: queue.Queue, hello: dict, out: Path, embeddings: Embeddings, rank: int) -> None:
    """Finish the tasks rank 0 hands over until it says stop."""
    import mlx.core as mx

    while True:
        link.want()
        message = receive(inbox)
        if message.kind in ("stop", "abort"):
            return
        t0 = time.perf_counter()
        try:
            task, image, record = _second_half(pipe, message, embeddings)
        except JOB_ERRORS as e:
            link.send("failed", {"error": one_line(e)})
            continue
        meta = {"seconds": message.meta["seconds"] + time.perf_counter() - t0}
        if hello["gather"]:
            link.send("done", dict(meta, record=normalize_settings(record)), [mx.array(np.asarray(image))])
        else:
            save_from_rank(image, record, out / task.name, hello["run"], rank)
            link.send("done", meta)
