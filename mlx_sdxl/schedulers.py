"""Samplers for SDXL, numerically equal to diffusers' schedulers built from the SDXL config.

Every scheduler follows one small protocol, indexed by step number rather than by timestep:

    s = make_scheduler("euler", config)   # config: scheduler/scheduler_config.json as a dict
    s.set_timesteps(n)
    x = noise * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        eps = unet(s.scale_model_input(x, i), t)
        x = s.step(eps, i, x)

The schedule (timesteps, sigmas, coefficients) is computed on the host with numpy in float32,
reproducing the float32 torch arithmetic diffusers uses: alphas_cumprod and the integer timesteps
are bit-equal to diffusers', the sigmas within 1-2 ulp (torch's CPU float32 sqrt is not always
correctly rounded). `step` only builds lazy MLX ops from Python-float coefficients.

Two families of latent spaces exist (never mix them across a base -> refiner handoff):
- Euler / Euler ancestral are variance exploding (`is_ve`): x = x0 + sigma * eps.
- DPM++ 2M and DDIM are variance preserving: x = alpha * x0 + sigma_t * eps, with
  alpha = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma * alpha.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import mlx.core as mx
import numpy as np

from .errors import ConfigError, InputError

f32 = np.float32

# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0 (the refiner's is the same).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "sample_max_value": 1.0,
}

SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim")

_ALIASES = {
    "euler_ancestral": "euler_a",
    "euler-a": "euler_a",
    "dpm++_2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpm++_2m_karras": "dpmpp_2m_karras",
    "dpm++2m_karras": "dpmpp_2m_karras",
    "dpmpp_2m_k": "dpmpp_2m_karras",
}


@dataclass
class SchedulerConfig:
    """The noise-schedule settings of a diffusers scheduler config.

    Keys missing from the file take the chosen diffusers class's own defaults, as
    `X.from_config(euler.config)` does (diffusers does not pass on defaults Euler filled in). They
    are the same for all five classes except DDIM's: timestep_spacing "leading", and the DDIM-only
    clip_sample and set_alpha_to_one both True.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[list] = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    @classmethod
    def from_dict(cls, d: Optional[dict], defaults: Optional[dict] = None) -> "SchedulerConfig":
        if d is None:
            d = SDXL_SCHEDULER_CONFIG
        if not isinstance(d, dict):
            raise ConfigError(f"scheduler config must be a dict (scheduler_config.json), got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{**(defaults or {}), **{k: v for k, v in d.items() if k in names}})
        cfg._validate()
        return cfg

    def _validate(self):
        def bad(key, accepted):
            raise ConfigError(
                f"unsupported scheduler config {key}={getattr(self, key)!r}; accepted: {accepted}"
            )

        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            bad("num_train_timesteps", "an integer >= 2")
        if self.trained_betas is not None:
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ConfigError(
                    f"trained_betas has {len(self.trained_betas)} values; "
                    f"expected num_train_timesteps={self.num_train_timesteps}"
                )
        elif self.beta_schedule not in ("scaled_linear", "linear"):
            bad("beta_schedule", "'scaled_linear', 'linear' (or trained_betas)")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            bad("prediction_type", "'epsilon', 'v_prediction'")
        if self.timestep_spacing not in ("leading", "linspace", "trailing"):
            bad("timestep_spacing", "'leading', 'linspace', 'trailing'")
        if self.interpolation_type != "linear":
            bad("interpolation_type", "'linear'")
        if self.use_exponential_sigmas:
            bad("use_exponential_sigmas", "false")
        if self.use_beta_sigmas:
            bad("use_beta_sigmas", "false")
        if self.rescale_betas_zero_snr:
            bad("rescale_betas_zero_snr", "false")
        if self.final_sigmas_type != "zero":
            bad("final_sigmas_type", "'zero'")
        if self.timestep_type != "discrete" and self.prediction_type == "v_prediction":
            bad("timestep_type", "'discrete' (continuous timesteps with v_prediction are not supported)")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            bad("steps_offset", "an integer >= 0")


# ----------------------------------------------------------------------------------------------
# The training noise schedule, in the same float32 arithmetic as diffusers (torch on CPU)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU, bit for bit.

    torch rounds start, end and step to float32, fills the first half forward from start and the
    second half backward from end, each value a fused multiply-add rounded once to float32.
    """
    a, b = f32(start), f32(end)
    if n == 1:
        return np.array([a], dtype=f32)
    step = float((b - a) / f32(n - 1))
    i = np.arange(n)
    return np.where(i < n // 2, float(a) + step * i, float(b) - step * (n - 1 - i)).astype(f32)


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """alpha_bar_t for t = 0 .. T-1 in float32 (torch's cumprod accumulates in float64)."""
    T = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, dtype=f32)
    elif cfg.beta_schedule == "linear":
        betas = _linspace_f32(cfg.beta_start, cfg.beta_end, T)
    else:  # scaled_linear: a linspace of square roots, squared
        betas = np.square(_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, T))
    alphas = f32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(f32)


