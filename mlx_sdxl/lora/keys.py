"""Which layer of which model a LoRA file's layer name means.

A pipeline model's adaptable layers (every Linear and Conv2d of its UNet and text encoders)
are listed from its configs, without loading weights, as `Target`s: model part, MLX module
path (diffusers' names for the UNet, transformers' without `text_model.` for CLIP), and the
weight shape in PyTorch layout. File names are matched against them:

    lora_unet_<diffusers path, dots as underscores>          down_blocks_1_attentions_0_proj_in
    lora_unet_<SGM path, dots as underscores>                input_blocks_4_1_proj_in, via
                                                             single_file.unet_key (the checkpoint rules)
    lora_te1_ / lora_te2_<transformers path, underscores>    text_model_encoder_layers_0_self_attn_q_proj
    unet. / text_encoder. / text_encoder_2.<dotted path>     diffusers / PEFT / older diffusers
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import mlx.nn as nn

from ..errors import WeightsError
from .formats import LayerWeights, LoraFile

ADAPTED_PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.",
               "add_embedding.")
# the words of SGM UNet module names (anything else in a name is a number)
_SGM_WORDS = frozenset({"input_blocks", "middle_block", "output_blocks", "transformer_blocks", "attn1", "attn2",
                        "to_q", "to_k", "to_v", "to_out", "ff", "net", "proj", "proj_in", "proj_out", "norm",
                        "norm1", "norm2", "norm3", "in_layers", "out_layers", "emb_layers", "skip_connection",
                        "op", "conv", "time_embed", "label_emb", "out"})
# older diffusers text-encoder names (attention processors) -> transformers' names
_CLIP_OLD = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "out_proj", "to_out": "out_proj"}


@dataclass(frozen=True)
class Target:
    """One adaptable layer: model part, MLX module path, conv or not, weight shape in PyTorch layout."""

    part: str
    path: str
    conv: bool
    shape: Tuple[int, ...]


def _skeleton(part: str, config: dict):
    """The model built from its config only (MLX never evaluates the random init: nothing is allocated)."""
    if part == "unet":
        from ..models.unet import UNet2DConditionModel, UNetConfig

        return UNet2DConditionModel(UNetConfig.from_dict(config))
    from ..models.clip import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig.from_dict(config))


@lru_cache(maxsize=8)
def _targets(part: str, config_json: str) -> Dict[str, Target]:
    out = {}
    for path, module in _skeleton(part, json.loads(config_json)).named_modules():
        if isinstance(module, nn.Linear):
            out[path] = Target(part, path, False, tuple(module.weight.shape))
        elif isinstance(module, nn.Conv2d):
            o, kh, kw, i = module.weight.shape
            out[path] = Target(part, path, True, (o, i, kh, kw))
    return out


def part_targets(part: str, config: dict) -> Dict[str, Target]:
    """Every Linear and Conv2d of a model part, by MLX module path."""
    return _targets(part, json.dumps(config, sort_keys=True, default=str))


def dotted(name: str, words) -> Optional[str]:
    """`a_b_0_c_d` → `a_b.0.c_d`, reading the longest words of `words` first; None if a piece is neither
    a word nor a number."""
    tokens, out, i = name.split("_"), [], 0
    longest = max((w.count("_") + 1 for w in words), default=1)
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 0, -1):
            piece = "_".join(tokens[i:i + n])
            if piece in words or (n == 1 and piece.isdigit()):
                out.append(piece)
                i += n
                break
        else:
            return None
    return ".".join(out)


def _layers_per_block(config: dict) -> int:
    lpb = config.get("layers_per_block", 2)
    return int(lpb[0] if isinstance(lpb, (list, tuple)) else lpb)


@dataclass
class RoleLayers:
    """The adaptable layers of one pipeline model (base or refiner), and the names that reach them."""

    configs: Dict[str, dict]
    targets: Dict[str, Dict[str, Target]] = field(default_factory=dict)
    underscored: Dict[str, Dict[str, str]] = field(default_factory=dict)

    def __post_init__(self):
        for part in ADAPTED_PARTS:
            if part in self.configs:
                self.targets[part] = part_targets(part, self.configs[part])
                names = {p.replace(".", "_"): p for p in self.targets[part]}  # also transformers >= 5.6's names
                names.update({self._file_path(part, p).replace(".", "_"): p for p in self.targets[part]})
                self.underscored[part] = names

    @staticmethod
    def _file_path(part: str, path: str) -> str:
        """The path as files spell it: CLIP layers under `text_model.` (but text_projection)."""
        if part == "unet" or path.startswith("text_projection"):
            return path
        return "text_model." + path

    def _sgm(self, name: str) -> Optional[str]:
        from ..single_file import unet_key

        sgm = dotted(name, _SGM_WORDS)
        if sgm is None:
            return None
        key = unet_key(sgm + ".weight", _layers_per_block(self.configs["unet"]))
        return key[: -len(".weight")] if key else None

    def _dotted_path(self, part: str, rest: str) -> Optional[str]:
        if part != "unet":
            rest = rest[len("text_model."):] if rest.startswith("text_model.") else rest
            head, _, last = rest.rpartition(".")
            if rest.endswith("to_out.0"):
                head, last = rest[: -len(".to_out.0")], "to_out.0"
            if last in _CLIP_OLD:
                rest = f"{head}.{_CLIP_OLD[last]}"
        return rest if rest in self.targets.get(part, {}) else None

    def find(self, name: str) -> Optional[Target]:
        """The layer a file's layer name means, or None."""
        for prefix, part in KOHYA_PREFIXES.items():
            if name.startswith(prefix) and part in self.targets:
                rest = name[len(prefix):]
                path = self.underscored[part].get(rest) or (self._sgm(rest) if part == "unet" else None)
                return self.targets[part].get(path) if path else None
        for prefix, part in DOTTED_PREFIXES.items():
            if name.startswith(prefix) and part in self.targets:
                path = self._dotted_path(part, name[len(prefix):])
                return self.targets[part][path] if path else None
        if name.startswith(_UNET_ROOTS) and "unet" in self.targets:  # the oldest attention-processor files
            return self.targets["unet"].get(name)
        return None


@dataclass
class Matched:
    """A file's layers placed on one model: {part: {path: (layer, target)}}, and what did not fit."""

    parts: Dict[str, Dict[str, Tuple[LayerWeights, Target]]]
    unmatched: List[str]
    mismatched: List[str]

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.parts.values())


def match_layers(lora: LoraFile, layers: RoleLayers) -> Matched:
    """Place every layer of `lora` on `layers`; two file layers on one model layer are refused."""
    from .deltas import delta_shape, fits

    parts: Dict[str, Dict[str, Tuple[LayerWeights, Target]]] = {}
    unmatched, mismatched = [], []
    for name, layer in lora.layers.items():
        target = layers.find(name)
        if target is None:
            unmatched.append(name)
            continue
        shape = delta_shape(layer)
        if not fits(shape, target):
            mismatched.append(f"{name}: file {shape} vs model {target.shape}")
            continue
        placed = parts.setdefault(target.part, {})
        if target.path in placed:
            raise WeightsError(f"{lora.path}: layers {placed[target.path][0].name} and {name} both adapt "
                               f"{target.part}.{target.path}; a file may adapt each layer once")
        placed[target.path] = (layer, target)
    return Matched(parts, unmatched + list(lora.unknown), mismatched)
