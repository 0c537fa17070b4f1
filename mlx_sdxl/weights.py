"""Reading safetensors lazily and putting the tensors into MLX modules, with validation.

PyTorch layouts are mapped by one rule: 4-D conv weights go from OIHW to OHWI.
Everything else (Linear [out, in], biases, norms, embeddings) is unchanged.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import WeightsError

Weights = Dict[str, mx.array]

_DTYPES = {
    "float32": mx.float32,
    "fp32": mx.float32,
    "float16": mx.float16,
    "fp16": mx.float16,
    "half": mx.float16,
    "bfloat16": mx.bfloat16,
    "bf16": mx.bfloat16,
}


def parse_dtype(dtype) -> Optional[mx.Dtype]:
    """Accept None, an mx.Dtype, or a name such as "float16" / "bf16"."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise WeightsError(f"unknown dtype {dtype!r}; accepted: float32, float16, bfloat16")


def check_safetensors(path: Path) -> None:
    """Fail with a clear message when `path` is not a complete safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > min(size - 8, 100_000_000):
                raise WeightsError(
                    f"{path}: not a safetensors file (bad header length); "
                    "expected a .safetensors checkpoint (pickled .ckpt/.bin files are not supported)"
                )
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(
            f"{path}: the file is truncated ({size:,} bytes, the header promises {8 + n + end:,}); "
            "download it again"
        )


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes) without reading tensors."""
    path = Path(path)
    check_safetensors(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def load_safetensors(path) -> Weights:
    """Lazily map one safetensors file: tensors are read only when evaluated."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    check_safetensors(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError with terse messages
        raise WeightsError(f"{path}: could not read safetensors ({e})") from None


def find_weights(folder, stems: Iterable[str], variant: Optional[str] = None) -> list:
    """Weight files in a diffusers component folder.

    `stems` are base names such as "diffusion_pytorch_model" or "model". Sharded
    checkpoints are found through their `*.safetensors.index.json`. With
    `variant="fp16"` the `.fp16.` file is preferred; otherwise the plain file is
    preferred and the fp16 one is used when it is all there is.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"model folder not found: {folder}")
    variants = [variant, None] if variant else [None, "fp16"]
    for stem in stems:
        for v in variants:
            name = f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors"
            if (folder / name).is_file():
                return [folder / name]
            index = folder / f"{name}.index.json"
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError) as e:
                    raise WeightsError(f"{index}: not a safetensors index ({e})") from None
                return [folder / s for s in shards]
    present = sorted(p.name for p in folder.iterdir())
    raise WeightsError(
        f"no safetensors weights in {folder} (looked for {', '.join(s + '[.fp16].safetensors' for s in stems)}); "
        f"found: {', '.join(present) or 'nothing'}"
    )


def load_folder_weights(folder, stems: Iterable[str], variant: Optional[str] = None) -> Weights:
    weights: Weights = {}
    for f in find_weights(folder, stems, variant):
        weights.update(load_safetensors(f))
    return weights


def read_config(folder, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise WeightsError(f"missing {name} in {folder}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: invalid JSON ({e})") from None


def torch_to_mlx(weights: Mapping[str, mx.array]) -> Weights:
    """Apply the PyTorch → MLX layout rule: conv kernels OIHW → OHWI (lazily)."""
    return {k: (v.transpose(0, 2, 3, 1) if v.ndim == 4 else v) for k, v in weights.items()}


def apply_weights(model, weights: Mapping[str, mx.array], what: str, dtype=None, ignore=()) -> None:
    """Load `weights` into `model`, refusing any mismatch.

    Missing, unexpected and mis-shaped keys are all collected into one
    WeightsError. Keys starting with any prefix in `ignore` are dropped first.
    `dtype` casts floating-point tensors (lazily); None keeps the file's dtype.
    """
    dtype = parse_dtype(dtype)
    expected = dict(tree_flatten(model.parameters()))
    given = {k: v for k, v in weights.items() if not any(k.startswith(p) or k.endswith(p) for p in ignore)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if tuple(given[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = [f"weights do not fit the {what}:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
                parts.append(f"  {len(items)} {label}: {shown}")
        raise WeightsError("\n".join(parts))
    items = []
    for k, v in given.items():
        if dtype is not None and mx.issubdtype(v.dtype, mx.floating):
            v = v.astype(dtype)
        items.append((k, v))
    model.load_weights(items, strict=True)
