"""The models a pipeline has loaded: each part once, shared between base and refiner
when their weights are identical, quantized as asked, released on request, with the
LoRAs the pipeline holds applied.

LoRAs belong to a loaded model, not to one call: `add_lora` / `set_lora_scale` /
`remove_lora` change the models already loaded at once (fused into dense weights, side
paths on quantized layers: see mlx_sdxl.lora.apply), and a model loaded later gets them
as it loads. A model part with LoRAs is keyed apart from the plain one,
(part, "<fingerprint>@<role>"), so a LoRA on the base's text_encoder_2 never reaches a
refiner that shares that text encoder: the refiner keeps (or reloads) the plain one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from ..lora.apply import Signature, apply_adapters
from ..lora.keys import ADAPTED_PARTS
from ..lora.registry import LoadedLora, LoraRegistry
from ..sources import ModelSource
from ..spec import DEFAULT_GROUP_SIZE, REFINER, TEXT_ENCODERS


@dataclass(frozen=True)
class Quantization:
    """Bit widths to quantize parts to as they load (None: keep dense)."""

    base_bits: Optional[int] = None
    refiner_bits: Optional[int] = None
    text_encoder_bits: Optional[int] = None
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        from ..quantize import check_settings

        for bits in filter(None, (self.base_bits, self.refiner_bits, self.text_encoder_bits)):
            check_settings(bits, self.group_size)

    def bits_for(self, role: str, part: str) -> Optional[int]:
        if part == "unet":
            return self.refiner_bits if role == REFINER else self.base_bits
        if part in TEXT_ENCODERS:
            return self.text_encoder_bits
        return None


Key = Tuple[str, str]


def _key(source: ModelSource, part: str) -> Key:
    """The key of the part as loaded (shared by every model whose weights are identical)."""
    return part, source.fingerprints.get(part) or f"{source.description}:{part}"


def _own_key(source: ModelSource, part: str) -> Key:
    """The key of the part with this model's LoRAs applied (never shared with the other model)."""
    part, fingerprint = _key(source, part)
    return part, f"{fingerprint}@{source.role}"


