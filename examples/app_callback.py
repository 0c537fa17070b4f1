"""Drive SDXL from a worker thread the way an app would: live progress, cheap
latent previews, and a Cancel button.

    python examples/app_callback.py "a lighthouse in a storm" \
        --model stabilityai/stable-diffusion-xl-base-1.0 \
        --refiner stabilityai/stable-diffusion-xl-refiner-1.0

The first job is cancelled after --cancel-after base steps (the pipeline
returns None, no exception); the second runs to the end on the same pipeline.
The UI side here is the main thread printing events from a queue; in a real
app it would update a progress bar and an image view instead. Each finished
job's thread is joined: a thread still inside MLX when Python exits can abort
the process ("terminate called without an active exception").
"""

import argparse
import queue
import threading
import time
from pathlib import Path

import mlx.core as mx

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.cli import default_dtype
from mlx_sdxl.metadata import save_png
from mlx_sdxl.preview import latents_to_rgb


class Job:
    """One generation on a worker thread; events arrive on `self.events`."""

    def __init__(self, pipe, **kwargs):
        self.pipe, self.kwargs = pipe, kwargs
        self.events = queue.Queue()
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def cancel(self):
        self.cancelled.set()

    def _callback(self, stage, step, total, latents):
        # Runs on the worker thread after every step. The preview is a 4->3 linear
        # map of the latents (no VAE), about 1/8 of the final size.
        preview = latents_to_rgb(latents) if stage != "decode" else None
        self.events.put(("progress", stage, step, total, preview))
        return not self.cancelled.is_set()  # False stops the run

    def _run(self):
        try:
            images = self.pipe(callback=self._callback, **self.kwargs)
            self.events.put(("done", images))
        except Exception as e:  # report errors to the UI thread instead of losing them
            self.events.put(("error", e))
        finally:
            # let MLX finish this thread's work and drop its streams, so the process exits cleanly
            mx.synchronize()
            mx.clear_streams()


def follow(job, cancel_after=None):
    """The UI loop: show progress, keep the latest preview, press Cancel when asked."""
    preview = None
    while True:
        event = job.events.get()
        if event[0] == "progress":
            _, stage, step, total, image = event
            preview = image or preview
            print(f"  {stage:<8} {step}/{total}")
            if cancel_after is not None and step >= cancel_after and not job.cancelled.is_set():
                print("  -> cancel")
                job.cancel()
        else:  # the job is over: let its thread finish before going on (or exiting)
            job.thread.join()
            if event[0] == "error":
                raise event[1]
            return event[1], preview


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="a lighthouse in a storm, dramatic light")
    parser.add_argument("--model", required=True)
    parser.add_argument("--refiner")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--cancel-after", type=int, default=2, help="base steps before the first job is cancelled")
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args()

    pipe = SDXLPipeline.from_pretrained(args.model, args.refiner, dtype=args.dtype or default_dtype())
    request = dict(prompt=args.prompt, num_inference_steps=args.steps, width=args.width, height=args.height,
                   seed=args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    print("job 1 (will be cancelled):")
    images, _ = follow(Job(pipe, **request).start(), cancel_after=args.cancel_after)
    print(f"job 1 returned {images!r}")

    print("job 2:")
    t0 = time.perf_counter()
    images, preview = follow(Job(pipe, **request).start())
    preview.save(out / "app_preview.png")
    save_png(images[0], out / "app_result.png", dict(request, model=args.model, refiner=args.refiner),
             overwrite=True)
    print(f"job 2 finished in {time.perf_counter() - t0:.1f} s: {out / 'app_result.png'}, "
          f"last preview {out / 'app_preview.png'}")


if __name__ == "__main__":
    main()
