"""`mlx-sdxl batch JOBS --out DIR [generate options]`: a file of jobs, resumably, on one
machine or several.

Exit status: 0 every image made (or already there); 1 some jobs failed (with
--fail-fast, the batch stopped at the first); 2 a bad command line or job file, or a
setup that cannot run (one `error:` line, nothing made); 3 the batch stopped early
because a rank was lost or could not run (run the same command again to resume);
130 / 143 / 129 after Ctrl-C / SIGTERM / SIGHUP.
"""

from __future__ import annotations

import argparse
import os
import queue
import secrets
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import InputError, SDXLError
from ..signals import report, terminate_as_interrupt
from ..spec import BATCH_LOG, BATCH_STAGES
from ..tempfiles import remove_stale
from .comm import Link, world
from .jobs import read_jobs
from .ledger import Ledger, one_line
from .local import Batch, TaskQueue, remove_rank_temps, run_queue
from .options import GenerateOptions, read_defaults
from .progress import BatchProgress
from .spread import follow, lead
from .stages import follow_stages, lead_stages, parse_stages
from .tasks import is_finished, plan_tasks
from .work import Embeddings, open_pipeline, rank_stats

EPILOG = f"""\
JOBS is a JSON Lines file, one object of generate options a line, keyed by generate's long
option names (dashes or underscores), e.g.
  {{"prompt": "a red fox in snow", "negative_prompt": "blurry", "seed": 7, "steps": 30}}
or a text file of one prompt a line. Any generate option given here is every job's default;
options that choose what is loaded (--model, --refiner, --vae, --dtype, --refiner-bits,
--low-memory, --compile, --embedding, --embedding-dir, --metadata) hold for the whole batch.

Each image is written as DIR/<job>-<settings hash>.png with its settings; a rerun skips the
images already made with the same settings. DIR/{BATCH_LOG} records what each run did.

Several machines:  mlx.launch --hosts mac1,mac2 -- mlx-sdxl batch JOBS --out DIR --distributed
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                usage=f"{prog} JOBS --out DIR [--fail-fast] [--distributed [--gather] [--stages {BATCH_STAGES}]] "
                      "[generate options]",
                description="Generate every job of a job file; run it again to finish what was left.",
                epilog=EPILOG)
    p.add_argument("jobs", metavar="JOBS", help="a .jsonl file of generate options, or a text file of prompts")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder the images and the log go to")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first job that fails")
    d = p.add_argument_group("several machines (start every rank with mlx.launch)")
    d.add_argument("--distributed", action="store_true",
                   help="share the jobs between the ranks: rank 0 hands the next job to whichever rank is free")
    d.add_argument("--gather", action="store_true",
                   help="send the images to rank 0, which writes them (for DIR not shared between the machines)")
    d.add_argument("--stages", metavar=BATCH_STAGES,
                   help="split each image over two ranks: text encoders and base on rank 0, refiner and VAE on "
                        "rank 1")
    return p


def _error(prog: str, e: BaseException) -> int:
    if isinstance(e, OSError) and e.filename is not None:
        message = f"{e.filename}: {e.strerror or e}"
    else:
        message = str(e)
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    return 2


def main(argv: Optional[List[str]] = None, prog: str = "mlx-sdxl batch") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = build_parser(prog).parse_known_args(argv)
    except SystemExit as e:  # --help, or a usage error already reported
        return e.code if isinstance(e.code, int) else 2
    ranks = []
    with terminate_as_interrupt():  # SIGTERM / SIGHUP unwind like Ctrl-C: no temporary is left behind
        try:
            status = _run(args, rest, argv, prog, ranks)
        except (SDXLError, OSError) as e:
            status = _error(prog, e)
        except KeyboardInterrupt as e:  # Ctrl-C 130; signals.Terminated: SIGTERM 143, SIGHUP 129
            status = report(prog, e)
    if ranks and ranks[0] > 1:
        _leave(status)
    return status


def _leave(status: int) -> None:
    """End a rank of a distributed batch now: a receive still pending in a background thread (after
    Ctrl-C, or a lost rank) must not reach MLX's teardown, which aborts the process."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _run(args, rest: List[str], argv: List[str], prog: str, ranks: list) -> int:
    defaults = read_defaults(GenerateOptions(), rest)
    stages = parse_stages(args.stages) if args.stages is not None else None
    group = world() if (args.distributed or args.gather or stages) else None
    size = group.size() if group is not None else 1
    ranks.append(size)
    if stages and size != 2:
        raise InputError(f"--stages {BATCH_STAGES} needs exactly 2 ranks (mlx.launch -n 2, or --hosts a,b), "
                         f"got {size}")
    out = Path(args.out).expanduser().absolute()
    if group is not None and group.rank() != 0:
        return (follow_stages if stages else follow)(group, defaults, out, prog)
    if group is not None and size == 1:
        print(f"{prog}: note: not started by mlx.launch (or mpirun): running on this machine alone",
              file=sys.stderr, flush=True)
    inbox: queue.Queue = queue.Queue()
    links = {r: Link(group, r, inbox, always=not stages) for r in range(1, size)}
    try:
        return _lead(args, defaults, argv, prog, out, (links, inbox, stages))
    except (SDXLError, OSError) as e:  # rank 0 could not start: the other ranks are told, then stop
        for link in links.values():
            link.send("abort", {"error": one_line(e)})
            link.flush(5.0)
        raise


