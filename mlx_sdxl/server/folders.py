"""Model, LoRA and embedding folders: what they hold, and names looked up only inside them.

A request names a checkpoint, LoRA or embedding by the name the listing gave it (a path
relative to its configured folder, with or without the extension). A name is only ever
looked up in the listing, never joined onto a path, so `../x`, `/etc/x` or `C:\\x` can
match nothing outside the folder. Only `.safetensors` files and model folders are listed:
pickle files (`.ckpt`, `.pt`, `.bin`) are never listed, so they are never loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import List, Optional

MAX_DEPTH = 4          # subfolders searched below a configured folder
MAX_ENTRIES = 2000     # entries listed per folder
WEIGHTS_SUFFIX = ".safetensors"
_MODEL_FOLDER_MARKERS = ("model_index.json", "manifest.json", "unet/config.json")


class NotInFolder(LookupError):
    """A name that is not an entry of its folder (unknown, or a path that tries to leave it)."""


@dataclass(frozen=True)
class Entry:
    name: str          # path relative to the folder, '/'-separated: what requests use
    path: Path         # where it is

    @property
    def stem(self) -> str:
        return self.name[: -len(WEIGHTS_SUFFIX)] if self.name.endswith(WEIGHTS_SUFFIX) else self.name

    @property
    def title(self) -> str:
        return PurePosixPath(self.stem).name


def is_model_folder(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _MODEL_FOLDER_MARKERS)


def _scan(root: Path, models: bool) -> List[Entry]:
    """Entries under `root`, breadth first, hidden names skipped, at most MAX_DEPTH deep."""
    found: List[Entry] = []
    level = [root]
    for _ in range(MAX_DEPTH + 1):
        below = []
        for folder in level:
            try:
                children = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for child in children:
                if child.name.startswith(".") or len(found) >= MAX_ENTRIES:
                    continue
                path = Path(child.path)
                name = path.relative_to(root).as_posix()
                if child.is_file() and child.name.lower().endswith(WEIGHTS_SUFFIX):
                    found.append(Entry(name, path))
                elif child.is_dir():
                    if models and is_model_folder(path):
                        found.append(Entry(name, path))
                    else:
                        below.append(path)
        level = below
    return found


def list_entries(root: Optional[Path], models: bool = False) -> List[Entry]:
    """The .safetensors files (and, with `models`, model folders) under `root`; [] without a folder."""
    if root is None or not Path(root).is_dir():
        return []
    return _scan(Path(root).expanduser(), models)


def find(entries: List[Entry], name: str, what: str, flag: str) -> Entry:
    """The entry a request's `name` means: its listed name, with or without the extension, or its title."""
    if not isinstance(name, str) or not name.strip():
        raise NotInFolder(f"give a {what} name from the listing")
    wanted = name.strip()
    for matches in (lambda e: wanted in (e.name, e.stem), lambda e: wanted == e.title):
        hits = [e for e in entries if matches(e)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise NotInFolder(f"{what} name {wanted!r} matches {len(hits)} entries; use one of "
                              f"{', '.join(e.name for e in hits[:5])}")
    listed = ", ".join(e.stem for e in entries[:10]) or "none"
    more = f" (and {len(entries) - 10} more)" if len(entries) > 10 else ""
    raise NotInFolder(f"no {what} named {wanted!r} in {flag}; names are looked up only inside that folder; "
                      f"accepted: {listed}{more}")
