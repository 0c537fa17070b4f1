"""UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler runs it by default:
solver_order 2, B(h) = e^h - 1 ("bh2"), data prediction (predict_x0), lower order at the end,
the corrector after every step but the first."""

from __future__ import annotations

import numpy as np

from .base import VPScheduler, float32_step
from .dpm import multistep_schedule
from .noise import alpha_sigma, log_snr

f32 = np.float32


def _corrector_rhos(rk, h_phi_k, hh, b_h, order: int):
    """UniC's weights: [0.5] at order 1, else the solution of R rho = b (float32, as torch solves it)."""
    if order == 1:
        return np.array([0.5], dtype=f32)
    b = [h_phi_k / b_h, (h_phi_k / hh - f32(0.5)) * f32(2.0) / b_h]
    r = np.array([[1.0, 1.0], [rk, 1.0]], dtype=f32)
    return np.linalg.solve(r, np.array(b, dtype=f32)).astype(f32)


class UniPCMultistepScheduler(VPScheduler):
    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    zero_snr_floor = True

    def _schedule(self, n):
        return multistep_schedule(self, n, self.config.use_karras_sigmas)

    def _reset(self):
        self._history = []      # x0 predictions of this instance's steps, newest last (at most 2)
        self._last_sample = None
        self._last_order = 0
        self._done = 0          # steps this instance has taken (diffusers' lower_order_nums, capped at 2)

    def _coefficients(self, s_to, s_from):
        """alpha_t, sigma_t / sigma_s, h = lambda_t - lambda_s, e^{-h} - 1 of a step from s_from to s_to."""
        alpha_t, sig_t = alpha_sigma(s_to)
        _, sig_s = alpha_sigma(s_from)
        h = log_snr(s_to) - log_snr(s_from)
        return alpha_t, sig_t / sig_s, h, np.expm1(-h)

    def _corrector(self, m_t, i, x_last):
        """UniC: redo the previous step from its start with this step's x0 prediction."""
        m0, order = self._history[-1], self._last_order
        alpha_t, ratio, h, phi = self._coefficients(self.sigmas[i], self.sigmas[i - 1])
        hh = -h
        rk = (log_snr(self.sigmas[i - 2]) - log_snr(self.sigmas[i - 1])) / h if order == 2 else f32(1.0)
        rhos = _corrector_rhos(rk, phi / hh - f32(1.0), hh, phi, order)
        scale = float(alpha_t * phi)
        out = float(ratio) * x_last - scale * m0
        if order == 2:
            out = out - scale * float(rhos[0]) * ((self._history[-2] - m0) / float(rk))
        return out - scale * float(rhos[-1]) * (m_t - m0)

    def _predictor(self, i, x, order):
        """UniP of the given order from sigmas[i] to sigmas[i+1]."""
        m0 = self._history[-1]
        if self.sigmas[i + 1] == 0:  # final step (order 1): lambda = +inf, e^{-h} - 1 = -1, the update is x0
            return m0
        alpha_t, ratio, h, phi = self._coefficients(self.sigmas[i + 1], self.sigmas[i])
        out = float(ratio) * x - float(alpha_t * phi) * m0
        if order == 2:
            rk = (log_snr(self.sigmas[i - 1]) - log_snr(self.sigmas[i])) / h
            out = out - float(alpha_t * phi) * 0.5 * ((self._history[-2] - m0) / float(rk))
        return out

    @float32_step
    def step(self, eps, i, x, key=None, noise=None):
        m_t = self._x0_at_sigma(eps, x, self.sigmas[i])
        if i > 0 and self._last_sample is not None:
            x = self._corrector(m_t, i, self._last_sample)
        self._history = (self._history + [m_t])[-2:]
        order = min(2, self.num_steps - i, self._done + 1)
        self._last_sample, self._last_order = x, order
        self._done = min(self._done + 1, 2)
        return self._predictor(i, x, order)
