"""The training noise schedule and the timestep grids, in the same float32 arithmetic as diffusers.

Everything here is host-side numpy: alphas_cumprod and the integer timesteps come out bit-equal to
diffusers' (torch on CPU), the sigmas within 1-2 ulp (torch's CPU float32 sqrt is not always
correctly rounded).
"""

from __future__ import annotations

import numpy as np

from .config import SchedulerConfig

f32 = np.float32
ZERO_SNR_ALPHA_BAR = 2.0**-24  # what diffusers' VE-style samplers put at t = T-1 under zero-SNR rescaling


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


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 vector on CPU (it accumulates in float64)."""
    return np.cumprod(x.astype(np.float64)).astype(f32)


def betas(cfg: SchedulerConfig) -> np.ndarray:
    if cfg.trained_betas is not None:
        out = np.asarray(cfg.trained_betas, dtype=f32)
    elif cfg.beta_schedule == "linear":
        out = _linspace_f32(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
    else:  # scaled_linear: a linspace of square roots, squared
        out = np.square(_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps))
    return rescale_zero_terminal_snr(out) if cfg.rescale_betas_zero_snr else out


def rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv 2305.08891), Algorithm 1: shift and scale sqrt(alpha_bar) so that its
    last value is exactly 0 and its first unchanged; float32 as diffusers computes it."""
    root = np.sqrt(_cumprod_f32(f32(1.0) - b))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = np.square(root)
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (f32(1.0) - alphas).astype(f32)


def alphas_cumprod(cfg: SchedulerConfig, zero_snr_floor: bool = False) -> np.ndarray:
    """alpha_bar_t for t = 0 .. T-1 in float32. Under zero-SNR rescaling alpha_bar[T-1] is 0;
    `zero_snr_floor` puts 2^-24 there instead, as diffusers' Euler, DPM-Solver and UniPC do, so that
    sigma stays finite (4096)."""
    ac = _cumprod_f32(f32(1.0) - betas(cfg))
    if zero_snr_floor and cfg.rescale_betas_zero_snr:
        ac[-1] = f32(ZERO_SNR_ALPHA_BAR)
    return ac


def sigmas_from_alphas(ac: np.ndarray) -> np.ndarray:
    """sqrt((1 - alpha_bar) / alpha_bar): inf where alpha_bar is 0."""
    with np.errstate(divide="ignore"):
        return np.sqrt((f32(1.0) - ac) / ac).astype(f32)


def karras(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Karras et al. (2022) rho=7 spacing from sigma_max down to sigma_min, float64."""
    rho = 7.0
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep whose log-sigma interpolates linearly between two training timesteps."""
    log_s = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    n = len(log_train_sigmas)
    # index of the last training log-sigma <= log_s (they increase with t), kept inside [0, n-2]
    below = np.sum(log_train_sigmas[:, None] <= log_s[None, :], axis=0)
    lo = np.clip(below - 1, 0, n - 2)
    low, high = log_train_sigmas[lo], log_train_sigmas[lo + 1]
    w = np.clip((low - log_s) / (low - high), 0, 1)
    return (1 - w) * lo + w * (lo + 1)


def alpha_sigma(sigma) -> tuple:
    """VP coefficients of a VE sigma: alpha = 1/sqrt(sigma^2+1), sigma_t = sigma*alpha (float32)."""
    sigma = f32(sigma)
    alpha = f32(1.0) / np.sqrt(sigma * sigma + f32(1.0))
    return alpha, sigma * alpha


def log_snr(sigma) -> np.float32:
    """lambda = log(alpha) - log(sigma_t) of a VE sigma > 0, float32."""
    alpha, sigma_t = alpha_sigma(sigma)
    return np.log(alpha) - np.log(sigma_t)


# ---------------------------------------------------------------- timestep grids (float64 values)
def trailing_grid(n: int, T: int) -> np.ndarray:
    # np.arange can overshoot by one element for some n (e.g. 61); diffusers would then run an extra
    # step at t=-1. The first n entries are the intended grid.
    return np.arange(T, 0, -T / n)[:n].round() - 1


def one_per_step_grid(cfg: SchedulerConfig, n: int, rounded_linspace: bool) -> np.ndarray:
    """Euler's and DDIM's grids: n timesteps, the first (leading) or last (trailing) kept."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        return (np.arange(n) * (T // n)).round()[::-1] + cfg.steps_offset
    if cfg.timestep_spacing == "trailing":
        return trailing_grid(n, T)
    grid = np.linspace(0, T - 1, n, dtype=np.float64 if rounded_linspace else f32)[::-1]
    return grid.round() if rounded_linspace else grid


def multistep_grid(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """DPM-Solver's and UniPC's grids: n + 1 points, the last (t ~ 0) dropped; integers."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        ts = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = trailing_grid(n, T)
    else:
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    return ts.astype(np.int64)


def distilled_grid(cfg: SchedulerConfig, n: int) -> np.ndarray:
    """LCM's and TCD's grid: n of the `original_inference_steps` distillation timesteps
    (k-1, 2k-1, ..., T-1 with k = T // original steps), evenly spaced by index from T-1 down.
    `timestep_spacing` plays no part (as in diffusers)."""
    steps = cfg.original_inference_steps
    k = cfg.num_train_timesteps // steps
    origin = (np.arange(1, steps + 1) * k - 1)[::-1]
    index = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[index]
