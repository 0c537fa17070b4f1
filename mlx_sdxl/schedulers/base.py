"""What every sampler shares: its config, the training schedule, the current N-step schedule and
the model-output conversions."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import numpy as np

from ..errors import ConfigError, InputError
from .config import PREDICTION_TYPES, SchedulerConfig
from .noise import alpha_sigma, alphas_cumprod, sigmas_from_alphas

f32 = np.float32


class Scheduler:
    """Common state: config, training schedule, and the current N-step schedule.

    `timesteps` (N,) and `sigmas` (N+1,) are float32 numpy arrays; `sigmas[i]` is the VE sigma
    sqrt((1-alpha_bar)/alpha_bar) the latents have before step i, `sigmas[N]` what they have after
    the last step.
    """

    name = ""
    is_ve = False
    stochastic = False  # True when step() adds fresh noise (pass `noise=` or `key=`)
    config_defaults: dict = {}  # this diffusers class's defaults where they differ from Euler's
    prediction_types = PREDICTION_TYPES  # the model outputs this diffusers class accepts
    zero_snr_floor = False  # alpha_bar[T-1] = 2^-24 under zero-SNR rescaling (diffusers' VE-style classes)
    uses_spacing = True  # False: the class ignores timestep_spacing (its grid is its own)
    diffusers_class = ""

    def __init__(self, cfg: SchedulerConfig):
        if cfg.prediction_type not in self.prediction_types:
            raise ConfigError(f"the {self.name} sampler does not support prediction_type={cfg.prediction_type!r} "
                              f"(diffusers' {self.diffusers_class}); accepted: {', '.join(self.prediction_types)}")
        self.config = cfg
        self.alphas_cumprod = alphas_cumprod(cfg, self.zero_snr_floor)
        self.train_sigmas = sigmas_from_alphas(self.alphas_cumprod)  # indexed by t
        if self.zero_snr_floor and cfg.rescale_betas_zero_snr:
            # sqrt((1 - 2^-24) / 2^-24) lies within 1e-11 of the midpoint between float32 4095.99976 and
            # 4096; torch's float32 pow rounds it up, and the first step from this sigma amplifies the
            # difference about 1000-fold, so take diffusers' value
            self.train_sigmas[-1] = f32(4096.0)
        self.num_steps = 0
        self.timesteps = np.zeros((0,), dtype=f32)
        self.sigmas = np.zeros((1,), dtype=f32)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, steps={self.num_steps})"

    @property
    def settings(self) -> dict:
        """What a run records of this sampler: its name and the options that shaped it."""
        return {"scheduler": self.name, "timestep_spacing": self.config.timestep_spacing if self.uses_spacing else None}

    def set_timesteps(self, n: int):
        T = self.config.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
            raise InputError(f"number of steps must be an integer in [1, {T}], got {n!r}")
        timesteps, sigmas = self._schedule(int(n))
        self._check_schedule(np.asarray(timesteps))
        self.num_steps = int(n)
        self.timesteps = np.asarray(timesteps, dtype=f32)
        self.sigmas = np.asarray(sigmas, dtype=f32)
        self._reset()

    def _schedule(self, n: int):
        """(timesteps, sigmas) of an n-step schedule: each sampler class defines its own."""
        raise TypeError(f"{type(self).__name__} is a sampler base class without a schedule of its own")

    def _check_schedule(self, timesteps: np.ndarray):
        """Epsilon prediction cannot be inverted where alpha_bar is 0 (zero-SNR rescaling, t = T-1)."""
        if self.config.prediction_type != "epsilon" or self.zero_snr_floor or not self.config.rescale_betas_zero_snr:
            return
        at = np.round(timesteps).astype(np.int64)
        if np.any(self.alphas_cumprod[at] == 0):
            raise ConfigError(
                f"rescale_betas_zero_snr leaves no signal at t={self.config.num_train_timesteps - 1}, where the "
                f"{self.name} sampler cannot recover the image from an epsilon prediction; accepted with "
                "zero-SNR rescaling: prediction_type 'v_prediction' (what such models are trained for) or 'sample'")

    def _reset(self):
        pass

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, x: mx.array, i: int) -> mx.array:
        return x

    def _check_index(self, i: int):
        if self.num_steps == 0:
            raise InputError("call set_timesteps(n) before using the scheduler")
        if not 0 <= i < self.num_steps:
            raise InputError(f"step index {i} outside the schedule of {self.num_steps} steps")

    @staticmethod
    def _noise(x: mx.array, key, noise) -> mx.array:
        """The fresh noise of a stochastic step: `noise` as given (shaped like x), else drawn with `key`."""
        if noise is None:
            return mx.random.normal(x.shape, dtype=mx.float32, key=key)
        if tuple(noise.shape) != tuple(x.shape):
            raise InputError(f"noise must have the latents' shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        return noise.astype(mx.float32)


class VPScheduler(Scheduler):
    """Samplers that work in variance-preserving space, x = alpha*x0 + sigma_t*eps."""

    def _x0_at_sigma(self, out, x, sigma):
        """The x0 prediction at VE sigma from the model output (DPM-Solver / UniPC convert_model_output)."""
        alpha, sigma_t = alpha_sigma(sigma)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x - float(sigma_t) * out) / float(alpha)
        if kind == "v_prediction":
            return float(alpha) * x - float(sigma_t) * out
        return out

    def add_noise(self, x0, noise, i):
        alpha, sigma_t = alpha_sigma(self.sigmas[i])
        return float(alpha) * x0 + float(sigma_t) * noise


class AlphaBarScheduler(Scheduler):
    """Samplers indexed by integer timestep into alpha_bar (DDIM, LCM, TCD)."""

    def _x0_eps(self, out, x, ab):
        """(x0, eps) predictions at alpha_bar `ab` from the model output, as DDIM / TCD compute them."""
        sq_a, sq_b = float(np.sqrt(ab)), float(np.sqrt(f32(1.0) - ab))
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x - sq_b * out) / sq_a, out
        if kind == "v_prediction":
            return sq_a * x - sq_b * out, sq_a * out + sq_b * x
        return out, (x - sq_a * out) / sq_b

    def _final_alpha(self) -> np.float32:
        return f32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def _alpha_at(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self._final_alpha()

    def add_noise(self, x0, noise, i):
        ab = self.alphas_cumprod[int(self.timesteps[i])]
        return float(np.sqrt(ab)) * x0 + float(np.sqrt(f32(1.0) - ab)) * noise


def float32_step(step):
    """Run a step in float32 and return the latents' own dtype (the samplers' arithmetic is float32)."""

    def wrapped(self, eps, i, x, key=None, noise: Optional[mx.array] = None):
        self._check_index(i)
        out = step(self, eps.astype(mx.float32), i, x.astype(mx.float32), key, noise)
        return out.astype(eps.dtype)

    wrapped.__doc__ = step.__doc__
    wrapped.__name__ = step.__name__
    return wrapped
