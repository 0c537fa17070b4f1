"""Opening a LoRA for one pipeline model (every check before any weight changes), and the set of
LoRAs a pipeline holds."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import InputError, WeightsError
from ..spec import BASE, REFINER, is_int
from .apply import Active
from .detect import seems_for
from .files import lora_path, short_hash
from .formats import LayerWeights, LoraFile, read_lora_file
from .keys import Matched, RoleLayers, match_layers

SHOWN = 5  # unmatched names a warning lists


class LoraWarning(UserWarning):
    """A LoRA loaded with some of its layers ignored."""


@dataclass
class LoadedLora:
    """A LoRA placed on one pipeline model (`role`, "base" or "refiner"), at `scale`."""

    name: str
    role: str
    scale: float
    path: Path
    parts: Dict[str, Dict[str, Tuple[LayerWeights, object]]]
    kinds: List[str]

    @property
    def shorthash(self) -> str:
        return short_hash(self.path)

    def active(self, part: str) -> Optional[Active]:
        layers = self.parts.get(part)
        return Active(self.name, self.scale, layers) if layers and self.scale != 0 else None

    def record(self, full_paths: bool = False) -> dict:
        """What image metadata says of it (the path only with full_paths)."""
        out = {"name": self.name, "scale": self.scale, "hash": self.shorthash}
        if self.role != BASE:
            out["target"] = self.role
        if full_paths:
            out["path"] = str(self.path.resolve())
        return out


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        raise InputError(f"a LoRA scale must be a finite number (negative ones too), got {scale!r}")
    return float(scale)


def _role_widths(sources) -> Dict[int, str]:
    return {s.configs["unet"]["cross_attention_dim"]: f"the SDXL {s.role}" for s in sources
            if s is not None and "unet" in s.configs and is_int(s.configs["unet"].get("cross_attention_dim"))}


def _check_fit(lora: LoraFile, matched: Matched, source, others) -> None:
    """Refuse a file made for another model; warn once about layers that fit nothing."""
    total = len(lora.layers)
    widths = _role_widths([source, *others])
    expected = f"the SDXL {source.role}"
    label, reason = seems_for(lora, widths)
    where = f"{lora.path.name} does not fit the SDXL {source.role} ({source.name})"
    if label is not None and label != expected:
        hint = " (load it with target='refiner')" if label == "the SDXL refiner" and source.role == BASE else \
            " (load it with target='base')" if label == "the SDXL base" and source.role == REFINER else ""
        raise WeightsError(f"{where}: it seems to be made for {reason}{hint}; {matched.count} of its {total} "
                           f"layers match this model's")
    if matched.mismatched:
        shown = "; ".join(matched.mismatched[:SHOWN])
        raise WeightsError(f"{where}: {len(matched.mismatched)} of its {total} layers have other shapes than the "
                           f"model's ({shown}){'; it seems to be made for ' + reason if reason else ''}")
    if matched.count == 0:
        shown = ", ".join(matched.unmatched[:SHOWN])
        raise WeightsError(f"{where}: none of its {total} layers matches a layer of this model (e.g. {shown})"
                           + (f"; it seems to be made for {reason}" if reason else ""))
    if matched.unmatched:
        shown = ", ".join(matched.unmatched[:SHOWN]) + (", ..." if len(matched.unmatched) > SHOWN else "")
        warnings.warn(f"{lora.path.name}: {len(matched.unmatched)} of its {total + len(lora.unknown)} entries "
                      f"match no layer of the SDXL {source.role} and are ignored: {shown}", LoraWarning, stacklevel=4)


def open_lora(spec, source, *, name: Optional[str] = None, scale: float = 1.0, others: Sequence = ()) -> LoadedLora:
    """Read the LoRA `spec` names and place it on the model `source`; raises before anything is applied
    when the file cannot be read, holds DoRA or unsupported layers, or is made for another model.
    `others`: the pipeline's other models, to recognise a file made for one of them."""
    scale = check_scale(scale)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise InputError(f"a LoRA name must be a non-empty string, got {name!r}")
    path = lora_path(spec)
    lora = read_lora_file(path)
    matched = match_layers(lora, RoleLayers(source.configs))
    _check_fit(lora, matched, source, others)
    return LoadedLora(name or path.stem, source.role, scale, path, matched.parts, lora.kinds)


class LoraRegistry:
    """The LoRAs a pipeline holds, by name, in load order (the order they are summed in)."""

    def __init__(self):
        self._items: Dict[str, LoadedLora] = {}

    def __iter__(self) -> Iterator[LoadedLora]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> LoadedLora:
        if name not in self._items:
            known = ", ".join(self._items) or "none"
            raise InputError(f"no LoRA named {name!r} is loaded (loaded: {known})")
        return self._items[name]

    def add(self, lora: LoadedLora) -> None:
        if lora.name in self._items:
            raise InputError(f"a LoRA named {lora.name!r} is already loaded ({self._items[lora.name].path.name}); "
                             "unload it first, or pass another name=")
        self._items[lora.name] = lora

    def remove(self, name: Optional[str]) -> List[LoadedLora]:
        names = list(self._items) if name is None else [self.get(name).name]
        return [self._items.pop(n) for n in names]

    def scales(self) -> Dict[str, float]:
        return {n: lora.scale for n, lora in self._items.items()}

    def actives(self, role: str, part: str) -> List[Active]:
        """The adapters on one model part, in load order (scale 0 ones left out: they change nothing)."""
        found = [lora.active(part) for lora in self._items.values() if lora.role == role]
        return [a for a in found if a is not None]