def _prepare(args, defaults, out: Path):
    """Rank 0's setup: the jobs, the pipeline, the tasks, and which are already made."""
    jobs = read_jobs(args.jobs)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)  # temporaries our killed runs left there
    remove_rank_temps(out)  # and those of other ranks of earlier runs (one batch per folder at a time)
    pipe = open_pipeline(defaults)
    tasks, bad = plan_tasks(jobs, GenerateOptions(), defaults, pipe)
    made = [t for t in tasks if is_finished(out / t.name, t.identity)]
    names = {t.name for t in made}
    return jobs, pipe, tasks, bad, made, [t for t in tasks if t.name not in names]


def _lead(args, defaults, argv: List[str], prog: str, out: Path, distributed) -> int:
    links, inbox, stages = distributed
    jobs, pipe, tasks, bad, made, pending = _prepare(args, defaults, out)
    progress = BatchProgress(len(pending), quiet=bool(defaults.args.quiet))
    run = secrets.token_hex(6)
    ledger = Ledger(out, run, progress, prog)
    mode = "stages" if stages else "distributed" if links else "local"
    ledger.event("start", jobs=len(jobs), images=len(tasks), to_make=len(pending), ranks=len(links) + 1, mode=mode,
                 command=argv)
    batch = Batch(out, run, ledger, progress, Embeddings(defaults.args.embedding_dir), args.fail_fast, args.gather)
    for job, error in bad:
        ledger.job_failed(job.index, job.line, error)
    for task in made:
        ledger.image_skipped(task)
    if bad and args.fail_fast:
        ledger.stop(f"--fail-fast: job {bad[0][0].index} (line {bad[0][0].line}) failed")
        pending = []
    ranks, status = [], "interrupted"
    try:
        if stages:
            ranks = lead_stages(pipe, pending, batch, links[1], inbox)
        elif links:
            ranks = lead(pipe, pending, batch, links, inbox)
        else:
            run_queue(pipe, TaskQueue(pending), batch)
        status = "stopped" if ledger.stopped else "complete"
    finally:
        role = "base" if stages else "worker"
        summary = ledger.finish(status, batch.left(), [rank_stats(0, pipe, role), *ranks])
        if not defaults.args.quiet or status != "complete" or ledger.failed:
            print(summary, file=sys.stderr, flush=True)
    return 3 if batch.trouble else 1 if ledger.failed else 0
