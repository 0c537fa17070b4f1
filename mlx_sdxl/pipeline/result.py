"""What one generation returns: images, the seed of each, their settings, and timings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union


@dataclass
class StageTiming:
    """Wall time, steps run and peak memory (bytes) of one stage of one call."""

    seconds: float = 0.0
    steps: int = 0
    peak_memory: int = 0


Timings = Dict[str, Union[float, StageTiming]]


@dataclass
class GenerationResult:
    """The outcome of `SDXLPipeline.generate`.

    - `images`: what `output_type` asked for: a list of PIL images ("pil"), an NHWC
      float32 array in [0, 1] ("np"), or the final latents ("latent"); None if cancelled.
    - `seeds`: one per image; image i is the image a one-image call with `seeds[i]` makes.
    - `settings`: one dict per image, as recorded in its PNG metadata.
    - `timings`: "load_<role>_<part>" and "encode" in seconds; "base", "refiner" and
      "decode" as StageTiming.
    - `cancelled`: True when a callback returned False.
    """

    images: Any
    seeds: List[int]
    settings: List[dict]
    timings: Timings = field(default_factory=dict)
    cancelled: bool = False

    @property
    def seed(self) -> Optional[int]:
        """The first image's seed."""
        return self.seeds[0] if self.seeds else None
