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


# safetensors dtypes MLX reads as what they are -> bytes per element. F64 and the F8 formats are
# refused: MLX cannot read F64 and reads F8_E4M3 as raw uint8.
_SAFETENSORS_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I8": 1, "U16": 2, "I16": 2,
                       "U32": 4, "I32": 4, "U64": 8, "I64": 8, "BOOL": 1}
_MAX_HEADER = 100_000_000
_HEADER_SHAPE = ('a JSON object mapping each tensor name to {"dtype": "F16"|"BF16"|"F32"|..., '
                 '"shape": [n, ...], "data_offsets": [begin, end]}, plus an optional "__metadata__" '
                 "object of strings")


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "object", list: "array", str: "string"}.get(type(value), "number")


def _short(name, limit: int = 80) -> str:
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _bad_header(path: Path, what: str) -> WeightsError:
    return WeightsError(f"{path}: not a valid safetensors header: {what}; accepted: {_HEADER_SHAPE}")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_header_json(path: Path):
    """(file size, header length, parsed header JSON) with only the framing checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > min(size - 8, _MAX_HEADER):
                raise WeightsError(
                    f"{path}: not a safetensors file (bad header length); "
                    "expected a .safetensors checkpoint (pickled .ckpt/.bin files are not supported)"
                )
            return size, n, json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e.__class__.__name__}: {e})") from None


def _check_entry(path: Path, name: str, entry) -> int:
    """Validate one tensor entry of a header; returns the end of its data."""
    if not isinstance(entry, dict):
        raise _bad_header(path, f"tensor {_short(name)} is a JSON {_json_type(entry)}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise _bad_header(path, f"tensor {_short(name)} has no {' or '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        hint = " (convert the checkpoint to float16 or float32 first)" if str(dtype).startswith(("F64", "F8")) \
            else ""
        raise WeightsError(f"{path}: tensor {_short(name)} has dtype {_short(dtype, 40)}, which mlx_sdxl cannot "
                           f"read{hint}; accepted: {', '.join(_SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad_header(path, f"tensor {_short(name)} has shape {_short(shape, 60)}, not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise _bad_header(path, f"tensor {_short(name)} has data_offsets {_short(offsets, 60)}, "
                                "not [begin, end] with 0 <= begin <= end")
    nbytes = _SAFETENSORS_DTYPES[dtype]
    for d in shape:
        nbytes *= d
    if offsets[1] - offsets[0] != nbytes:
        raise _bad_header(path, f"tensor {_short(name)}: data_offsets {offsets} hold {offsets[1] - offsets[0]} "
                                f"bytes but {dtype} {shape} needs {nbytes}")
    return offsets[1]


def read_safetensors_header(path) -> dict:
    """The JSON header of a safetensors file, validated: framing, every entry's dtype, shape and
    offsets, and that the file holds all the data the header promises. Raises WeightsError."""
    path = Path(path)
    size, n, header = _read_header_json(path)
    if not isinstance(header, dict):
        raise _bad_header(path, f"the header is a JSON {_json_type(header)}")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":  # MLX writes null when there is none
            if entry is not None and (not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values())):
                raise _bad_header(path, "__metadata__ is not an object of strings")
            continue
        end = max(end, _check_entry(path, name, entry))
    if 8 + n + end > size:
        raise WeightsError(
            f"{path}: the file is truncated ({size:,} bytes, the header promises {8 + n + end:,}); "
            "download it again"
        )
    return header


def check_safetensors(path: Path) -> None:
    """Fail with a clear WeightsError when `path` is not a complete, valid safetensors file."""
    read_safetensors_header(path)


def safetensors_header(path: Path) -> dict:
    """The tensor entries (names, dtypes, shapes) of a safetensors file, without reading tensors."""
    header = dict(read_safetensors_header(path))
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
                return [folder / s for s in _index_shards(index)]
    present = sorted(p.name for p in folder.iterdir())
    raise WeightsError(
        f"no safetensors weights in {folder} (looked for {', '.join(s + '[.fp16].safetensors' for s in stems)}); "
        f"found: {', '.join(present) or 'nothing'}"
    )


def _index_shards(index: Path) -> list:
    """The shard file names of a `*.safetensors.index.json`, each a plain name in the index's folder."""
    weight_map = read_json_object(index, "a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and v and Path(v).name == v and v not in (".", "..") for v in weight_map.values()):
        raise WeightsError(f"{index}: not a safetensors index; accepted: a JSON object whose \"weight_map\" maps "
                           "tensor names to shard file names in the same folder")
    return sorted(set(weight_map.values()))


def load_folder_weights(folder, stems: Iterable[str], variant: Optional[str] = None) -> Weights:
    weights: Weights = {}
    for f in find_weights(folder, stems, variant):
        weights.update(load_safetensors(f))
    return weights


def read_json_object(path, what: str = "a config") -> dict:
    """A JSON file that must hold an object (configs, indexes, manifests); WeightsError otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"missing {path.name} in {path.parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightsError(f"{path}: not readable as JSON ({e.__class__.__name__}: {e}); "
                           f"accepted: a JSON object ({what})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: holds a JSON {_json_type(data)}; accepted: a JSON object ({what})")
    return data


def read_config(folder, name: str = "config.json") -> dict:
    """`folder/name` as a dict; a missing, unreadable or non-object file raises WeightsError."""
    path = Path(folder) / name
    if not path.is_file():
        raise WeightsError(f"missing {name} in {folder}")
    return read_json_object(path, f"a {name}")


def torch_to_mlx(weights: Mapping[str, mx.array]) -> Weights:
    """Apply the PyTorch → MLX layout rule: conv kernels OIHW → OHWI (lazily)."""
    return {k: (v.transpose(0, 2, 3, 1) if v.ndim == 4 else v) for k, v in weights.items()}


_WEIGHT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def _check_dtypes(given: Mapping[str, mx.array], expected: Mapping[str, mx.array], what: str) -> None:
    """Floating-point parameters take float16/bfloat16/float32 tensors; integer ones (the packed
    weights of quantized layers) exactly their own dtype. Anything else (int8 weights, raw fp8 bytes
    read as uint8, ...) is refused here rather than failing inside a layer later."""
    bad = []
    for k in sorted(given):
        want, got = expected[k].dtype, given[k].dtype
        if mx.issubdtype(want, mx.floating):
            if got not in _WEIGHT_DTYPES:
                bad.append(f"{k} is {_dtype_name(got)}")
        elif got != want:
            bad.append(f"{k} is {_dtype_name(got)} (the quantized layer needs {_dtype_name(want)})")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; ... ({len(bad) - 3} more)" if len(bad) > 3 else "")
        raise WeightsError(f"the {what} weights have a dtype mlx_sdxl cannot use: {shown}; accepted: "
                           f"{', '.join(map(_dtype_name, _WEIGHT_DTYPES))} (and uint32 packed weights with "
                           "float scales and biases in quantized folders written by `mlx-sdxl convert`)")


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
    _check_dtypes(given, expected, what)
    items = []
    for k, v in given.items():
        if dtype is not None and mx.issubdtype(v.dtype, mx.floating):
            v = v.astype(dtype)
        items.append((k, v))
    model.load_weights(items, strict=True)
