"""Non-finite values: a lazy check to evaluate together with a stage's result, and an
error that names the stage, the step, the model part, and the likely cause."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import SDXLError

HALF = (mx.float16, mx.bfloat16)


def nonfinite(*arrays: mx.array) -> mx.array:
    """A scalar bool, true when any of `arrays` holds NaN or inf (lazy: evaluate it with them)."""
    flags = [mx.any(mx.logical_not(mx.isfinite(a))) for a in arrays if a is not None]
    return flags[0] if len(flags) == 1 else mx.any(mx.stack(flags))


def bad_tensor(model) -> Optional[str]:
    """The name of the first floating-point weight that holds NaN or inf, if any."""
    for name, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
            return name
    return None


def _dtype_of(model):
    for _, value in tree_flatten(model.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


def cause(model, part: str) -> str:
    """Why `part` produced non-finite values: bad weights (named), half precision, or neither."""
    name = bad_tensor(model)
    if name is not None:
        return f"its weights hold NaN/inf (tensor {part}.{name}): the model file is damaged; re-download or re-convert it"
    dtype = model.compute_dtype if part == "vae" else _dtype_of(model)
    if dtype in HALF:
        if part == "vae":
            return ("the SDXL VAE overflows in float16: use the fp16-fix VAE (--vae madebyollin/sdxl-vae-fp16-fix) "
                    "or dtype float32")
        return "float16 overflowed: try dtype float32 or bfloat16"
    return "its weights are finite, so the inputs were not (check the latents, image or settings)"


def nonfinite_error(what: str, part: str, model) -> SDXLError:
    return SDXLError(f"{what} in the {part}; {cause(model, part)}")
