"""LoRAs baked into a model source: `mlx-sdxl convert --lora PATH[:SCALE]` writes models whose
weights already hold them (fused before any quantization), and records which ones."""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Sequence, Tuple

from ..errors import InputError
from .apply import apply_adapters
from .files import split_scale
from .keys import ADAPTED_PARTS
from .registry import LoadedLora, open_lora


def _no_originals(paths):  # a model as loaded holds no adapter, so nothing is ever read back
    raise AssertionError("a freshly loaded model needs no original weights")


def _baking(load: Callable, part: str, loras: Sequence[LoadedLora]) -> Callable:
    def load_baked(dtype=None):
        model = load(dtype)
        actives = [a for a in (lora.active(part) for lora in loras) if a is not None]
        apply_adapters(model, actives, {}, _no_originals)
        return model

    return load_baked


def baked_source(source, specs: Sequence[str], others: Sequence = ()) -> Tuple[object, List[LoadedLora]]:
    """A copy of `source` whose UNet and text encoders load with the LoRAs `specs` (PATH[:SCALE]
    each) fused in, and the LoRAs; every file is read and checked first."""
    loras: List[LoadedLora] = []
    for spec in specs:
        path, scale = split_scale(spec)
        lora = open_lora(path, source, scale=scale, others=others)
        if any(other.name == lora.name for other in loras):
            raise InputError(f"the LoRA {lora.name!r} is given twice")
        loras.append(lora)
    loaders, fingerprints = dict(source.loaders), dict(source.fingerprints)
    tag = ";".join(f"{lora.shorthash}*{lora.scale:g}" for lora in loras)
    for part in ADAPTED_PARTS:
        if part in loaders and any(lora.parts.get(part) for lora in loras):
            loaders[part] = _baking(loaders[part], part, loras)
            fingerprints[part] = f"{fingerprints.get(part, part)}+lora:{tag}"
    return dataclasses.replace(source, loaders=loaders, fingerprints=fingerprints), loras


def manifest_entries(loras: Sequence[LoadedLora], specs: Sequence[str]) -> List[dict]:
    """What a converted folder's manifest says of the LoRAs baked into it."""
    return [dict(lora.record(), source=split_scale(spec)[0], kinds=lora.kinds) for lora, spec in zip(loras, specs)]
