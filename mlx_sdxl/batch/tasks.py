"""Tasks: one image each, with its deterministic file name and the settings that identify it.

An image is named `<job>-<hash>.png`: the job's number (zero-padded) and a short hash of
its identity, the settings its PNG records (prompt, seed, size, steps, sampler, models
and their hashes, dtype, ...) less the package version. A task is finished when a file
of that name exists, is a whole PNG, and records that same identity; a file of that
name recording anything else is made again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

from .. import cli
from ..errors import InputError
from ..metadata import normalize_settings, read_metadata
from ..spec import BATCH_HASH_CHARS, BATCH_INDEX_DIGITS
from .jobs import Job
from .options import Defaults, GenerateOptions, resolve_job

# recorded fields that do not identify an image: the version that wrote it, and what the run
# found in use (embeddings and LoRAs the prompts named), and the mode, which follows from the inputs
NOT_IDENTITY = ("version", "embeddings", "loras", "mode")
# settings a run fills in when the job leaves them to the model (its scheduler config): identified by the model
RESOLVED_BY_RUN = ("scheduler", "timestep_spacing", "eta")


@dataclass(frozen=True)
class Task:
    """One image of one job, as every rank needs it (JSON-able: workers receive it as text)."""

    job: int
    line: int
    seed: int
    settings: dict          # generate's resolved settings (models located, dtype chosen)
    args: dict              # generate's parsed arguments for this job
    name: str               # the file name, e.g. 0003-1f0a9c2e.png
    identity: dict          # what the PNG must record for the task to count as done

    @property
    def where(self) -> str:
        return f"job {self.job} (line {self.line})"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Task":
        return cls(**data)


def identity(settings: dict, seed: int, pipe, mode: str) -> dict:
    """The recorded settings that identify a task's image: what `generate` records in metadata
    `mode`, less NOT_IDENTITY."""
    size = types.SimpleNamespace(width=settings.get("width"), height=settings.get("height"))
    recorded = normalize_settings(cli.record(settings, pipe, mode, seed, size))
    out = {k: v for k, v in recorded.items()
           if k not in NOT_IDENTITY and not (k in RESOLVED_BY_RUN and settings.get(k) is None)}
    if settings.get("image") is not None and settings.get("width") is None:  # the input image's own size
        out.pop("width", None)
        out.pop("height", None)
    return out


def file_name(job: int, ident: dict, digits: int) -> str:
    text = json.dumps(ident, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return f"{job:0{digits}d}-{hashlib.sha256(text.encode()).hexdigest()[:BATCH_HASH_CHARS]}.png"


def is_finished(path: Path, ident: dict) -> bool:
    """True when `path` is a readable PNG whose recorded settings match `ident`."""
    if not path.is_file():
        return False
    try:
        recorded = read_metadata(path)
    except InputError:  # cut short, not a PNG, no metadata
        return False
    return all(recorded.get(k) == v for k, v in ident.items())


def plan_tasks(jobs: List[Job], opts: GenerateOptions, defaults: Defaults, pipe) -> Tuple[List[Task], List[Tuple[Job, str]]]:
    """(the tasks of the readable jobs, in job order; the jobs that failed to resolve, with why)."""
    digits = max(BATCH_INDEX_DIGITS, len(str(len(jobs))))
    tasks, failed = [], []
    for job in jobs:
        if job.error is not None:
            failed.append((job, job.error))
            continue
        try:
            settings, seeds, args = resolve_job(opts, defaults, job.index, job.options)
        except InputError as e:
            failed.append((job, str(e)))
            continue
        for seed in seeds:
            ident = identity(settings, seed, pipe, args["metadata"])
            tasks.append(Task(job.index, job.line, seed, settings, args, file_name(job.index, ident, digits), ident))
    return tasks, failed
