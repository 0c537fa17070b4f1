"""The models a pipeline has loaded: each part once, shared between base and refiner
when their weights are identical, quantized as asked, released on request."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

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


def _key(source: ModelSource, part: str) -> Tuple[str, str]:
    return part, source.fingerprints.get(part) or f"{source.description}:{part}"


class ModelCache:
    """Loaded model parts keyed by (part, weights fingerprint).

    `load_seconds` maps "load_<role>_<part>" to the time each load took; `forward(unet)`
    is the UNet as sampler steps call it (compiled once per loaded model with compile=True).
    """

    def __init__(self, dtype, quantization: Quantization = Quantization(), compile: bool = False):
        self.dtype = dtype
        self.quantization = quantization
        self.compile = compile
        self.load_seconds: Dict[str, float] = {}
        self._models: Dict[Tuple[str, str], object] = {}
        self._compiled: Dict[int, Tuple[object, Callable]] = {}  # id(UNet) -> (UNet, compiled forward)
        self._lock = threading.RLock()

    def get(self, source: ModelSource, part: str, timings: Optional[dict] = None):
        """The loaded part, loading (and quantizing) it first if needed; a load's seconds go to `timings`."""
        with self._lock:
            key = _key(source, part)
            if key not in self._models:
                t0 = time.perf_counter()
                model = source.load(part, self.dtype)
                bits = self.quantization.bits_for(source.role, part)
                if bits and part not in source.quantization:  # converted folders may come pre-quantized
                    from ..quantize import quantize_model

                    model = quantize_model(model, bits=bits, group_size=self.quantization.group_size)
                self._models[key] = model
                name = f"load_{source.role}_{part}"
                self.load_seconds[name] = time.perf_counter() - t0
                if timings is not None:
                    timings[name] = self.load_seconds[name]
            return self._models[key]

    def release(self, source: ModelSource, part: str) -> None:
        """Drop a part (and its compiled forward) and return its memory."""
        with self._lock:
            model = self._models.pop(_key(source, part), None)
            self._compiled.pop(id(model), None)
            del model  # its weights are freed here, before the cache is emptied
        mx.clear_cache()

    def loaded(self) -> List[Tuple[str, str]]:
        """(part, fingerprint) of every loaded model."""
        with self._lock:
            return list(self._models)

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
