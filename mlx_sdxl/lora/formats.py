"""LoRA files as users download them → one `LayerWeights` per adapted layer, in the file's names.

Every common `.safetensors` layout is read (pickled files never are):

    kohya / A1111 / Civitai   lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha
                              (LoCon convs too, with an optional .lora_mid.weight), lora_te1_ / lora_te2_
    LyCORIS LoHa              <name>.hada_w1_a / _w1_b / _w2_a / _w2_b [/ hada_t1 / hada_t2], .alpha
    LyCORIS LoKr              <name>.lokr_w1 | lokr_w1_a + _w1_b, lokr_w2 | lokr_w2_a + _w2_b [/ lokr_t2], .alpha
    diffusers / PEFT          unet.<module>.lora_A.weight / .lora_B.weight, text_encoder[_2].<module>...
                              (alphas in the file's `lora_adapter_metadata`, else alpha = rank)
    older diffusers           unet.<...>.processor.to_q_lora.down.weight / .up.weight,
                              <module>.lora.down.weight, <module>.lora_linear_layer.down.weight

DoRA files (`dora_scale`, `lora_magnitude_vector`) and layer kinds other than LoRA/LoCon/LoHa/LoKr
(OFT, IA3, full weight differences, norm layers) are refused with an error naming what they are.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from ..errors import WeightsError

# key suffix (after the layer name and a dot) -> (kind, slot)
_SLOTS = {
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"), "lora_mid.weight": ("lora", "mid"),
    "lora_A.weight": ("lora", "down"), "lora_B.weight": ("lora", "up"),
    "lora.down.weight": ("lora", "down"), "lora.up.weight": ("lora", "up"),
    "lora_linear_layer.down.weight": ("lora", "down"), "lora_linear_layer.up.weight": ("lora", "up"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    "alpha": (None, "alpha"),
    "dora_scale": ("dora", "magnitude"), "lora_magnitude_vector": ("dora", "magnitude"),
    "lora_magnitude_vector.weight": ("dora", "magnitude"),
}
# suffixes of layer kinds that are not supported, with what they are
_UNSUPPORTED = {
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R.weight": "OFT", "oft_r": "OFT", "rescale": "BOFT/OFT",
    "diff": "full weight differences (LyCORIS 'full')", "diff_b": "full weight differences (LyCORIS 'full')",
    "w_norm": "norm-layer weights", "b_norm": "norm-layer weights",
    "on_input": "IA3", "lora_B.bias": "LoRA bias terms (PEFT lora_bias)",
}
_SUFFIXES = sorted([*_SLOTS, *_UNSUPPORTED], key=len, reverse=True)
# older diffusers attention processors: <attention>.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"^(?P<layer>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<dir>down|up)"
                        r"\.weight$")
_REQUIRED = {"lora": ("down", "up"), "loha": ("w1a", "w1b", "w2a", "w2b")}
DORA_ERROR = ("DoRA adapters (weight-decomposed LoRA, {n} layers with dora_scale / lora_magnitude_vector) are "
              "not supported: applying them without the magnitude rescaling would give wrong images. Accepted: "
              "LoRA, LoCon, LoHa and LoKr files")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' per-model PEFT settings (r, lora_alpha, alpha_pattern, ...)


@dataclass
class LayerWeights:
    """One adapted layer: `kind` "lora" (LoCon too), "loha" or "lokr"; its tensors (PyTorch layout)
    by slot; the alpha the file gives (None: the format's default)."""

    name: str
    kind: str
    tensors: Dict[str, mx.array]
    alpha: Optional[float] = None
    rs_lora: bool = False          # PEFT's rank-stabilised scaling: alpha / sqrt(rank)

    @property
    def rank(self) -> int:
        t = self.tensors
        if self.kind == "lora":
            return int(t["down"].shape[0])
        if self.kind == "loha":
            return int(t["w1b"].shape[0])
        if "w1a" in t:
            return int(t["w1a"].shape[1])
        return int(t["w2a"].shape[1]) if "w2a" in t else 1

    @property
    def scale(self) -> float:
        """alpha / rank (a missing alpha means alpha = rank; a LoKr of two full matrices has scale 1)."""
        r = self.rank
        if self.kind == "lokr" and "w1" in self.tensors and "w2" in self.tensors:
            return 1.0
        alpha = r if self.alpha is None or self.alpha == 0 else self.alpha
        return alpha / (math.sqrt(r) if self.rs_lora else r)


@dataclass
class LoraFile:
    """A LoRA file's layers, keyed by the file's layer names (prefix included)."""

    path: Path
    layers: Dict[str, LayerWeights]
    metadata: Dict[str, str] = field(default_factory=dict)
    unknown: List[str] = field(default_factory=list)   # tensor names that are no LoRA weight

    @property
    def kinds(self) -> List[str]:
        return sorted({layer.kind for layer in self.layers.values()})


def split_key(key: str) -> Tuple[str, Optional[str], str]:
    """(layer name, kind, slot) of a tensor name; kind None for an alpha; slot "?" when unknown."""
    if m := _PROCESSOR.match(key):
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['layer']}.{proj}", "lora", m["dir"]
    for suffix in _SUFFIXES:
        if key.endswith("." + suffix):
            layer = key[: -len(suffix) - 1]
            if suffix in _UNSUPPORTED:
                return layer, "unsupported", _UNSUPPORTED[suffix]
            kind, slot = _SLOTS[suffix]
            return layer, kind, slot
    return key, None, "?"


