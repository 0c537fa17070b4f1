"""Samplers for SDXL, numerically equal to diffusers' schedulers built from a model's config.

Every scheduler follows one small protocol, indexed by step number rather than by timestep:

    s = make_scheduler("euler", config)   # config: scheduler/scheduler_config.json as a dict
    s.set_timesteps(n)
    x = noise * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        eps = unet(s.scale_model_input(x, i), t)
        x = s.step(eps, i, x)             # stochastic samplers: step(eps, i, x, noise=z) or key=k

The schedule (timesteps, sigmas, coefficients) is computed on the host with numpy in float32,
reproducing the float32 torch arithmetic diffusers uses: alphas_cumprod and the integer timesteps
are bit-equal to diffusers', the sigmas within 1-2 ulp (torch's CPU float32 sqrt is not always
correctly rounded). `step` only builds lazy MLX ops from Python-float coefficients.

Two families of latent spaces exist (never mix them across a base -> refiner handoff):
- Euler / Euler Karras / Euler ancestral are variance exploding (`is_ve`): x = x0 + sigma * eps.
- DPM++ 2M (SDE), UniPC, DDIM, LCM and TCD are variance preserving: x = alpha * x0 + sigma_t * eps,
  with alpha = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma * alpha.

`make_scheduler(name, config, timestep_spacing=, prediction_type=, eta=)` builds one; the model
config gives the schedule (betas, spacing, prediction type, zero-SNR rescaling), the name the
algorithm, the options override the config.
"""

from __future__ import annotations

import math
from typing import Optional

from ..errors import ConfigError, InputError
from .base import Scheduler
from .config import PREDICTION_TYPES, SDXL_SCHEDULER_CONFIG, TIMESTEP_SPACINGS, SchedulerConfig
from .consistency import LCMScheduler, TCDScheduler
from .ddim import DDIMScheduler
from .dpm import (DPMSolverMultistepKarrasScheduler, DPMSolverMultistepScheduler, DPMSolverSDEKarrasScheduler,
                  DPMSolverSDEScheduler)
from .euler import EulerAncestralScheduler, EulerKarrasScheduler, EulerScheduler
from .handoff import img2img_start, split_for_handoff
from .noise import alphas_cumprod
from .unipc import UniPCMultistepScheduler

_CLASSES = {cls.name: cls for cls in (
    EulerScheduler, EulerAncestralScheduler, DPMSolverMultistepScheduler, DPMSolverMultistepKarrasScheduler,
    DDIMScheduler, EulerKarrasScheduler, DPMSolverSDEScheduler, DPMSolverSDEKarrasScheduler,
    UniPCMultistepScheduler, LCMScheduler, TCDScheduler)}
SCHEDULERS = tuple(_CLASSES)
# the samplers that add fresh noise (tcd's `stochastic` is a property: only with eta > 0)
STOCHASTIC = tuple(name for name, cls in _CLASSES.items() if cls.stochastic is not False)
OPTIONS = ("timestep_spacing", "prediction_type", "eta")

_ALIASES = {
    "euler_ancestral": "euler_a",
    "euler-a": "euler_a",
    "euler_k": "euler_karras",
    "dpm++_2m": "dpmpp_2m",
    "dpm++2m": "dpmpp_2m",
    "dpm++_2m_karras": "dpmpp_2m_karras",
    "dpm++2m_karras": "dpmpp_2m_karras",
    "dpmpp_2m_k": "dpmpp_2m_karras",
    "dpm++_2m_sde": "dpmpp_2m_sde",
    "dpm++2m_sde": "dpmpp_2m_sde",
    "dpm++_2m_sde_karras": "dpmpp_2m_sde_karras",
    "dpm++2m_sde_karras": "dpmpp_2m_sde_karras",
    "dpmpp_2m_sde_k": "dpmpp_2m_sde_karras",
    "uni_pc": "unipc",
}


def scheduler_name(name) -> str:
    """Our name for `name` (case and aliases folded); ConfigError listing the accepted names."""
    key = name.lower().strip() if isinstance(name, str) else name
    key = _ALIASES.get(key, key)
    if key not in _CLASSES:
        raise ConfigError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    return key


