"""DDIM (diffusers' DDIMScheduler with eta = 0, deterministic)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .base import AlphaBarScheduler, float32_step
from .noise import one_per_step_grid

f32 = np.float32


class DDIMScheduler(AlphaBarScheduler):
    """Step i goes from t_i to t_i - T//N, which for "leading" spacing is t_{i+1}. Past t = 0 it uses
    alpha_bar = 1 when set_alpha_to_one, else alpha_bar[0] (SDXL: the output keeps sigma ~ 0.029).
    `sigmas` holds sqrt((1-ab)/ab) of each timestep, then that of the final alpha_bar.
    """

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    config_defaults = {"timestep_spacing": "leading"}

    def _schedule(self, n):
        T = self.config.num_train_timesteps
        ts = one_per_step_grid(self.config, n, rounded_linspace=True).astype(np.int64)
        if ts.max() >= T or ts.min() < 0:
            raise InputError(f"DDIM with {n} steps reaches timestep {ts.max()} outside [0, {T - 1}]")
        fa = self._final_alpha()
        final = np.sqrt((f32(1.0) - fa) / fa)
        return ts.astype(f32), np.concatenate([self.train_sigmas[ts], [final]]).astype(f32)

    @float32_step
    def step(self, eps, i, x, key=None, noise=None):
        c = self.config
        t = int(self.timesteps[i])
        ab_prev = self._alpha_at(t - c.num_train_timesteps // self.num_steps)
        x0, eps = self._x0_eps(eps, x, self.alphas_cumprod[t])
        if c.clip_sample:
            x0 = mx.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        direction = float(np.sqrt(f32(1.0) - ab_prev)) * eps
        return float(np.sqrt(ab_prev)) * x0 + direction
