"""Splitting one schedule between stages, as the diffusers SDXL pipelines do."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def split_for_handoff(timesteps, high_noise_frac: float, num_train_timesteps: int = 1000) -> int:
    """Number of steps the base runs with `denoising_end=high_noise_frac`: those with t >= cutoff.

    The refiner (`denoising_start=high_noise_frac`, same scheduler, same N) runs the indices [k:].
    """
    if isinstance(high_noise_frac, bool) or not isinstance(high_noise_frac, (float, int)) or not (
        0 < high_noise_frac < 1
    ):
        raise InputError(f"high_noise_frac must be a number strictly between 0 and 1, got {high_noise_frac!r}")
    cutoff = int(round(num_train_timesteps - high_noise_frac * num_train_timesteps))
    return int(np.sum(np.asarray(timesteps) >= cutoff))


def img2img_start(n: int, strength: float) -> int:
    """First step index of SDEdit img2img: the last min(int(n*strength), n) steps are run."""
    if isinstance(strength, bool) or not isinstance(strength, (float, int)) or not 0 <= strength <= 1:
        raise InputError(f"strength must be in [0, 1], got {strength!r}")
    t_start = n - min(int(n * strength), n)
    if t_start >= n:
        raise InputError(
            f"strength {strength} with {n} steps leaves no denoising step; raise strength or steps"
        )
    return t_start
