"""Running a plan that starts from a picture: its noised latents, each stage's inpainting
inputs, and the result pasted back over the original."""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import mlx.core as mx
import numpy as np

from .compat import is_inpainting
from .health import nonfinite, nonfinite_error
from .images import encode_images
from .inpaint import KnownRegion, latent_mask, masked_pixels, paste_back
from .plan import Plan
from .stage import Stage


def image_latents(plan: Plan, stages: List[Stage], vae, scaling_factor: float, factor: int
                  ) -> Tuple[mx.array, List[Stage]]:
    """The first stage's input latents, and the stages with their inpainting inputs."""
    start = plan.image
    x0 = encode_images(vae, start.pixels, scaling_factor, start.posterior_keys, plan.batch)
    bad = nonfinite(x0)
    mx.eval(x0, bad)
    if bad.item():
        raise nonfinite_error("the image's latents hold NaN/inf", "vae", vae)
    first, noise = stages[0], start.noise.astype(mx.float32)
    if start.pure_noise:  # inpainting at strength 1 starts from noise alone, as diffusers does
        x = noise * first.scheduler.init_noise_sigma
    else:
        x = first.scheduler.add_noise(x0, noise, first.steps.start)
    if start.mask is None:
        return x, stages
    mask = latent_mask(start.mask, factor, plan.batch)
    masked = None
    if any(is_inpainting(s.source) for s in stages):
        masked = encode_images(vae, masked_pixels(start.pixels, start.mask), scaling_factor, start.posterior_keys,
                               plan.batch)
    return x, [_inpainting(s, x0, noise, mask, masked) for s in stages]


def _inpainting(stage: Stage, x0: mx.array, noise: mx.array, mask: mx.array, masked) -> Stage:
    """A 9-channel UNet reads the mask and the masked image; a 4-channel one gets the blend."""
    if is_inpainting(stage.source):
        extra = mx.concatenate([mask, masked], axis=-1)
        if stage.guidance.active:
            extra = mx.concatenate([extra, extra], axis=0)
        return dataclasses.replace(stage, extra_channels=extra)
    keep = KnownRegion(x0, noise, mask, stage.scheduler, stage.steps.stop - 1)
    return dataclasses.replace(stage, after_step=stage.after_step + (keep,))


def paste_results(images: np.ndarray, plan: Plan) -> np.ndarray:
    """Decoded images composited over the original picture, where the plan asks for it."""
    paste = plan.image.paste if plan.image is not None else None
    if paste is None:
        return images
    return np.stack([paste_back(paste.original, img, paste.mask, paste.box) for img in images]).astype(np.float32)
