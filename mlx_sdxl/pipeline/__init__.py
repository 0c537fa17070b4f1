"""The SDXL pipeline: a request becomes a plan of stages (base, refiner), each run by one
loop, then decoded; the result comes back as a value.

- `sdxl.py`: SDXLPipeline, the public entry point
- `plan.py`: requests, checks, and the plan of stages
- `stage.py`: a stage and the sampler loop
- `prompts.py`: prompt encoding and the Conditioning value
- `images.py`: image pre- and post-processing, VAE encode/decode
- `cache.py`: the loaded models
- `result.py`: GenerationResult and StageTiming
"""

from .plan import OUTPUT_TYPES, Plan, Request
from .prompts import Conditioning, PromptTexts
from .result import GenerationResult, StageTiming
from .sdxl import SDXLPipeline
from .stage import Cancelled, Guidance, Stage

__all__ = ["SDXLPipeline", "GenerationResult", "StageTiming", "Request", "Plan", "Stage", "Guidance",
           "Conditioning", "PromptTexts", "Cancelled", "OUTPUT_TYPES"]