class ModelCache:
    """Loaded model parts keyed by (part, weights fingerprint).

    `load_seconds` maps "load_<role>_<part>" to the time each load took; `forward(unet)`
    is the UNet as sampler steps call it (compiled once per loaded model with compile=True).
    `loras` holds the pipeline's LoRAs (see the module docstring).
    """

    def __init__(self, dtype, quantization: Quantization = Quantization(), compile: bool = False):
        self.dtype = dtype
        self.quantization = quantization
        self.compile = compile
        self.load_seconds: Dict[str, float] = {}
        self.loras = LoraRegistry()
        self._models: Dict[Key, object] = {}
        self._applied: Dict[Key, Dict[str, Signature]] = {}  # the adapters each model holds, per layer
        self._users: Dict[Key, Set[str]] = {}  # the roles that asked for each model
        self._compiled: Dict[int, Tuple[object, Callable]] = {}  # id(UNet) -> (UNet, compiled forward)
        self._lock = threading.RLock()

    def key(self, source: ModelSource, part: str) -> Key:
        """The key `source`'s part is (or would be) loaded under."""
        return _own_key(source, part) if self.loras.actives(source.role, part) else _key(source, part)

    def get(self, source: ModelSource, part: str, timings: Optional[dict] = None):
        """The loaded part, loading (and quantizing) it first if needed; a load's seconds go to `timings`."""
        with self._lock:
            key = self.key(source, part)
            if key not in self._models:
                t0 = time.perf_counter()
                model = source.load(part, self.dtype)
                bits = self.quantization.bits_for(source.role, part)
                if bits and part not in source.quantization:  # converted folders may come pre-quantized
                    from ..quantize import quantize_model

                    model = quantize_model(model, bits=bits, group_size=self.quantization.group_size)
                self._models[key] = model
                self._adapt(source, part, key)
                name = f"load_{source.role}_{part}"
                self.load_seconds[name] = time.perf_counter() - t0
                if timings is not None:
                    timings[name] = self.load_seconds[name]
            self._users.setdefault(key, set()).add(source.role)
            return self._models[key]

    def release(self, source: ModelSource, part: str) -> None:
        """Drop a part (and its compiled forward) and return its memory."""
        with self._lock:
            self._drop(self.key(source, part))
        mx.clear_cache()

    def _drop(self, key: Key) -> None:
        model = self._models.pop(key, None)
        self._compiled.pop(id(model), None)
        self._applied.pop(key, None)
        self._users.pop(key, None)
        del model  # its weights are freed here, before the cache is emptied

    def loaded(self) -> List[Tuple[str, str]]:
        """(part, fingerprint) of every loaded model."""
        with self._lock:
            return list(self._models)

    def resident_bytes(self) -> int:
        """Bytes of the weights of every loaded model (each shared model once)."""
        with self._lock:
            return sum(v.nbytes for m in self._models.values() for _, v in tree_flatten(m.parameters()))

    def items(self) -> List[Tuple[Tuple[str, str], object]]:
        """((part, fingerprint), model) of every loaded model."""
        with self._lock:
            return list(self._models.items())

    def forward(self, unet) -> Callable:
        """The UNet as each step calls it: compiled or not, per `compile`."""
        if not self.compile:
            return unet
        with self._lock:
            model, forward = self._compiled.get(id(unet), (None, None))
            if model is not unet:
                forward = unet.compiled()
                self._compiled[id(unet)] = (unet, forward)
            return forward

    # ------------------------------------------------------------------ LoRAs
    def add_lora(self, lora: LoadedLora, source: ModelSource) -> None:
        """Hold `lora` (placed on `source`, its model) and apply it to that model's loaded parts."""
        with self._lock:
            self.loras.add(lora)
            self.refresh(source)

    def set_lora_scale(self, name: str, scale: float, source: ModelSource) -> None:
        with self._lock:
            self.loras.get(name).scale = scale
            self.refresh(source)

    def remove_lora(self, name: Optional[str], sources) -> List[LoadedLora]:
        """Take one LoRA (None: all) off; the layers they changed get their weights as loaded back."""
        with self._lock:
            removed = self.loras.remove(name)
            for source in sources:
                if source is not None:
                    self.refresh(source)
            return removed

    def refresh(self, source: ModelSource) -> None:
        """Bring each loaded part of `source` to the LoRAs held now for its role."""
        with self._lock:
            for part in ADAPTED_PARTS:
                if part in source.loaders:
                    self._refresh(source, part)

    def _refresh(self, source: ModelSource, part: str) -> None:
        shared, own = _key(source, part), _own_key(source, part)
        if self.loras.actives(source.role, part):
            if own not in self._models and shared in self._models \
                    and self._users.get(shared, set()) <= {source.role}:
                self._move(shared, own)  # nobody else uses it: adapt it in place
            if own in self._models:
                self._adapt(source, part, own)
        elif own in self._models:
            self._adapt(source, part, own)  # every layer back to its weights as loaded
            if shared in self._models:
                self._drop(own)  # the plain one is loaded already (the other model uses it)
            else:
                self._move(own, shared)

    def _move(self, old: Key, new: Key) -> None:
        self._models[new] = self._models.pop(old)
        self._applied[new] = self._applied.pop(old, {})
        self._users[new] = self._users.pop(old, set())

    def _adapt(self, source: ModelSource, part: str, key: Key) -> None:
        """Apply the LoRAs held for `source`'s part to the model under `key`."""
        model = self._models[key]
        actives = self.loras.actives(source.role, part)
        applied = self._applied.get(key, {})
        if not actives and not applied:
            return
        self._applied[key] = apply_adapters(model, actives, applied, self._originals(source, part))
        self._compiled.pop(id(model), None)  # a compiled forward holds side paths as constants

    def _originals(self, source: ModelSource, part: str):
        """Layers' weights as loaded, from the model's source: a fresh lazy load, of which only the
        asked-for tensors are kept (unevaluated: they are read as the adapters are applied, a batch
        of layers at a time)."""
        def read(paths: List[str]) -> Dict[str, mx.array]:
            fresh = dict(tree_flatten(source.load(part, self.dtype).parameters()))
            return {p: fresh[p + ".weight"] for p in paths}

        return read
