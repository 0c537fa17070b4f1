"""Errors raised for user mistakes: each says what was wrong and what is accepted."""


class SDXLError(ValueError):
    """Base class for every error mlx_sdxl raises on bad input."""


class ConfigError(SDXLError):
    """A model or scheduler config that mlx_sdxl does not support."""


class WeightsError(SDXLError):
    """Weights that are missing, unreadable, or do not fit the model."""


class InputError(SDXLError):
    """A bad argument to a pipeline call (size, steps, prompt, latents, ...)."""
