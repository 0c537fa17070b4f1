"""Making a task's image, the way `generate` makes it, with the batch's one pipeline.

Every rank opens the same pipeline from the same command line (the model paths must
exist on each machine) and makes images with `cli.generate_kwargs` / `cli.finish_image`,
the functions `generate` itself uses, so an image does not depend on where it was made.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path
from typing import Callable, Optional, Set, Tuple

from .. import cli
from ..errors import SDXLError
from .options import Defaults
from .tasks import Task

# What fails one job, not the batch: bad input found late (an unreadable --image), NaN/inf
# latents (SDXLError), and MLX running out of memory for one size (RuntimeError, MemoryError).
JOB_ERRORS = (SDXLError, RuntimeError, MemoryError)


def open_pipeline(defaults: Defaults):
    """The pipeline every task of the batch runs on (models load lazily, on first use)."""
    import mlx.core as mx

    from ..pipeline import SDXLPipeline

    s = defaults.settings
    pipe = SDXLPipeline.from_pretrained(s["model"], s["refiner"], dtype=getattr(mx, s["dtype"]),
                                        refiner_bits=s["refiner_bits"], low_memory=bool(s["low_memory"]),
                                        vae=s["vae"], compile=bool(defaults.args.compile),
                                        prediction_type=s["prediction_type"])
    for path in defaults.args.embeddings:
        pipe.load_embedding(path)
    return pipe


class Embeddings:
    """Loads the --embedding-dir files a task's prompts name (once each), as `generate` does per run."""

    def __init__(self, folder: Optional[str]):
        self.folder = folder
        self.loaded: Set[Path] = set()

    def prepare(self, pipe, settings: dict) -> None:
        if not self.folder:
            return
        from ..embeddings import named_in

        for path in named_in(self.folder, [settings["prompt"], settings["negative_prompt"]]):
            if path not in self.loaded:
                pipe.load_embedding(path)
                self.loaded.add(path)


def task_args(task: Task) -> argparse.Namespace:
    return argparse.Namespace(**task.args)


def task_inputs(task: Task) -> tuple:
    """What `cli.generate_kwargs` takes as inputs: the job's --image and --mask, opened and checked
    (Nones when not given), and its ControlNets (none in a batch)."""
    args = task_args(task)
    images = [cli.open_image(task.settings[key], args.max_megapixels, f"--{key}") if task.settings[key] else None
              for key in ("image", "mask")]
    return (*images, [])


def make_image(pipe, task: Task, embeddings: Embeddings, callback: Optional[Callable] = None) -> Tuple[object, dict]:
    """(the PIL image, the settings its PNG records) of one task."""
    args = task_args(task)
    embeddings.prepare(pipe, task.settings)
    kwargs = cli.generate_kwargs(task.settings, task_inputs(task), task.seed, args)
    result = pipe.generate(**kwargs, callback=callback)
    return cli.finish_image(result, pipe, task.settings, task.seed, args)


def peak_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rank_stats(rank: int, pipe, role: str) -> dict:
    """What one rank held: the model parts it loaded, their weights' bytes, and its peak memory."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = 0
    if pipe is not None:
        for _, model in pipe.models.items():
            weights += sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    loaded = sorted(k[len("load_"):] for k in (pipe.models.load_seconds if pipe is not None else {}))
    return {"rank": rank, "role": role, "models": loaded, "weights_bytes": int(weights),
            "mlx_active_bytes": int(mx.get_active_memory()), "peak_rss_bytes": peak_rss_bytes()}
