"""Hugging Face Hub ids → local snapshot folders (offline-aware)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

from .errors import WeightsError
from .spec import MODEL_PARTS, TOKENIZERS

# Only what an SDXL pipeline needs: no Flax/ONNX/OpenVINO exports, no vae_1_0/, no single files.
PARTS = MODEL_PARTS
CONFIG_PATTERNS = (["model_index.json", "scheduler/*.json"] + [f"{t}/*" for t in TOKENIZERS]
                   + [f"{p}/config.json" for p in PARTS])

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not Path(spec).expanduser().exists()


def cache_dir() -> str:
    """The hub cache, read at call time so HF_HOME / HF_HUB_CACHE set after import are honoured."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def weight_patterns(files: Optional[List[str]]) -> List[str]:
    """Per part, the fp16 safetensors variant when the repo has it, else the plain safetensors."""
    patterns = []
    for part in PARTS:
        names = [f for f in (files or []) if f.startswith(part + "/") and f.endswith(".safetensors")
                 or f.startswith(part + "/") and f.endswith(".safetensors.index.json")]
        if files is not None and any(".fp16." in f for f in names):
            patterns.append(f"{part}/*.fp16.safetensors*")
        else:
            patterns.append(f"{part}/*.safetensors*")
    return patterns


def snapshot(repo_id: str, extra_patterns=()) -> Path:
    """Download (or, offline, find in the cache) the files an SDXL pipeline needs."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise WeightsError(f"huggingface-hub is needed for hub ids ({e})") from None
    files = None
    if not offline():
        try:
            from huggingface_hub import list_repo_files

            files = list_repo_files(repo_id)
        except Exception:
            files = None  # unreachable: fall back to whatever the cache holds
    patterns = CONFIG_PATTERNS + weight_patterns(files) + list(extra_patterns)
    try:
        path = snapshot_download(repo_id, cache_dir=cache_dir(), allow_patterns=patterns,
                                 local_files_only=offline() or files is None)
    except Exception as e:
        how = "it is not in the local cache" if (offline() or files is None) else str(e)
        raise WeightsError(
            f"could not get {repo_id!r} from the Hugging Face Hub: {how} (cache: {cache_dir()}). "
            "Download it once while online, or pass a local folder or .safetensors file"
        ) from None
    return Path(path)


def cached_snapshot(repo_id: str, patterns) -> Optional[Path]:
    """A repo's snapshot from the local cache only, or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, cache_dir=cache_dir(), allow_patterns=list(patterns),
                                      local_files_only=True))
    except Exception:
        return None
