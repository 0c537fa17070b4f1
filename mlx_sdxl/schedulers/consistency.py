"""The distilled-model samplers: LCM (diffusers' LCMScheduler) and TCD (TCDScheduler).

Both take their N timesteps from the distillation grid of `original_inference_steps` (50)
timesteps, not from `timestep_spacing`, and predict x0 in one step. LCM then re-noises to the next
timestep with fresh noise (every step but the last); TCD moves to an intermediate timestep
s = floor((1 - eta) * t_next) and adds fresh noise from s to t_next when eta > 0.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .base import AlphaBarScheduler, float32_step
from .noise import distilled_grid

f32 = np.float32
SIGMA_DATA = 0.5

_DISTILLED_DEFAULTS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "leading"}


class DistilledScheduler(AlphaBarScheduler):
    uses_spacing = False
    config_defaults = _DISTILLED_DEFAULTS

    def _schedule(self, n):
        steps = self.config.original_inference_steps
        if n > steps:
            raise InputError(f"the {self.name} sampler runs at most original_inference_steps={steps} steps "
                             f"(the distillation grid it picks its timesteps from); got {n}")
        ts = distilled_grid(self.config, n)
        return ts.astype(f32), np.concatenate([self.train_sigmas[ts], [0.0]]).astype(f32)

    def _next_timestep(self, i: int, last: int) -> int:
        return int(self.timesteps[i + 1]) if i + 1 < self.num_steps else last


class LCMScheduler(DistilledScheduler):
    name = "lcm"
    diffusers_class = "LCMScheduler"
    stochastic = True

    def _boundary(self, t: int):
        """(c_skip, c_out) of the consistency boundary condition at timestep t (float32)."""
        scaled = f32(t) * f32(self.config.timestep_scaling)
        denom = scaled * scaled + f32(SIGMA_DATA**2)
        return f32(SIGMA_DATA**2) / denom, scaled / np.sqrt(denom)

    @float32_step
    def step(self, eps, i, x, key=None, noise=None):
        """denoised = c_out * x0 + c_skip * x; then re-noised to t_{i+1} unless this is the last step."""
        c = self.config
        t = int(self.timesteps[i])
        ab = self.alphas_cumprod[t]
        x0 = self._x0_eps(eps, x, ab)[0]
        if c.clip_sample:
            x0 = mx.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        c_skip, c_out = self._boundary(t)
        denoised = float(c_out) * x0 + float(c_skip) * x
        if i == self.num_steps - 1:
            return denoised
        ab_prev = self._alpha_at(self._next_timestep(i, t))
        return float(np.sqrt(ab_prev)) * denoised + float(np.sqrt(f32(1.0) - ab_prev)) * self._noise(x, key, noise)


class TCDScheduler(DistilledScheduler):
    """`eta` (the paper's gamma, 0 to 1): the share of the way back to t_next that is re-noised with
    fresh noise; 0 is deterministic."""

    name = "tcd"
    diffusers_class = "TCDScheduler"

    def __init__(self, cfg, eta: Optional[float] = None):
        super().__init__(cfg)
        from ..spec import DEFAULT_TCD_ETA

        self.eta = DEFAULT_TCD_ETA if eta is None else eta

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    @property
    def settings(self) -> dict:
        return {**super().settings, "eta": self.eta}

    @float32_step
    def step(self, eps, i, x, key=None, noise=None):
        t, t_next = int(self.timesteps[i]), self._next_timestep(i, 0)
        s = int(np.floor(f32(1.0 - self.eta) * f32(t_next)))
        x0, eps = self._x0_eps(eps, x, self.alphas_cumprod[t])
        ab_s = self.alphas_cumprod[s]
        noised = float(np.sqrt(ab_s)) * x0 + float(np.sqrt(f32(1.0) - ab_s)) * eps
        if self.eta == 0 or i == self.num_steps - 1:
            return noised
        ratio = self._alpha_at(t_next) / ab_s
        return float(np.sqrt(ratio)) * noised + float(np.sqrt(f32(1.0) - ratio)) * self._noise(x, key, noise)