def _sigmas_from_alphas(ac: np.ndarray) -> np.ndarray:
    return np.sqrt((f32(1.0) - ac) / ac).astype(f32)


def _karras(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Karras et al. (2022) rho=7 spacing from sigma_max down to sigma_min, float64."""
    rho = 7.0
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep whose log-sigma interpolates linearly between two training timesteps."""
    log_s = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    n = len(log_train_sigmas)
    # index of the last training log-sigma <= log_s (they increase with t), kept inside [0, n-2]
    below = np.sum(log_train_sigmas[:, None] <= log_s[None, :], axis=0)
    lo = np.clip(below - 1, 0, n - 2)
    low, high = log_train_sigmas[lo], log_train_sigmas[lo + 1]
    w = np.clip((low - log_s) / (low - high), 0, 1)
    return (1 - w) * lo + w * (lo + 1)


def _alpha_sigma(sigma: np.float32):
    """VP coefficients of a VE sigma: alpha = 1/sqrt(sigma^2+1), sigma_t = sigma*alpha (float32)."""
    alpha = f32(1.0) / np.sqrt(sigma * sigma + f32(1.0))
    return alpha, sigma * alpha


# ----------------------------------------------------------------------------------------------
# Schedulers


class Scheduler:
    """Common state: config, training schedule, and the current N-step schedule."""

    name = ""
    is_ve = False
    stochastic = False  # True when step() adds fresh noise (pass `noise=` or `key=`)
    config_defaults: dict = {}  # this diffusers class's defaults where they differ from Euler's

    def __init__(self, cfg: SchedulerConfig):
        self.config = cfg
        self.alphas_cumprod = alphas_cumprod(cfg)
        self.train_sigmas = _sigmas_from_alphas(self.alphas_cumprod)  # indexed by t
        self.num_steps = 0
        self.timesteps = np.zeros((0,), dtype=f32)
        self.sigmas = np.zeros((1,), dtype=f32)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, steps={self.num_steps})"

    def set_timesteps(self, n: int):
        T = self.config.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
            raise InputError(f"number of steps must be an integer in [1, {T}], got {n!r}")
        timesteps, sigmas = self._schedule(int(n))
        self.num_steps = int(n)
        self.timesteps = np.asarray(timesteps, dtype=f32)
        self.sigmas = np.asarray(sigmas, dtype=f32)
        self._reset()

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

    def _leading_or_other(self, n: int, rounded_linspace: bool) -> np.ndarray:
        """The `timestep_spacing` grid shared by Euler and DDIM (float64 values)."""
        c, T = self.config, self.config.num_train_timesteps
        if c.timestep_spacing == "leading":
            ratio = T // n
            return (np.arange(n) * ratio).round()[::-1] + c.steps_offset
        if c.timestep_spacing == "trailing":
            # np.arange can overshoot by one element for some n (e.g. 61); diffusers would then run
            # an extra step at t=-1. The first n entries are the intended grid.
            return np.arange(T, 0, -T / n)[:n].round() - 1
        grid = np.linspace(0, T - 1, n, dtype=np.float64 if rounded_linspace else f32)[::-1]
        return grid.round() if rounded_linspace else grid


