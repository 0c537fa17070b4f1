"""AUTOMATIC1111's LoRA prompt tags: `<lora:NAME>` and `<lora:NAME:SCALE>` (also `<lyco:...>`).

A tag loads NAME (a .safetensors file under the LoRA folder, searched recursively, as
A1111 does) at SCALE (default 1.0) and is removed from the text the text encoders read.
`strip_lora_tags` is what the prompt path calls before it parses the A1111 syntax, so
a tag never reaches CLIP. A1111's separate text-encoder / UNet scales
(`<lora:NAME:0.8:0.5>`) are refused with a clear error: one scale per LoRA here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import InputError

TAG = re.compile(r"<(?:lora|lyco):([^<>]*)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    name: str
    scale: float
    text: str  # the tag as written


def _parse(tag: str, body: str) -> LoraTag:
    name, *args = [a.strip() for a in body.split(":")]
    if not name:
        raise InputError(f"prompt tag {tag}: no LoRA name; accepted: <lora:NAME> or <lora:NAME:SCALE>")
    if len(args) > 1:
        raise InputError(f"prompt tag {tag}: separate text-encoder and UNet scales are not supported; "
                         "accepted: <lora:NAME> or <lora:NAME:SCALE>")
    scale = 1.0
    if args:
        try:
            scale = float(args[0])
        except ValueError:
            raise InputError(f"prompt tag {tag}: scale {args[0]!r} is not a number; accepted: <lora:NAME:SCALE>, "
                             "e.g. <lora:my-style:0.8>") from None
        if not math.isfinite(scale):
            raise InputError(f"prompt tag {tag}: the scale must be a finite number")
    return LoraTag(name, scale, tag)


def parse_lora_tags(text: Optional[str]) -> Tuple[Optional[str], List[LoraTag]]:
    """(text without the tags, the tags in order). A LoRA named twice keeps its last scale, as in A1111."""
    if not text:
        return text, []
    tags = [_parse(m.group(0), m.group(1)) for m in TAG.finditer(text)]
    return TAG.sub("", text), tags


def strip_lora_tags(text: str) -> str:
    """`text` without its LoRA tags (nothing else changes)."""
    return TAG.sub("", text) if isinstance(text, str) and "<" in text else text


def find_lora(name: str, folder) -> Path:
    """NAME.safetensors under `folder` (searched recursively; NAME may hold sub-folders)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"the prompt names LoRA {name!r}, but the LoRA folder {folder} does not exist "
                         "(--lora-dir DIR)")
    direct = folder / f"{name}.safetensors"
    if direct.is_file():
        return direct
    found = sorted(p for p in folder.rglob("*.safetensors") if p.stem == Path(name).name)
    if not found:
        known = sorted(p.stem for p in folder.rglob("*.safetensors"))
        shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "") if known else "none"
        raise InputError(f"the prompt names LoRA {name!r}, but there is no {name}.safetensors in {folder} "
                         f"(found: {shown}); pass --lora-dir DIR")
    if len(found) > 1:
        raise InputError(f"the prompt names LoRA {name!r}, and {folder} holds several: "
                         + ", ".join(str(p.relative_to(folder)) for p in found) + "; name it with its sub-folder")
    return found[0]
