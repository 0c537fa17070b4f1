"""Which model a LoRA file seems to be made for, from its names and shapes, so that a file for
another model is refused with a reason rather than applied to the wrong layers."""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

from .formats import LoraFile

# cross-attention widths (the text context the UNet reads) of the released models
_CROSS_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "the SDXL base", 1280: "the SDXL refiner"}
_TRANSFORMER = re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks|joint_blocks|"
                          r"img_attn|txt_attn|context_block|x_block)([._]|$)|^(lora_)?transformer[._]"
                          r"|^diffusion_model\.")
_KEY_TOKENS = re.compile(r"attn2[._]to_k$|attn2\.processor\.to_k$")


def _cross_width(lora: LoraFile) -> Optional[int]:
    """The input width of the file's cross-attention key projections (None if it has none)."""
    from .deltas import delta_shape

    for name, layer in lora.layers.items():
        if _KEY_TOKENS.search(name):
            return int(delta_shape(layer)[1])
    return None


def seems_for(lora: LoraFile, role_widths: Dict[int, str]) -> Tuple[Optional[str], Optional[str]]:
    """(label, description) of the model the file seems made for: label "SD 1.x", "the SDXL base",
    "the SDXL refiner", ... (None when the file does not tell), description with the evidence.
    `role_widths` maps this pipeline's cross-attention widths to "the SDXL base" / "the SDXL refiner"
    (so tiny and custom models are recognised too)."""
    names = list(lora.layers) + list(lora.unknown)
    if any(_TRANSFORMER.search(n) for n in names):
        return "a DiT", "a transformer (DiT) model such as Flux or SD3 (it has transformer / double_blocks keys)"
    width = _cross_width(lora)
    label = (role_widths.get(width) or _CROSS_WIDTHS.get(width)) if width is not None else None
    evidence = [f"cross-attention width {width}"] if width is not None else []
    if any(n.startswith("lora_te_") for n in names):
        label = label if label in ("SD 1.x", "SD 2.x") else "SD 1.x/2.x"
        evidence.insert(0, "one text encoder, lora_te_ keys")
    if label is None and width is not None:
        label = f"a model with cross-attention width {width}"
    if label is None:
        return None, None
    return label, f"{label} ({'; '.join(evidence)})"
