"""What one generation returns: images, the seed of each, their settings, and timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import mlx.core as mx


@dataclass
class StageTiming:
    """Wall time, steps run, peak memory (bytes, `mx.get_peak_memory()` over the stage) and the
    bytes of model weights resident during it, of one stage of one call. The text encoders load
    within "encode"; a UNet or the VAE loads just before its stage, outside its figures."""

    seconds: float = 0.0
    steps: int = 0
    peak_memory: int = 0
    weights_memory: int = 0

    @property
    def working_memory(self) -> int:
        """Peak minus resident weights: activations, caches and temporaries."""
        return max(self.peak_memory - self.weights_memory, 0)


class Timings(Dict[str, Union[float, StageTiming]]):
    """"load_<role>_<part>" → seconds and stage name → StageTiming, plus `peak_memory`: the whole
    call's peak in bytes, loads included. MLX has one peak counter, which each stage resets to
    measure its own peak: `start_stage()` folds what the counter saw so far into the call's peak
    before the reset."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.peak_memory = 0
        mx.reset_peak_memory()

    def start_stage(self) -> None:
        self.peak_memory = max(self.peak_memory, mx.get_peak_memory())
        mx.reset_peak_memory()

    def record(self, stage: str, timing: StageTiming) -> None:
        """A finished stage's figures; its peak counts toward the call's (a stage may reset
        MLX's counter itself, as `Stage.run` does)."""
        self[stage] = timing
        self.peak_memory = max(self.peak_memory, timing.peak_memory)

    def finish(self) -> "Timings":
        self.peak_memory = max(self.peak_memory, mx.get_peak_memory())
        return self


@dataclass
class GenerationResult:
    """The outcome of `SDXLPipeline.generate`.

    - `images`: what `output_type` asked for: a list of PIL images ("pil"), an NHWC
      float32 array in [0, 1] ("np"), or the final latents ("latent"); None if cancelled.
    - `seeds`: one per image; image i is the image a one-image call with `seeds[i]` makes.
    - `settings`: one dict per image, as recorded in its PNG metadata.
    - `timings`: "load_<role>_<part>" in seconds; "encode", "base", "refiner" and "decode" as
      StageTiming.
    - `cancelled`: True when a callback returned False.
    """

    images: Any
    seeds: List[int]
    settings: List[dict]
    timings: Timings = field(default_factory=Timings)
    cancelled: bool = False

    @property
    def peak_memory(self) -> int:
        """The call's peak memory in bytes (`mx.get_peak_memory()` over all its stages and loads)."""
        return getattr(self.timings, "peak_memory", 0)

    @property
    def seed(self) -> Optional[int]:
        """The first image's seed."""
        return self.seeds[0] if self.seeds else None
