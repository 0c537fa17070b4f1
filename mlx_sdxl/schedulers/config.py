"""A model's scheduler_config.json, read into the settings the samplers use, and checked."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

from ..errors import ConfigError

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

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_PREDICTION_ALIASES = {"original_sample": "sample"}  # diffusers' Euler reads both


@dataclass
class SchedulerConfig:
    """The noise-schedule settings of a diffusers scheduler config.

    Keys missing from the file take the chosen diffusers class's own defaults, as
    `X.from_config(euler.config)` does (diffusers does not pass on defaults Euler filled in). The
    field defaults here are Euler's; each sampler class lists where its own differ
    (`Scheduler.config_defaults`). Keys that choose an algorithm (DPM-Solver's `algorithm_type`,
    `solver_order`, UniPC's `solver_type`, ...) are not read: the sampler's name defines them.
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
    use_lu_lambdas: bool = False
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
    thresholding: bool = False
    lambda_min_clipped: float = -math.inf
    original_inference_steps: int = 50      # LCM / TCD: the distillation grid their steps are taken from
    timestep_scaling: float = 10.0          # LCM: the consistency boundary condition's time scale

    @classmethod
    def from_dict(cls, d: Optional[dict], defaults: Optional[dict] = None,
                  overrides: Optional[dict] = None) -> "SchedulerConfig":
        """`d` (None: SDXL's) over the class `defaults`, then `overrides` (the caller's options) on top."""
        if d is None:
            d = SDXL_SCHEDULER_CONFIG
        if not isinstance(d, dict):
            raise ConfigError(f"scheduler config must be a dict (scheduler_config.json), got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in d.items() if k in names}
        if given.get("prediction_type") in _PREDICTION_ALIASES:
            given["prediction_type"] = _PREDICTION_ALIASES[given["prediction_type"]]
        cfg = cls(**{**(defaults or {}), **given, **(overrides or {})})
        cfg._validate()
        return cfg

    def _bad(self, key, accepted):
        raise ConfigError(f"unsupported scheduler config {key}={getattr(self, key)!r}; accepted: {accepted}")

    def _validate(self):
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            self._bad("num_train_timesteps", "an integer >= 2")
        if self.trained_betas is not None:
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ConfigError(
                    f"trained_betas has {len(self.trained_betas)} values; "
                    f"expected num_train_timesteps={self.num_train_timesteps}"
                )
        elif self.beta_schedule not in ("scaled_linear", "linear"):
            self._bad("beta_schedule", "'scaled_linear', 'linear' (or trained_betas)")
        if self.prediction_type not in PREDICTION_TYPES:
            self._bad("prediction_type", ", ".join(map(repr, PREDICTION_TYPES)))
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            self._bad("timestep_spacing", ", ".join(map(repr, TIMESTEP_SPACINGS)))
        if self.interpolation_type != "linear":
            self._bad("interpolation_type", "'linear'")
        for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "thresholding"):
            if getattr(self, key):
                self._bad(key, "false")
        if self.final_sigmas_type != "zero":
            self._bad("final_sigmas_type", "'zero'")
        if self.lambda_min_clipped != -math.inf:
            self._bad("lambda_min_clipped", "-inf (no clipping)")
        if self.timestep_type != "discrete" and self.prediction_type == "v_prediction":
            self._bad("timestep_type", "'discrete' (continuous timesteps with v_prediction are not supported)")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            self._bad("steps_offset", "an integer >= 0")
        steps = self.original_inference_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.num_train_timesteps:
            self._bad("original_inference_steps", f"an integer in [1, {self.num_train_timesteps}]")
