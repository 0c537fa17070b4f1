"""What the UNets are conditioned on besides the prompt embeddings, and guidance.

- Prompts: strings or lists, broadcast against each other.
- Micro-conditioning time ids (sizes and crop offsets in pixels): the base takes
  [orig_h, orig_w, crop_top, crop_left, target_h, target_w]; the refiner takes
  [orig_h, orig_w, crop_top, crop_left, aesthetic_score].
- Classifier-free guidance with the optional rescale of arXiv 2305.08891 §3.4.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .errors import InputError

Prompt = Union[str, Sequence[str]]
Size = Tuple[int, int]


def as_list(prompt: Prompt, what: str) -> List[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InputError(f"{what} must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def broadcast(items: List[str], n: int, what: str) -> List[str]:
    """One entry serves every prompt; otherwise there must be one per prompt."""
    if len(items) == n:
        return items
    if len(items) == 1:
        return items * n
    raise InputError(f"{what} has {len(items)} entries but prompt has {n}; give one or {n}")


def size_pair(value, default: Optional[Size], what: str) -> Optional[Size]:
    """A (height, width) or (top, left) pair of ints; `default` when value is None."""
    if value is None:
        return None if default is None else tuple(default)
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a pair of integers, got {value!r}") from None


def base_time_ids(original: Size, crops: Size, target: Size, neg_original: Optional[Size], neg_crops: Size,
                  neg_target: Optional[Size]) -> Tuple[list, list]:
    """(positive, negative) base ids. The negative row copies the positive one unless both
    negative sizes are given (diffusers ignores one alone)."""
    pos = [*original, *crops, *target]
    if neg_original is not None and neg_target is not None:
        return pos, [*neg_original, *neg_crops, *neg_target]
    return pos, pos


def refiner_time_ids(original: Size, crops: Size, aesthetic: float, neg_original: Size, neg_crops: Size,
                     neg_aesthetic: float) -> Tuple[list, list]:
    """(positive, negative) refiner ids, ending in the (negative) aesthetic score."""
    return [*original, *crops, aesthetic], [*neg_original, *neg_crops, neg_aesthetic]


def time_ids_rows(ids: list, batch: int) -> mx.array:
    """One row of time ids per image: (batch, len(ids)) float32."""
    return mx.broadcast_to(mx.array(ids, dtype=mx.float32)[None], (batch, len(ids)))


def guide(eps: mx.array, scale: float, rescale: float) -> mx.array:
    """Combine the [uncond; cond] halves: ε = ε_u + g(ε_c − ε_u), then optionally rescale
    towards the conditional prediction's per-sample std (unbiased, over all non-batch axes)."""
    eps_u, eps_c = mx.split(eps, 2, axis=0)
    guided = eps_u + scale * (eps_c - eps_u)
    if rescale <= 0:
        return guided
    axes = tuple(range(1, guided.ndim))
    std_text = mx.std(eps_c, axis=axes, keepdims=True, ddof=1)
    std_cfg = mx.std(guided, axis=axes, keepdims=True, ddof=1)
    return rescale * guided * (std_text / std_cfg) + (1 - rescale) * guided
