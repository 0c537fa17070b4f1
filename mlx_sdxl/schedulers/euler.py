"""Euler, Euler with Karras sigmas, and Euler ancestral: the variance-exploding samplers,
x = x0 + sigma * eps (diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler)."""

from __future__ import annotations

import numpy as np

from .base import Scheduler, float32_step
from .noise import karras, one_per_step_grid, sigma_to_t

f32 = np.float32


class EulerScheduler(Scheduler):
    """diffusers EulerDiscreteScheduler (s_churn = 0): one Euler step of the probability-flow ODE."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    is_ve = True
    zero_snr_floor = True
    karras = None  # None: follow config.use_karras_sigmas

    def _schedule(self, n):
        c = self.config
        ts = one_per_step_grid(c, n, rounded_linspace=False).astype(f32)
        sig = np.interp(ts, np.arange(len(self.train_sigmas)), self.train_sigmas)
        use_karras = c.use_karras_sigmas if self.karras is None else self.karras
        if use_karras:
            sig = karras(
                c.sigma_min if c.sigma_min is not None else float(sig[-1]),
                c.sigma_max if c.sigma_max is not None else float(sig[0]),
                n,
            )
            ts = sigma_to_t(sig, np.log(self.train_sigmas)).astype(f32)
        return ts, np.concatenate([sig, [0.0]]).astype(f32)

    @property
    def init_noise_sigma(self) -> float:
        smax = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(smax)
        return float(np.sqrt(smax * smax + f32(1.0)))

    def scale_model_input(self, x, i):
        s = self.sigmas[i]
        return x / float(np.sqrt(s * s + f32(1.0)))

    def _x0(self, out, x, s):
        kind = self.config.prediction_type
        if kind == "epsilon":
            return x - float(s) * out
        if kind == "sample":
            return out
        # v-prediction: x0 = -sigma/sqrt(sigma^2+1) * v + x/(sigma^2+1)
        s2p1 = s * s + f32(1.0)
        return out * float(-s / np.sqrt(s2p1)) + x / float(s2p1)

    @float32_step
    def step(self, eps, i, x, key=None, noise=None):
        """x_{i+1} = x + (x - x0) / sigma_i * (sigma_{i+1} - sigma_i)."""
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        d = (x - self._x0(eps, x, s)) / float(s)
        return x + d * float(s_next - s)

    def add_noise(self, x0, noise, i):
        return x0 + noise * float(self.sigmas[i])


class EulerKarrasScheduler(EulerScheduler):
    """Euler on Karras et al.'s rho=7 sigmas (EulerDiscreteScheduler with use_karras_sigmas=True)."""

    name = "euler_karras"
    karras = True


class EulerAncestralScheduler(EulerScheduler):
    """diffusers EulerAncestralDiscreteScheduler: an Euler step to sigma_down, then fresh noise sigma_up."""

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    stochastic = True
    karras = False  # diffusers' ancestral sampler has no Karras option
    prediction_types = ("epsilon", "v_prediction")  # diffusers: "sample" is not implemented

    @float32_step
    def step(self, eps, i, x, key=None, noise=None):
        s, s_to = self.sigmas[i], self.sigmas[i + 1]
        s_up = np.sqrt(s_to * s_to * (s * s - s_to * s_to) / (s * s))
        s_down = np.sqrt(np.maximum(s_to * s_to - s_up * s_up, f32(0.0)))
        d = (x - self._x0(eps, x, s)) / float(s)
        x = x + d * float(s_down - s)
        if s_up > 0:
            x = x + self._noise(x, key, noise) * float(s_up)
        return x