class EulerScheduler(Scheduler):
    """diffusers EulerDiscreteScheduler (s_churn = 0): one Euler step of the probability-flow ODE."""

    name = "euler"
    is_ve = True
    karras = None  # None: follow config.use_karras_sigmas

    def _schedule(self, n):
        c = self.config
        ts = self._leading_or_other(n, rounded_linspace=False).astype(f32)
        sig = np.interp(ts, np.arange(len(self.train_sigmas)), self.train_sigmas)
        use_karras = c.use_karras_sigmas if self.karras is None else self.karras
        if use_karras:
            sig = _karras(
                c.sigma_min if c.sigma_min is not None else float(sig[-1]),
                c.sigma_max if c.sigma_max is not None else float(sig[0]),
                n,
            )
            ts = _sigma_to_t(sig, np.log(self.train_sigmas)).astype(f32)
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

    def _x0(self, eps, x, s):
        if self.config.prediction_type == "epsilon":
            return x - float(s) * eps
        # v-prediction: x0 = -sigma/sqrt(sigma^2+1) * v + x/(sigma^2+1)
        s2p1 = s * s + f32(1.0)
        return eps * float(-s / np.sqrt(s2p1)) + x / float(s2p1)

    def step(self, eps, i, x, key=None, noise=None):
        self._check_index(i)
        out_dtype = eps.dtype
        eps, x = eps.astype(mx.float32), x.astype(mx.float32)
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        x0 = self._x0(eps, x, s)
        d = (x - x0) / float(s)
        return (x + d * float(s_next - s)).astype(out_dtype)

    def add_noise(self, x0, noise, i):
        return x0 + noise * float(self.sigmas[i])


class EulerAncestralScheduler(EulerScheduler):
    """diffusers EulerAncestralDiscreteScheduler: an Euler step to sigma_down, then fresh noise sigma_up."""

    name = "euler_a"
    stochastic = True
    karras = False  # diffusers' ancestral sampler has no Karras option

    def step(self, eps, i, x, key=None, noise=None):
        self._check_index(i)
        out_dtype = eps.dtype
        eps, x = eps.astype(mx.float32), x.astype(mx.float32)
        s, s_to = self.sigmas[i], self.sigmas[i + 1]
        s_up = np.sqrt(s_to * s_to * (s * s - s_to * s_to) / (s * s))
        s_down = np.sqrt(np.maximum(s_to * s_to - s_up * s_up, f32(0.0)))
        x0 = self._x0(eps, x, s)
        d = (x - x0) / float(s)
        x = x + d * float(s_down - s)
        if s_up > 0:
            if noise is None:
                noise = mx.random.normal(x.shape, dtype=mx.float32, key=key)
            x = x + noise.astype(mx.float32) * float(s_up)
        return x.astype(out_dtype)


class DPMSolverMultistepScheduler(Scheduler):
    """diffusers DPMSolverMultistepScheduler as DPM++ 2M: dpmsolver++, order 2, midpoint.

    The first step of an instance is first order (no history), and so is the last step of the
    schedule, whose target sigma is 0: it returns the x0 prediction exactly.
    """

    name = "dpmpp_2m"
    karras = None  # None: follow config.use_karras_sigmas

    def _schedule(self, n):
        c, T = self.config, self.config.num_train_timesteps
        # DPM's own grids: N+1 points, the last (t ~ 0) dropped
        if c.timestep_spacing == "leading":
            ratio = T // (n + 1)
            ts = (np.arange(n + 1) * ratio).round()[::-1][:-1] + c.steps_offset
        elif c.timestep_spacing == "trailing":
            ts = np.arange(T, 0, -T / n)[:n].round() - 1
        else:
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        ts = ts.astype(np.int64)
        use_karras = c.use_karras_sigmas if self.karras is None else self.karras
        if use_karras:
            # Karras over the *training* range (sigma(0) .. sigma(T-1)), timesteps rounded
            sig = _karras(
                c.sigma_min if c.sigma_min is not None else float(self.train_sigmas[0]),
                c.sigma_max if c.sigma_max is not None else float(self.train_sigmas[-1]),
                n,
            )
            ts = _sigma_to_t(sig, np.log(self.train_sigmas)).round()
        else:
            sig = np.interp(ts, np.arange(T), self.train_sigmas)
        return ts.astype(f32), np.concatenate([sig, [0.0]]).astype(f32)

    def _reset(self):
        self._prev_x0 = None  # x0 prediction of the previous step of this instance

    def _x0(self, eps, x, s):
        alpha, sigma_t = _alpha_sigma(s)
        if self.config.prediction_type == "epsilon":
            return (x - float(sigma_t) * eps) / float(alpha)
        return float(alpha) * x - float(sigma_t) * eps

    def step(self, eps, i, x, key=None, noise=None):
        self._check_index(i)
        out_dtype = eps.dtype
        eps, x = eps.astype(mx.float32), x.astype(mx.float32)
        s0, s_next = self.sigmas[i], self.sigmas[i + 1]
        m0 = self._x0(eps, x, s0)
        prev, self._prev_x0 = self._prev_x0, m0
        if s_next == 0:  # final step: lambda = +inf, exp(-h) = 0, the update is x0 itself
            return m0.astype(out_dtype)

        a_t, st = _alpha_sigma(s_next)
        a_s0, ss0 = _alpha_sigma(s0)
        lam_t = np.log(a_t) - np.log(st)
        lam_s0 = np.log(a_s0) - np.log(ss0)
        h = lam_t - lam_s0
        c_x = float(st / ss0)
        c_d = a_t * (np.exp(-h) - f32(1.0))
        if prev is None or i == 0:  # first order (DPM-Solver++ 1 = DDIM in x0 form)
            out = c_x * x - float(c_d) * m0
        else:  # second order, midpoint: D1 = (m0 - m1) / r0
            a_s1, ss1 = _alpha_sigma(self.sigmas[i - 1])
            lam_s1 = np.log(a_s1) - np.log(ss1)
            r0 = (lam_s0 - lam_s1) / h
            d1 = float(f32(1.0) / r0) * (m0 - prev)
            out = c_x * x - float(c_d) * m0 - float(f32(0.5) * c_d) * d1
        return out.astype(out_dtype)

    def add_noise(self, x0, noise, i):
        alpha, sigma_t = _alpha_sigma(self.sigmas[i])
        return float(alpha) * x0 + float(sigma_t) * noise


