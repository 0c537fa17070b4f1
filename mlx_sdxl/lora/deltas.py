"""The weight change each adapter layer makes, by the published formulas (float32, PyTorch layout first).

    LoRA / LoCon   ΔW = up @ down                                    (r = down rows)
                   with a Tucker core (lora_mid): ΔW[o,i,..] = Σ mid[a,b,..] up[o,a] down[b,i]
    LoHa           ΔW = (w1a @ w1b) ⊙ (w2a @ w2b)                    (r = w1b rows)
                   with hada_t1/t2: each factor rebuilt as Σ t[a,b,..] w_a[a,o] w_b[b,i]
    LoKr           ΔW = w1 ⊗ w2 (Kronecker), w1 = w1a @ w1b, w2 = w2a @ w2b when factored,
                   w2 = Σ t2[a,b,..] w2a[a,o] w2b[b,i] with a Tucker core
each times alpha / r (LyCORIS' rules for the scale: `LayerWeights.scale`). Conv deltas are
moved to MLX's (O, kh, kw, I) layout last.
"""

from __future__ import annotations

import math
from typing import Tuple

import mlx.core as mx

from .formats import LayerWeights


def _f32(x: mx.array) -> mx.array:
    return x.astype(mx.float32)


def _flat(x: mx.array) -> mx.array:
    """(rows, everything else)."""
    return x.reshape(x.shape[0], -1)


def _tucker(core: mx.array, wa: mx.array, wb: mx.array) -> mx.array:
    """Σ core[a,b,..] wa[a,o] wb[b,i] → (o, i, ..): LyCORIS' rebuild_tucker."""
    inner = mx.einsum("abkl,bi->aikl", _f32(core), _f32(_flat(wb)))
    r, i, kh, kw = inner.shape
    out = _f32(_flat(wa)).T @ inner.reshape(r, -1)
    return out.reshape(-1, i, kh, kw)


def _lora(t) -> mx.array:
    up = _f32(t["up"]).reshape(t["up"].shape[0], -1)
    if "mid" in t:
        return _tucker(t["mid"], up.T, t["down"])
    down = _f32(t["down"])
    return (up @ _flat(down)).reshape(up.shape[0], *down.shape[1:])


def _loha_factor(t, a: str, b: str, core: str) -> mx.array:
    if core in t:
        return _tucker(t[core], t[a], t[b])
    wa, wb = _f32(t[a]), _f32(t[b])
    return _flat(wa) @ _flat(wb)


def _lokr_half(t, which: str) -> mx.array:
    if which in t:
        return _f32(t[which])
    a, b = _f32(t[which + "a"]), _f32(t[which + "b"])
    if which == "w2" and "t2" in t:
        return _tucker(t["t2"], a, b)
    return (a @ _flat(b)).reshape(a.shape[0], *b.shape[1:])


def _lokr(t) -> mx.array:
    w1, w2 = _lokr_half(t, "w1"), _lokr_half(t, "w2")
    w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - w1.ndim)))
    return mx.kron(w1, w2)


_FORMULAS = {"lora": _lora, "loha": lambda t: _loha_factor(t, "w1a", "w1b", "t1") * _loha_factor(t, "w2a", "w2b", "t2"),
             "lokr": _lokr}


def delta_shape(layer: LayerWeights) -> Tuple[int, ...]:
    """The shape of the layer's ΔW as its formula builds it (PyTorch layout), from tensor shapes only."""
    t = {k: v.shape for k, v in layer.tensors.items()}
    if layer.kind == "lora":
        tail = (t["down"][1], *t["mid"][2:]) if "mid" in t else tuple(t["down"][1:])
        return (t["up"][0], *tail)
    if layer.kind == "loha":
        if "t1" in t:
            return (t["w1a"][1], t["w1b"][1], *t["t1"][2:])
        return (t["w1a"][0], math.prod(t["w1b"][1:]))

    def half(w):
        if w in t:
            return tuple(t[w])
        if w == "w2" and "t2" in t:
            return (t["w2a"][1], t["w2b"][1], *t["t2"][2:])
        return (t[w + "a"][0], *t[w + "b"][1:])

    a, b = half("w1"), half("w2")
    a = a + (1,) * (len(b) - len(a))
    return tuple(x * y for x, y in zip(a, b))


def fits(shape: Tuple[int, ...], target) -> bool:
    """Whether a ΔW of `shape` fits the target's weight: same outputs and the same number of values
    (LoHa's flat conv factors and 1×1 convs on Linear layers are reshaped)."""
    return shape[0] == target.shape[0] and math.prod(shape) == math.prod(target.shape)


def torch_delta(layer: LayerWeights, target) -> mx.array:
    """alpha/r · ΔW in float32, shaped as the target's weight in PyTorch layout."""
    return (_FORMULAS[layer.kind](layer.tensors) * layer.scale).reshape(target.shape)


def mlx_delta(layer: LayerWeights, target) -> mx.array:
    """alpha/r · ΔW in float32, in the MLX layout of the target's weight (convs (O, kh, kw, I))."""
    delta = torch_delta(layer, target)
    return delta.transpose(0, 2, 3, 1) if target.conv else delta


def low_rank(layer: LayerWeights, target) -> Tuple[mx.array, mx.array]:
    """(down, up) of a LoRA layer in MLX layout, float32, with alpha/r folded into `up`:
    Linear: down (r, I), up (O, r); conv: down a (r, kh, kw, I) kernel (the Tucker core folded in),
    up (O, r) applied over channels."""
    t = layer.tensors
    up = _f32(t["up"]).reshape(t["up"].shape[0], -1) * layer.scale
    if not target.conv:
        return _flat(_f32(t["down"])), up
    o, i, kh, kw = target.shape
    if "mid" in t:
        down = mx.einsum("abkl,bi->aikl", _f32(t["mid"]), _flat(_f32(t["down"])))
    else:
        down = _f32(t["down"]).reshape(-1, i, kh, kw)
    return down.transpose(0, 2, 3, 1), up
