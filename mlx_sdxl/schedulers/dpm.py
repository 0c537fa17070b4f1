"""DPM-Solver++ 2M, deterministic and SDE (diffusers' DPMSolverMultistepScheduler with
algorithm_type "dpmsolver++" or "sde-dpmsolver++", solver_order 2, solver_type "midpoint")."""

from __future__ import annotations

import numpy as np

from .base import VPScheduler, float32_step
from .noise import alpha_sigma, karras, log_snr, multistep_grid, sigma_to_t

f32 = np.float32


def multistep_schedule(s: VPScheduler, n: int, use_karras: bool):
    """(timesteps, sigmas + [0]) of DPM-Solver and UniPC: their own N+1-point grids, or Karras
    sigmas over the whole training range (sigma(0) .. sigma(T-1)) with rounded timesteps."""
    c = s.config
    ts = multistep_grid(c, n)
    if use_karras:
        sig = karras(
            c.sigma_min if c.sigma_min is not None else float(s.train_sigmas[0]),
            c.sigma_max if c.sigma_max is not None else float(s.train_sigmas[-1]),
            n,
        )
        ts = sigma_to_t(sig, np.log(s.train_sigmas)).round()
    else:
        sig = np.interp(ts, np.arange(c.num_train_timesteps), s.train_sigmas)
    return ts.astype(f32), np.concatenate([sig, [0.0]]).astype(f32)


class DPMSolverMultistepScheduler(VPScheduler):
    """DPM++ 2M: second order multistep, midpoint.

    The first step of an instance is first order (no history), and so is the last step of the
    schedule, whose target sigma is 0: it returns the x0 prediction exactly.
    """

    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    zero_snr_floor = True
    karras = None  # None: follow config.use_karras_sigmas
    sde = False

    def _schedule(self, n):
        return multistep_schedule(self, n, self.config.use_karras_sigmas if self.karras is None else self.karras)

    def _reset(self):
        self._prev_x0 = None  # x0 prediction of the previous step of this instance

    @float32_step
    def step(self, eps, i, x, key=None, noise=None):
        s0, s_next = self.sigmas[i], self.sigmas[i + 1]
        m0 = self._x0_at_sigma(eps, x, s0)
        prev, self._prev_x0 = self._prev_x0, m0
        if s_next == 0:  # final step: lambda = +inf, exp(-h) = 0, the update is x0 itself
            return m0
        a_t, st = alpha_sigma(s_next)
        _, ss0 = alpha_sigma(s0)
        lam_s0 = log_snr(s0)
        h = log_snr(s_next) - lam_s0
        if self.sde:
            c_x, c_d = float(st / ss0 * np.exp(-h)), a_t * (f32(1.0) - np.exp(f32(-2.0) * h))
        else:  # the ODE form: x_t = (st/ss0) x - a_t (e^{-h} - 1) D
            c_x, c_d = float(st / ss0), -(a_t * (np.exp(-h) - f32(1.0)))
        out = c_x * x + float(c_d) * m0
        if prev is not None and i > 0:  # second order, midpoint: D1 = (m0 - m1) / r0
            r0 = (lam_s0 - log_snr(self.sigmas[i - 1])) / h
            out = out + float(f32(0.5) * c_d) * (float(f32(1.0) / r0) * (m0 - prev))
        if self.sde:
            out = out + self._noise(x, key, noise) * float(st * np.sqrt(f32(1.0) - np.exp(f32(-2.0) * h)))
        return out


class DPMSolverMultistepKarrasScheduler(DPMSolverMultistepScheduler):
    name = "dpmpp_2m_karras"
    karras = True


class DPMSolverSDEScheduler(DPMSolverMultistepScheduler):
    """DPM++ 2M SDE: the same multistep update with fresh noise each step (sde-dpmsolver++)."""

    name = "dpmpp_2m_sde"
    stochastic = True
    sde = True


class DPMSolverSDEKarrasScheduler(DPMSolverSDEScheduler):
    name = "dpmpp_2m_sde_karras"
    karras = True
