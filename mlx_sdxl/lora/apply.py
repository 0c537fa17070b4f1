"""Putting adapters on a loaded model, and taking them off again.

Dense layers (nn.Linear, nn.Conv2d) get the adapters fused into their weights,
W = W0 + Σ scaleᵢ · ΔWᵢ (summed in float32, then cast to the weight's dtype), so a step
costs nothing extra. W0 is the weight as loaded: a layer that holds no adapter yet *is*
W0; one that does is first given W0 again, read from the model's source (never by
subtracting), so the same set of adapters always gives the same bits, and none gives the
original bits exactly.

Quantized layers (QLinear, QConv2d) keep their packed weights; the adapters run beside
them as a `SidePath`: y = W_q x + Σ sᵢ Bᵢ(Aᵢ x) for LoRA factors (rank r extra work),
and the summed dense delta for LoHa / LoKr, at the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..quantize import QConv2d, QLinear
from .deltas import low_rank, mlx_delta
from .formats import LayerWeights

Signature = Tuple[Tuple[str, float], ...]      # the (adapter name, scale) pairs a layer holds, in order
Originals = Callable[[List[str]], Dict[str, mx.array]]  # module paths -> their weights as loaded (lazy)
EVAL_BYTES = 256 * 1024 * 1024                  # new weights evaluated in batches of about this size


@dataclass(frozen=True)
class Active:
    """One adapter as it applies to one model part: name, scale, {module path: (layer, target)}."""

    name: str
    scale: float
    layers: Dict[str, Tuple[LayerWeights, object]]


class SidePath:
    """The adapters' extra output beside a quantized layer (see the module docstring).

    `down` (R, I) or a (R, kh, kw, I) kernel and `up` (O, R) hold every LoRA's factors side by
    side, the scales folded into `up`; `dense` is the summed LoHa / LoKr delta in the layer's
    weight layout. None of them is a copy of the layer's own weight."""

    def __init__(self, down: Optional[mx.array], up: Optional[mx.array], dense: Optional[mx.array], layer):
        self.down, self.up, self.dense = down, up, dense
        self.conv = isinstance(layer, QConv2d)
        if self.conv:
            self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def arrays(self) -> List[mx.array]:
        return [a for a in (self.down, self.up, self.dense) if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def _apply(self, x: mx.array, w: mx.array) -> mx.array:
        if self.conv:
            return mx.conv2d(x, w, self.stride, self.padding, self.dilation)
        return x @ w.T

    def __call__(self, x: mx.array, y: mx.array) -> mx.array:
        """y (the layer's own output for input x) plus the adapters' output. The last product is an
        `addmm` into y, so no second output-sized array is made (y's buffer is reused)."""
        shape = y.shape
        out = y.reshape(-1, shape[-1])
        if self.dense is not None:
            if self.conv:
                out = out + self._apply(x, self.dense).reshape(out.shape)
            else:
                out = mx.addmm(out, x.reshape(-1, x.shape[-1]), self.dense.T)
        if self.down is not None:
            low = self._apply(x, self.down)
            out = mx.addmm(out, low.reshape(-1, low.shape[-1]), self.up.T)
        return out.reshape(shape)


def module_at(model: nn.Module, path: str) -> nn.Module:
    node = model
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def is_quantized(layer) -> bool:
    return isinstance(layer, (QLinear, QConv2d))


def fused_weight(w0: mx.array, items: Sequence[Tuple[LayerWeights, object, float]]) -> mx.array:
    """W0 + Σ scale · ΔW, summed in float32, in W0's dtype (lazily). LoRA factors go through one
    `addmm` each (W += s · up @ down, no dense ΔW is made); LoHa / LoKr add their dense delta. With
    no other reference to W0, MLX writes the float32 result into W0's own buffer (donation), so
    fusing allocates no new weight memory."""
    shape, dtype = w0.shape, w0.dtype
    acc = w0.astype(mx.float32).reshape(shape[0], -1)
    del w0  # the caller holds no reference either: the buffer can be donated
    for layer, target, scale in items:
        if layer.kind == "lora":
            down, up = low_rank(layer, target)
            acc = mx.addmm(acc, up, down.reshape(down.shape[0], -1), alpha=scale)
        else:
            acc = acc + scale * mlx_delta(layer, target).reshape(shape[0], -1)
    return acc.reshape(shape).astype(dtype)


def side_path(layer, items: Sequence[Tuple[LayerWeights, object, float]]) -> Optional[SidePath]:
    """The SidePath of `items` for a quantized `layer`, evaluated, at the layer's dtype; None for no items."""
    if not items:
        return None
    dtype = layer.scales.dtype
    downs, ups, dense = [], [], None
    for adapter, target, scale in items:
        if adapter.kind == "lora":
            down, up = low_rank(adapter, target)
            downs.append(down)
            ups.append(up * scale)
        else:
            d = scale * mlx_delta(adapter, target)
            dense = d if dense is None else dense + d
    cast = (lambda a: None if a is None else a.astype(dtype))  # noqa: E731
    path = SidePath(cast(mx.concatenate(downs) if downs else None),
                    cast(mx.concatenate(ups, axis=1) if ups else None), cast(dense), layer)
    mx.eval(path.arrays())
    return path


def _wanted(actives: Sequence[Active]) -> Dict[str, List[Tuple[LayerWeights, object, float]]]:
    wanted: Dict[str, List[Tuple[LayerWeights, object, float]]] = {}
    for active in actives:
        for path, (layer, target) in active.layers.items():
            wanted.setdefault(path, []).append((layer, target, active.scale))
    return wanted


def _signatures(actives: Sequence[Active]) -> Dict[str, Signature]:
    sigs: Dict[str, List[Tuple[str, float]]] = {}
    for active in actives:
        for path in active.layers:
            sigs.setdefault(path, []).append((active.name, active.scale))
    return {path: tuple(s) for path, s in sigs.items()}


def apply_adapters(model: nn.Module, actives: Sequence[Active], applied: Dict[str, Signature],
                   originals: Originals) -> Dict[str, Signature]:
    """Bring `model` from the adapters it holds (`applied`, as this function returned it last, {} for
    a model as loaded) to `actives`, in their order; only layers whose adapters changed are touched.
    Returns the new `applied`."""
    wanted, sigs = _wanted(actives), _signatures(actives)
    changed = [p for p in dict.fromkeys([*applied, *sigs]) if sigs.get(p, ()) != applied.get(p, ())]
    layers = {p: module_at(model, p) for p in changed}
    reload = [p for p in changed if not is_quantized(layers[p]) and applied.get(p)]
    base = originals(reload) if reload else {}
    pending, size = [], 0
    for path in changed:
        layer, items = layers[path], wanted.get(path, [])
        if is_quantized(layer):
            layer.side = side_path(layer, items)
            continue
        original = base.pop(path, None)
        if original is None and items:
            layer.weight = fused_weight(layer.weight, items)  # no other reference to the old weight
        elif original is not None:
            layer.weight = fused_weight(original, items) if items else original
        original = None
        pending.append(layer.weight)
        size += layer.weight.nbytes
        if size >= EVAL_BYTES:
            mx.eval(pending)
            pending, size = [], 0
    mx.eval(pending)
    return sigs