def _group(path: Path, tensors: Dict[str, mx.array]):
    """{layer: {slot: tensor}}, {layer: kind}, and the keys nothing understood."""
    slots: Dict[str, Dict[str, mx.array]] = {}
    kinds: Dict[str, set] = {}
    unknown, unsupported, dora = [], {}, []
    for key, value in tensors.items():
        layer, kind, slot = split_key(key)
        if kind == "unsupported":
            unsupported.setdefault(slot, []).append(key)
        elif kind == "dora":
            dora.append(layer)
        elif slot == "?":
            unknown.append(key)
        else:
            slots.setdefault(layer, {})[slot] = value
            if kind is not None:
                kinds.setdefault(layer, set()).add(kind)
    if dora:
        raise WeightsError(f"{path}: " + DORA_ERROR.format(n=len(dora)))
    if unsupported:
        what = "; ".join(f"{name} ({len(keys)} tensors, e.g. {keys[0]})" for name, keys in unsupported.items())
        raise WeightsError(f"{path} holds layer kinds mlx_sdxl cannot apply: {what}. Accepted: LoRA, LoCon, "
                           "LoHa and LoKr layers")
    return slots, kinds, unknown


def _alpha(path: Path, layer: str, value: mx.array) -> float:
    if value.size != 1 or not mx.issubdtype(value.dtype, mx.floating) and not mx.issubdtype(value.dtype, mx.integer):
        raise WeightsError(f"{path}: {layer}.alpha has shape {tuple(value.shape)} and dtype {value.dtype}; "
                           "accepted: one number")
    alpha = float(value.astype(mx.float32).reshape(-1)[0].item())
    if not math.isfinite(alpha):
        raise WeightsError(f"{path}: {layer}.alpha is {alpha}; accepted: a finite number")
    return alpha


def _layer(path: Path, name: str, kinds: set, slots: Dict[str, mx.array]) -> LayerWeights:
    if len(kinds) != 1:
        raise WeightsError(f"{path}: layer {name} mixes {' and '.join(sorted(kinds))} tensors; "
                           "one kind per layer is accepted")
    (kind,) = kinds
    tensors = {k: v for k, v in slots.items() if k != "alpha"}
    missing = [s for s in _REQUIRED.get(kind, ()) if s not in tensors]
    if kind == "lokr":  # each half is a full matrix or a pair of factors
        missing = [p for p in ("w1", "w2") if p not in tensors and not {p + "a", p + "b"} <= set(tensors)]
    if kind == "loha" and ("t1" in tensors) != ("t2" in tensors):
        missing.append("t2" if "t1" in tensors else "t1")
    if missing:
        raise WeightsError(f"{path}: layer {name} ({kind}) is incomplete: no {', '.join(sorted(missing))}")
    bad = [f"{k} is {v.dtype}" for k, v in tensors.items() if not mx.issubdtype(v.dtype, mx.floating)]
    if bad:
        raise WeightsError(f"{path}: layer {name} has non-float tensors ({', '.join(bad)}); accepted: "
                           "float16, bfloat16, float32")
    alpha = _alpha(path, name, slots["alpha"]) if "alpha" in slots else None
    return LayerWeights(name, kind, tensors, alpha)


def _peft_settings(metadata: Dict[str, str]) -> Dict[str, dict]:
    """diffusers' `lora_adapter_metadata`: {model prefix: {"lora_alpha", "alpha_pattern", "use_rslora"}}."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    out: Dict[str, dict] = {}
    if isinstance(flat, dict):
        for key, value in flat.items():
            prefix, _, name = str(key).partition(".")
            out.setdefault(prefix, {})[name] = value
    return out


def _peft_alpha(layer: str, settings: dict) -> Optional[float]:
    """The alpha PEFT would use for `layer` (its alpha_pattern entry, else lora_alpha)."""
    for pattern, alpha in (settings.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return float(alpha)
    alpha = settings.get("lora_alpha")
    return float(alpha) if isinstance(alpha, (int, float)) else None


def _apply_peft_metadata(layers: Dict[str, LayerWeights], metadata: Dict[str, str]) -> None:
    for prefix, settings in _peft_settings(metadata).items():
        for name, layer in layers.items():
            if layer.alpha is None and name.startswith(prefix + "."):
                layer.alpha = _peft_alpha(name[len(prefix) + 1:], settings)
                layer.rs_lora = bool(settings.get("use_rslora"))


def read_lora_file(path) -> LoraFile:
    """Read and group a LoRA `.safetensors` (lazily: tensors are read when used). Raises WeightsError
    for unreadable or truncated files, DoRA, unsupported layer kinds and incomplete layers."""
    from ..weights import load_safetensors, read_safetensors_header

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path}: LoRAs are read from .safetensors files only (pickled .pt/.ckpt/.bin files "
                           "can run code when opened); convert it to .safetensors first")
    header = read_safetensors_header(path)
    tensors = load_safetensors(path)
    slots, kinds, unknown = _group(path, tensors)
    if unknown and not slots:
        shown = ", ".join(unknown[:5])
        raise WeightsError(f"{path} is not a LoRA file: none of its {len(unknown)} tensors is a LoRA, LoHa or "
                           f"LoKr weight (e.g. {shown}). Is it a model checkpoint?")
    # an alpha with no weights beside it is left out (some trainers write one for every layer)
    layers = {name: _layer(path, name, kinds[name], s) for name, s in slots.items() if kinds.get(name)}
    metadata = dict(header.get("__metadata__") or {})
    _apply_peft_metadata(layers, metadata)
    return LoraFile(path, layers, metadata, unknown)