class DPMSolverMultistepKarrasScheduler(DPMSolverMultistepScheduler):
    name = "dpmpp_2m_karras"
    karras = True


class DDIMScheduler(Scheduler):
    """diffusers DDIMScheduler with eta = 0 (deterministic).

    Step i goes from t_i to t_i - T//N, which for "leading" spacing is t_{i+1}. Past t = 0 it uses
    alpha_bar = 1 when set_alpha_to_one, else alpha_bar[0] (SDXL: the output keeps sigma ~ 0.029).
    `sigmas` holds sqrt((1-ab)/ab) of each timestep, then that of the final alpha_bar.
    """

    name = "ddim"
    config_defaults = {"timestep_spacing": "leading"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.final_alpha_cumprod = f32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def _schedule(self, n):
        T = self.config.num_train_timesteps
        ts = self._leading_or_other(n, rounded_linspace=True).astype(np.int64)
        if ts.max() >= T or ts.min() < 0:
            raise InputError(f"DDIM with {n} steps reaches timestep {ts.max()} outside [0, {T - 1}]")
        fa = self.final_alpha_cumprod
        final = np.sqrt((f32(1.0) - fa) / fa)
        return ts.astype(f32), np.concatenate([self.train_sigmas[ts], [final]]).astype(f32)

    def step(self, eps, i, x, key=None, noise=None):
        self._check_index(i)
        c = self.config
        out_dtype = eps.dtype
        eps, x = eps.astype(mx.float32), x.astype(mx.float32)
        t = int(self.timesteps[i])
        t_prev = t - c.num_train_timesteps // self.num_steps
        ab = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        sq_ab, sq_b = float(np.sqrt(ab)), float(np.sqrt(f32(1.0) - ab))
        if c.prediction_type == "epsilon":
            x0 = (x - sq_b * eps) / sq_ab
        else:
            x0, eps = sq_ab * x - sq_b * eps, sq_ab * eps + sq_b * x
        if c.clip_sample:
            x0 = mx.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        direction = float(np.sqrt(f32(1.0) - ab_prev)) * eps
        return (float(np.sqrt(ab_prev)) * x0 + direction).astype(out_dtype)

    def add_noise(self, x0, noise, i):
        ab = self.alphas_cumprod[int(self.timesteps[i])]
        return float(np.sqrt(ab)) * x0 + float(np.sqrt(f32(1.0) - ab)) * noise


_CLASSES = {
    "euler": EulerScheduler,
    "euler_a": EulerAncestralScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_karras": DPMSolverMultistepKarrasScheduler,
    "ddim": DDIMScheduler,
}


def make_scheduler(name: str = "euler", config: Optional[dict] = None) -> Scheduler:
    """A fresh scheduler by name; `config` is scheduler_config.json as a dict (None: SDXL's)."""
    key = name.lower().strip() if isinstance(name, str) else name
    key = _ALIASES.get(key, key)
    if key not in _CLASSES:
        raise ConfigError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    cls = _CLASSES[key]
    return cls(SchedulerConfig.from_dict(config, cls.config_defaults))


# ----------------------------------------------------------------------------------------------
# Splitting one schedule between stages, as the diffusers SDXL pipelines do


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