def _check_options(cls, timestep_spacing, prediction_type, eta) -> None:
    if timestep_spacing is not None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise InputError(f"unknown timestep_spacing {timestep_spacing!r}; accepted: {', '.join(TIMESTEP_SPACINGS)}")
        if not cls.uses_spacing:
            raise InputError(f"timestep_spacing does not apply to the {cls.name} sampler: it takes its timesteps "
                             "from the distillation grid (original_inference_steps), as diffusers' "
                             f"{cls.diffusers_class} does; leave timestep_spacing unset")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InputError(f"unknown prediction_type {prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}")
    if eta is not None:
        if cls is not TCDScheduler:
            raise InputError(f"eta applies to the tcd sampler only, not {cls.name}")
        ok = isinstance(eta, (int, float)) and not isinstance(eta, bool) and math.isfinite(eta) and 0 <= eta <= 1
        if not ok:
            raise InputError(f"eta must be a number in [0, 1] (0: deterministic), got {eta!r}")


def make_scheduler(name: str = "euler", config: Optional[dict] = None, **options) -> Scheduler:
    """A fresh scheduler by name; `config` is scheduler_config.json as a dict (None: SDXL's).

    Options (None or absent: the config's value): `timestep_spacing` ("leading", "linspace",
    "trailing"; not for lcm / tcd), `prediction_type` ("epsilon", "v_prediction", "sample") and
    `eta` (tcd only, in [0, 1]; default spec.DEFAULT_TCD_ETA).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown scheduler options {unknown}; accepted: {', '.join(OPTIONS)}")
    cls = _CLASSES[scheduler_name(name)]
    spacing, prediction, eta = (options.get(k) for k in OPTIONS)
    _check_options(cls, spacing, prediction, eta)
    overrides = {k: v for k, v in (("timestep_spacing", spacing), ("prediction_type", prediction)) if v is not None}
    cfg = SchedulerConfig.from_dict(config, cls.config_defaults, overrides)
    return cls(cfg, eta=eta) if cls is TCDScheduler else cls(cfg)


def with_prediction_type(config: Optional[dict], prediction_type: Optional[str]) -> dict:
    """`config` (None: SDXL's) with its prediction_type replaced (None keeps it): the user's word
    on what a model predicts, over its file or single-file detection."""
    config = dict(config if isinstance(config, dict) else SDXL_SCHEDULER_CONFIG)
    if prediction_type is None:
        return config
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"unknown prediction_type {prediction_type!r}; accepted: {', '.join(PREDICTION_TYPES)}")
    return {**config, "prediction_type": prediction_type}


def default_scheduler(config: Optional[dict]) -> str:
    """The sampler a model's scheduler_config.json names, when it is one of ours (diffusers class,
    DPM-Solver's algorithm_type, Karras sigmas); spec.DEFAULT_SCHEDULER otherwise."""
    from ..spec import DEFAULT_SCHEDULER

    config = config if isinstance(config, dict) else SDXL_SCHEDULER_CONFIG
    karras = config.get("use_karras_sigmas") is True
    kind = config.get("_class_name")
    if kind == "EulerDiscreteScheduler":
        return "euler_karras" if karras else "euler"
    if kind == "DPMSolverMultistepScheduler":
        base = {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}.get(
            config.get("algorithm_type", "dpmsolver++"))
        return (base + "_karras" if karras else base) if base else DEFAULT_SCHEDULER
    by_class = {"EulerAncestralDiscreteScheduler": "euler_a", "DDIMScheduler": "ddim", "LCMScheduler": "lcm",
                "TCDScheduler": "tcd", "UniPCMultistepScheduler": "unipc"}
    return by_class.get(kind, DEFAULT_SCHEDULER)


__all__ = [
    "SCHEDULERS", "STOCHASTIC", "OPTIONS", "TIMESTEP_SPACINGS", "PREDICTION_TYPES", "SDXL_SCHEDULER_CONFIG",
    "SchedulerConfig", "Scheduler", "make_scheduler", "default_scheduler", "scheduler_name", "split_for_handoff",
    "with_prediction_type",
    "img2img_start", "alphas_cumprod", "EulerScheduler", "EulerKarrasScheduler", "EulerAncestralScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverMultistepKarrasScheduler", "DPMSolverSDEScheduler",
    "DPMSolverSDEKarrasScheduler", "UniPCMultistepScheduler", "DDIMScheduler", "LCMScheduler", "TCDScheduler",
]
