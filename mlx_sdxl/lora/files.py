"""Where a LoRA comes from (a file, a folder holding one, a hub id) and its A1111 short hash."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

from ..errors import WeightsError

DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"   # what diffusers' save_lora_weights writes
ACCEPTED = ("a .safetensors file, a folder holding one, or a Hugging Face Hub id (owner/name, or "
            "owner/name/file.safetensors for a repo holding several)")


def _pick(files: List[Path], where: str) -> Path:
    if len(files) == 1:
        return files[0]
    named = [f for f in files if f.name == DIFFUSERS_NAME]
    if named:
        return named[0]
    if not files:
        raise WeightsError(f"{where} holds no .safetensors file; a LoRA source is {ACCEPTED}")
    shown = ", ".join(f.name for f in files[:8]) + (f", ... ({len(files) - 8} more)" if len(files) > 8 else "")
    raise WeightsError(f"{where} holds {len(files)} .safetensors files ({shown}); name the one to load "
                       f"(its path, or owner/name/FILE for a hub repo)")


def _hub(text: str) -> Path:
    from .. import hub

    parts = text.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    patterns = [filename] if filename else ["*.safetensors"]
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, cache_dir=hub.cache_dir(), allow_patterns=patterns,
                                        local_files_only=hub.offline()))
    except Exception as e:
        how = "it is not in the local cache" if hub.offline() else f"{e.__class__.__name__}: {e}"
        raise WeightsError(f"LoRA {text!r} is not a local file or folder, and the Hugging Face Hub could not "
                           f"give it: {how} (cache: {hub.cache_dir()}). A LoRA source is {ACCEPTED}") from None
    if filename:
        path = folder / filename
        if not path.is_file():
            raise WeightsError(f"the hub repo {repo} has no {filename}")
        return path
    return _pick(sorted(folder.glob("*.safetensors")), f"the hub repo {repo}")


def lora_path(spec) -> Path:
    """The `.safetensors` file a LoRA source names."""
    from ..hub import looks_like_repo_id
    from ..sources import is_local_spec

    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _pick(sorted(path.glob("*.safetensors")), str(path))
    parts = text.split("/")
    repo_like = len(parts) >= 2 and looks_like_repo_id("/".join(parts[:2])) and not text.startswith((".", "/", "~"))
    if repo_like and (len(parts) == 2 or text.endswith(".safetensors")):
        return _hub(text)
    if is_local_spec(text) or not repo_like:
        raise WeightsError(f"LoRA not found: no such file or folder {text}. A LoRA source is {ACCEPTED}")
    raise WeightsError(f"LoRA not found: {text}. A LoRA source is {ACCEPTED}")


@lru_cache(maxsize=64)
def _addnet_hash(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def short_hash(path) -> str:
    """A1111's LoRA hash: the first 12 hex digits of the SHA-256 of the file's tensor data (everything
    after the safetensors header, so editing the metadata keeps it), as "Lora hashes" lists it."""
    st = os.stat(path)
    return _addnet_hash(str(path), st.st_size, st.st_mtime)[:12]


def split_scale(spec: str, default: float = 1.0) -> Tuple[str, float]:
    """`PATH[:SCALE]` → (PATH, SCALE); a tail that is no number belongs to the path."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return str(spec), default
