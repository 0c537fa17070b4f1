"""Convert SDXL weights (hub id, diffusers folder, single file) into an MLX-native folder.

    python -m convert --base SRC [--refiner SRC] --out DIR [--dtype float16] [--refiner-bits 4]

The result loads with `SDXLPipeline.from_pretrained(DIR)` with no key mapping and
without torch installed.
"""

from .export import convert  # noqa: F401
