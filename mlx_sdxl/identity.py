"""How images name the models they were made with, and how those names are found again.

Metadata modes (`--metadata` / `metadata=`):
- "minimal" (default): identifiers only. A hub model is its id; a local file or folder is
  its name (no directory) and a short hash of its weights. No path, user or home folder
  name is written.
- "full": local paths as given, made absolute, for your own archive.
- "none": no metadata chunks at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import InputError
from .spec import METADATA_MODES

MODEL_KEYS = ("model", "refiner", "vae")
MODELS_DIR_ENV = "MLX_SDXL_MODELS"


def check_mode(mode: str) -> str:
    if mode not in METADATA_MODES:
        raise InputError(f"metadata must be one of {', '.join(METADATA_MODES)}, got {mode!r}")
    return mode


def source_fields(key: str, source, mode: str) -> dict:
    """The settings naming one ModelSource: {key: identifier, key_hash: hash} or the full path."""
    if mode == "full" and "/" not in source.name:  # a local source (a hub id keeps its id)
        return {key: source.description}
    return {key: source.name, f"{key}_hash": source.short_hash}


def image_field(path: Optional[str], mode: str) -> Optional[str]:
    """An input image as recorded: its file name (minimal) or its absolute path (full)."""
    if path is None:
        return None
    return str(Path(path).expanduser().resolve()) if mode == "full" else Path(path).name


def models_dir(given: Optional[str]) -> Optional[Path]:
    value = given or os.environ.get(MODELS_DIR_ENV)
    return Path(value).expanduser() if value else None


def locate(value: str, key: str, folder: Optional[Path], recorded: bool) -> str:
    """Where a model named `value` is: itself when it is a path here or a hub id, else the
    entry of that name in the models folder. Raises with what to pass when none fits."""
    from .hub import looks_like_repo_id
    from .sources import is_local_spec

    path = Path(value).expanduser()
    if os.path.lexists(path):
        return str(path.resolve()) if path.exists() else value  # a dangling or looping link: reported at load
    if folder is not None and (folder / value).exists():
        return str((folder / value).resolve())
    if not is_local_spec(value) and looks_like_repo_id(value):
        return value
    where = f"in the models folder {folder}" if folder is not None else "here"
    if recorded:
        raise InputError(f"the image was made with {key} {value!r}, which is not a file or folder {where} nor a "
                         f"hub id; pass --{key} PATH, or --models-dir DIR (or ${MODELS_DIR_ENV}) holding it")
    raise InputError(f"--{key} {value}: no such file or folder {where}, and not a hub id (owner/name)")


def source_name(spec: str, mode: str) -> str:
    """A file, folder or hub id as recorded: the hub id or the name (minimal), or the absolute path (full)."""
    path = Path(spec).expanduser()
    if not path.exists():
        return spec  # a hub id
    return str(path.resolve()) if mode == "full" else path.name
