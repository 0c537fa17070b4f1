"""mlx_sdxl: Stable Diffusion XL base + refiner in MLX."""

from .version import __version__  # noqa: F401

from .runtime import apply_cuda_defaults  # noqa: E402

apply_cuda_defaults()  # before any GPU work: see runtime.py

from .errors import ConfigError, InputError, SDXLError, WeightsError  # noqa: E402
from .models.clip import load_text_encoder  # noqa: E402
from .models.unet import load_unet  # noqa: E402
from .models.vae import load_vae  # noqa: E402
from .pipeline import GenerationResult, SDXLPipeline, StageTiming  # noqa: E402
from .tokenizer import load_tokenizer  # noqa: E402
from .control import Control  # noqa: E402
from .models.controlnet import load_controlnet  # noqa: E402

__all__ = [
    "SDXLPipeline", "GenerationResult", "StageTiming", "load_unet", "load_vae", "load_text_encoder", "load_tokenizer",
    "Control", "load_controlnet", "SDXLError", "ConfigError", "InputError", "WeightsError", "__version__",
]
