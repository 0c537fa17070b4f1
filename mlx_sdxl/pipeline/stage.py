"""A stage: one UNet denoising a slice of the schedule, and the one loop that runs every stage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import mlx.core as mx

from ..conditioning import guide
from ..models.pacing import Pacer, pacing
from ..schedulers import Scheduler
from ..sources import ModelSource
from .health import nonfinite, nonfinite_error
from .prompts import Conditioning
from .result import StageTiming

# callback(stage, step, total_steps, latents) -> False to cancel
Callback = Callable[[str, int, int, mx.array], Optional[bool]]
# after_step(latents, step_index) -> latents, applied after each scheduler step (e.g. an inpainting mask)
StepHook = Callable[[mx.array, int], mx.array]


class Cancelled(Exception):
    """Raised inside a stage when the callback returns False; the pipeline turns it into a result."""


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: ε = ε_u + scale·(ε_c − ε_u), optionally rescaled (arXiv 2305.08891)."""

    scale: float
    rescale: float = 0.0
    embed_dim: Optional[int] = None  # an LCM UNet's time_cond_proj_dim: the scale enters as an embedding

    @property
    def active(self) -> bool:
        """A second, unconditional batch: only for scale > 1, and never for an LCM UNet (diffusers)."""
        return self.scale > 1 and self.embed_dim is None

    def unet_kwargs(self, batch: int) -> dict:
        """What the UNet takes besides the batch: an LCM UNet's embedding of w = scale - 1."""
        if self.embed_dim is None:
            return {}
        from ..models.unet import guidance_scale_embedding

        w = mx.full((batch,), self.scale - 1.0, dtype=mx.float32)
        return {"timestep_cond": guidance_scale_embedding(w, self.embed_dim)}

    def __call__(self, eps: mx.array) -> mx.array:
        return guide(eps, self.scale, self.rescale)


def per_image_normal(shape: Sequence[int], keys: Sequence[mx.array]) -> mx.array:
    """Standard normal noise of `shape`, image i drawn with keys[i], so that an image's
    noise does not depend on the batch it is in."""
    one = (1, *shape[1:])
    parts = [mx.random.normal(one, key=k) for k in keys]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


@dataclass(frozen=True)
class Stage:
    """One UNet over the schedule indices `steps`.

    `time_ids` are the (positive, negative) micro-conditioning rows the prompt is encoded
    with; `conditioning` is filled in once the text encoders have run. `keys` (one per
    image) feed stochastic samplers. `after_step` hooks transform the latents after each
    scheduler step, inside the step's single evaluation (an inpainting blend).
    `extra_channels` are appended to the UNet's input (a 9-channel inpainting UNet's mask and
    masked-image latents), already doubled for guidance. `unet_extras(xin, t, i, embeds,
    pooled, time_ids)` gives extra UNet keywords for step i (ControlNet residuals), or {}.
    """

    name: str
    source: ModelSource
    scheduler: Scheduler
    steps: range
    guidance: Guidance
    time_ids: Tuple[list, list]
    keys: Tuple[mx.array, ...]
    conditioning: Optional[Conditioning] = None
    after_step: Tuple[StepHook, ...] = ()
    extra_channels: Optional[mx.array] = None
    unet_extras: Optional[Callable[..., dict]] = None

    def run(self, unet, x: mx.array, callback: Optional[Callback] = None,
            forward: Optional[Callable] = None) -> Tuple[mx.array, StageTiming]:
        """Denoise `x` over this stage's steps with one mx.eval per step, each step evaluated in
        segments at the UNet's block boundaries (models/pacing.py: bounded run-ahead, so bounded
        memory). `forward` is the UNet as each step calls it (e.g. compiled); `unet` by default."""
        t0 = time.perf_counter()
        mx.reset_peak_memory()
        cross_kv = unet.cross_attention_kv(self.conditioning.unet_batch()[0])  # the prompt's keys and values
        mx.eval(cross_kv)  # once per stage; freed when the stage returns
        with pacing(Pacer()):
            x = self._loop(unet, forward or unet, x, cross_kv, callback)
        return x, StageTiming(time.perf_counter() - t0, len(self.steps), mx.get_peak_memory())

    def _loop(self, unet, forward, x, cross_kv, callback) -> mx.array:
        embeds, pooled, time_ids = self.conditioning.unet_batch()
        sched, guided, total = self.scheduler, self.guidance.active, len(self.steps)
        step_keys = [mx.random.split(k, max(total, 1)) for k in self.keys] if sched.stochastic else None
        extra = self.guidance.unet_kwargs(x.shape[0])  # an LCM UNet's guidance embedding
        for n, i in enumerate(self.steps):
            t = float(sched.timesteps[i])
            xin = sched.scale_model_input(x, i)
            if guided:
                xin = mx.concatenate([xin, xin], axis=0)
            step_extra = self.unet_extras(xin, t, i, embeds, pooled, time_ids) if self.unet_extras else {}
            if self.extra_channels is not None:
                xin = mx.concatenate([xin, self.extra_channels], axis=-1)
            eps = forward(xin, t, embeds, text_embeds=pooled, time_ids=time_ids, cross_kv=cross_kv, **extra,
                          **step_extra)
            if guided:
                eps = self.guidance(eps)
            noise = per_image_normal(x.shape, [k[n] for k in step_keys]) if step_keys else None
            x = sched.step(eps, i, x, noise=noise)
            for hook in self.after_step:
                x = hook(x, i)
            bad = nonfinite(x)
            mx.eval(x, bad)
            if bad.item():
                raise nonfinite_error(f"the {self.name} produced NaN/inf latents at step {n + 1}/{total} (t={t:g})",
                                      "unet", unet)
            if callback is not None and callback(self.name, n + 1, total, x) is False:
                raise Cancelled()
        return x

