"""The command line's LoRA options: `--lora PATH[:SCALE]` (repeatable), A1111 prompt tags
`<lora:NAME:SCALE>` loading NAME.safetensors from the LoRA folder, and `--from` loading the
LoRAs an image recorded again.

Everything is decided before a model loads (a tag naming a missing LoRA exits with an error
then). The tags are removed from the text sent to the text encoders; the PNG keeps the
prompt as written and records each LoRA as {"name", "scale", "hash"} (A1111's "Lora hashes"),
its path too with --metadata full. `--from` loads a recorded LoRA that no tag of the prompt
names from its recorded path, else by name from the LoRA folder; `--lora` flags replace them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .errors import InputError
from .lora.files import split_scale
from .lora.tags import find_lora, parse_lora_tags, strip_lora_tags
from .spec import DEFAULT_LORA_DIR, LORA_DIR_ENV


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA to load: where from, at which scale, under which name (None: the file's stem)."""

    source: str
    scale: float
    name: Optional[str] = None
    recorded_hash: Optional[str] = None  # the hash a --from image recorded for it


def add_arguments(group) -> None:
    group.add_argument("--lora", dest="loras", action="append", default=[], metavar="PATH[:SCALE]",
                       help="load a LoRA / LoCon / LoHa / LoKr (.safetensors file, folder or hub id) onto the base "
                            "at SCALE (default 1.0, negative ones too); repeatable")
    group.add_argument("--lora-dir", dest="lora_dir", metavar="DIR",
                       help=f"where <lora:NAME:SCALE> prompt tags find NAME.safetensors, searched recursively "
                            f"(default ${LORA_DIR_ENV}, else {DEFAULT_LORA_DIR})")


def lora_dir(given: Optional[str]) -> Path:
    return Path(given or os.environ.get(LORA_DIR_ENV) or DEFAULT_LORA_DIR).expanduser()


def clean(text):
    """A prompt without its LoRA tags, as the text encoders get it."""
    return strip_lora_tags(text) if isinstance(text, str) else text


def _from_flags(specs: List[str]) -> List[LoraRequest]:
    out = []
    for spec in specs:
        source, scale = split_scale(spec)
        if not source:
            raise InputError(f"--lora {spec}: give PATH or PATH:SCALE")
        out.append(LoraRequest(source, scale))
    return out


def _from_record(entry, tagged: set, folder: Path) -> Optional[LoraRequest]:
    """A LoRA a --from image recorded, found again (None when a prompt tag loads it anyway)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise InputError(f"the image records a LoRA as {entry!r}; expected {{\"name\", \"scale\", \"hash\"}}")
    name = entry["name"]
    if name in tagged:
        return None
    scale = entry.get("scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise InputError(f"the image used the LoRA {name!r} without recording its scale (and no <lora:{name}:...> "
                         "tag in its prompt); pass --lora PATH:SCALE")
    path = entry.get("path")
    if not (isinstance(path, str) and Path(path).is_file()):
        try:
            path = str(find_lora(name, folder))
        except InputError:
            raise InputError(f"the image was made with the LoRA {name!r} (hash {entry.get('hash')}), which is "
                             f"not in the LoRA folder {folder}; pass --lora PATH:SCALE or --lora-dir DIR") from None
    return LoraRequest(path, float(scale), name, entry.get("hash"))


def plan_loras(settings: dict, args) -> List[LoraRequest]:
    """The LoRAs of this run, in load order: the prompt's tags, then the --lora flags (else those a
    --from image recorded). Raises InputError for a bad tag or a LoRA that is not here."""
    folder = lora_dir(getattr(args, "lora_dir", None))
    _, tags = parse_lora_tags(settings.get("prompt"))
    parse_lora_tags(settings.get("negative_prompt"))  # a malformed tag there is an error too
    tagged = {}
    for tag in tags:  # a LoRA tagged twice keeps its last scale, as in A1111
        tagged[tag.name] = LoraRequest(str(find_lora(tag.name, folder)), tag.scale, tag.name)
    requests = list(tagged.values())
    if args.loras:
        requests += _from_flags(args.loras)
    else:
        recorded = settings.get("loras") or []
        if not isinstance(recorded, list):
            raise InputError("the image's recorded LoRAs are not a list of {name, scale, hash}")
        requests += [r for r in (_from_record(e, set(tagged), folder) for e in recorded) if r is not None]
    return requests


def load_loras(pipe, requests: List[LoraRequest], progress) -> None:
    """Load each LoRA onto the base; a note when a --from image recorded another hash for it."""
    for r in requests:
        name = pipe.load_lora(r.source, r.scale, name=r.name)
        lora = pipe.models.loras.get(name)
        if r.recorded_hash and r.recorded_hash != lora.shorthash:
            progress.log(f"note: the LoRA {name} ({lora.path.name}) has hash {lora.shorthash}, the image recorded "
                         f"{r.recorded_hash}")
