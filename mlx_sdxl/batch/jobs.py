"""A job file → jobs: one per line, each with its line number.

Two forms, told apart by the first line that is not blank:

- JSON Lines: that line starts with `{`; every line is one JSON object of `generate`
  options (`{"prompt": "a fox", "steps": 30, "seed": 7}`); blank lines and lines starting
  with `#` are skipped.
- Plain text: every line that is not blank is one prompt, as written.

A line that cannot be read (bad JSON, not an object) becomes a job that carries its
error, so that the batch logs it with its line number and goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..errors import InputError
from ..spec import BATCH_MAX_FILE_MB, BATCH_MAX_JOBS


@dataclass(frozen=True)
class Job:
    """One line of the job file: `options` as given there, or why they could not be read."""

    index: int                                  # 1, 2, ...: the job's number among the jobs
    line: int                                   # its line in the file
    options: dict = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def where(self) -> str:
        return f"job {self.index} (line {self.line})"


def _text(path: Path) -> str:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"job file not found: {path}") from None
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a .jsonl file (one JSON object a line) or a text file of prompts")
    if size > BATCH_MAX_FILE_MB * 1e6:
        raise InputError(f"{path} is {size / 1e6:.0f} MB; job files of up to {BATCH_MAX_FILE_MB:g} MB are accepted")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _json_job(index: int, number: int, line: str) -> Job:
    try:
        options = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        reason = getattr(e, "msg", "too deeply nested")
        return Job(index, number, error=f"not valid JSON ({reason}); each line must be one JSON object")
    if not isinstance(options, dict):
        return Job(index, number, error=f"a JSON {type(options).__name__}, not an object of generate options")
    return Job(index, number, options)


def parse_jobs(text: str) -> List[Job]:
    """The jobs in a job file's text (see the module docstring)."""
    lines = text.splitlines()
    first = next((s.strip() for s in lines if s.strip()), "")
    as_json = first.startswith("{")
    jobs: List[Job] = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or (as_json and line.startswith("#")):
            continue
        if len(jobs) == BATCH_MAX_JOBS:
            raise InputError(f"the job file has more than {BATCH_MAX_JOBS} jobs; split it into several batches")
        index = len(jobs) + 1
        jobs.append(_json_job(index, number, line) if as_json else Job(index, number, {"prompt": raw.strip()}))
    return jobs


def read_jobs(path) -> List[Job]:
    """The jobs of the file at `path`; raises InputError when the file itself is unusable or holds no job."""
    path = Path(path).expanduser()
    jobs = parse_jobs(_text(path))
    if not jobs:
        raise InputError(f"{path} holds no job: give one JSON object or one prompt a line")
    return jobs
