"""Images of latents that are not finished: live previews, and what an interrupt returns.

A sampler's latents mid-way are noisy, and for the variance-exploding samplers (Euler and
its kin, `is_ve`) also scaled by sqrt(sigma² + 1); `viewable` undoes that scale so previews
and interrupted images have the colours of an image latent. A preview comes from TAESDXL
when it is available, else from the linear latent-to-RGB map (`mlx_sdxl.preview`).
Everything here runs in the worker thread, which owns MLX.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..errors import SDXLError
from ..preview import latents_to_rgb


class Schedule:
    """Where step k of a generation is in its sampler's schedule (for `viewable`)."""

    def __init__(self, scheduler: str, scheduler_config: dict, steps: int):
        from ..schedulers import make_scheduler

        sched = make_scheduler(scheduler, scheduler_config)
        sched.set_timesteps(steps)
        self.sigmas = np.asarray(sched.sigmas, dtype=np.float64) if sched.is_ve else None

    def viewable(self, latents, index: int):
        """`latents` after `index` steps of the schedule, scaled as an image latent."""
        if self.sigmas is None:
            return latents
        sigma = float(self.sigmas[min(index, len(self.sigmas) - 1)])
        return latents / math.sqrt(sigma * sigma + 1.0)


class Decoders:
    """TAESDXL (loaded once, at start, when available) and the linear fallback."""

    def __init__(self, taesd_spec: Optional[str]):
        self.spec = taesd_spec
        self._taesd = None
        self.error: Optional[str] = None

    def load(self) -> None:
        """Load TAESDXL now: the named one (errors raise), or the hub cache's, if it holds it."""
        from ..models.taesd import TAESDXL_ID, WEIGHT_STEM, load_taesd

        if self.spec is not None:
            self._taesd = load_taesd(self.spec)
            return
        from ..hub import cached_snapshot

        folder = cached_snapshot(TAESDXL_ID, ["config.json", f"{WEIGHT_STEM}.safetensors"])
        if folder is not None and (folder / f"{WEIGHT_STEM}.safetensors").is_file():
            try:
                self._taesd = load_taesd(folder)
            except SDXLError as e:  # a damaged cache: previews fall back to the linear map
                self.error = str(e)

    def release(self) -> None:
        self._taesd = None

    @property
    def taesd(self):
        """TAESDXL, or None; `load()` must have run (the service does it at start)."""
        return self._taesd

    @property
    def kind(self) -> str:
        return "taesd" if self.taesd is not None else "linear"

    def decode(self, latents) -> np.ndarray:
        """Latents (scheduler space) → NHWC float32 in [0, 1] with TAESDXL."""
        import mlx.core as mx

        image = self.taesd.decode(latents).astype(mx.float32)
        return np.array(mx.clip(image / 2 + 0.5, 0, 1))

    def preview(self, latents):
        """A PIL preview of the first image of `latents`."""
        from PIL import Image

        if self.taesd is not None:
            pixels = self.decode(latents[:1])[0]
            return Image.fromarray((pixels * 255).round().astype(np.uint8))
        return latents_to_rgb(latents, 0)
