"""The expected peak memory of a generation, per stage, before anything loads.

Each stage's peak = the weights resident during it + its working memory:

- weights: from the architecture. Every model part is built lazily from its config (MLX never
  evaluates the random initialisation, so nothing is allocated) and its parameters counted at the
  pipeline's dtype, quantized ones at their packed size (`quantize.quantized_nbytes`). Shared
  parts (bigG, the VAE) count once. The default mode keeps every model it used loaded, so each
  stage counts them all; `low_memory=True` holds only the stage's own models.
- working memory: a model of what is alive at each stage's peak, in units of its largest
  activation, with one measured constant per backend (`WORKING_BUFFERS`, see there):
  - text encoding: the encoders' hidden states;
  - a UNet step: the cross-attention keys and values of every transformer layer (made once per
    stage) plus `WORKING_BUFFERS["step"]` activations of the first level (B·h·w·c₀, latents at 1/8
    of the image): the up path's concatenated inputs, GroupNorm and SiLU copies and the two
    segments a paced step keeps in flight (models/pacing.py); on the CPU backend also the im2col
    buffers of MLX's convolutions; a quantized UNet adds the dense copies of the layers in flight;
  - decode: the float32 copy of the decoder's weights when the VAE upcasts, plus, untiled,
    `WORKING_BUFFERS["decode"]` full-resolution activations of its last level (B·H·W·c₀), or,
    tiled (models/vae_tiling.py), the full-resolution feature maps the exact tiling keeps
    between its GroupNorms plus one tile's working set.

Not counted: ControlNets (their own weights and a second down path per step), and the VAE encode
of an input image (img2img, inpainting: about the decode's working memory, before the base);
LoRAs, fused into the weights, add nothing.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from ..memory import device_memory
from ..models.parts import build_part
from ..models.vae import VAEConfig
from ..spec import DECODE, ENCODE, REFINER, TEXT_ENCODERS

GB = 10 ** 9

# Activation-sized buffers alive at each stage's peak, per backend (see the module docstring),
# from full-size measurements with random weights (bench/measured/*-2026-11-27):
# - "step", in first-level activations: 94 on this project's 2-core Linux VM (fp32, 256² and 512²,
#   base and refiner: 93–95; the im2col buffers of MLX-CPU's convolutions are most of it), 29–31 on
#   an H100 in low-memory mode and 47 in the default mode (fp16, 1024²): 40 there;
# - "decode" (whole image), per image pixel, in channels of the last level (c₀): 75 on the VM, 44 on
#   the H100, where the mid block's attention also holds its (H·W/64)² scores;
# - exact tiles: 2·c₀ per image pixel for the full-resolution maps kept between GroupNorms, 4.4·c₀
#   per pixel of a tile row for the halos, and "tile" · c₀ per pixel of a tile (two in flight):
#   70 on the VM, 9.5 on the H100. These fit every VM and H100 decode measured within 2%.
WORKING_BUFFERS = {
    "cpu": {"text": 16.0, "step": 94.0, "decode": 75.0, "tile": 70.0},
    "gpu": {"text": 16.0, "step": 40.0, "decode": 44.0, "tile": 9.5},
}
KEPT_MAPS, HALO_ROWS = 2.0, 4.4


@dataclass(frozen=True)
class Mode:
    """The settings that decide the memory a generation needs."""

    low_memory: bool = False
    base_bits: Optional[int] = None
    refiner_bits: Optional[int] = None
    text_encoder_bits: Optional[int] = None

    def flags(self) -> str:
        """The `mlx-sdxl generate` options that select this mode."""
        out = ["--low-memory"] if self.low_memory else []
        out += [f"--{k.replace('_', '-')} {v}" for k, v in (("base_bits", self.base_bits),
                                                            ("refiner_bits", self.refiner_bits)) if v]
        return " ".join(out) or "(the default mode)"


@dataclass(frozen=True)
class StageMemory:
    stage: str
    weights: int  # bytes of model weights resident during the stage
    working: int  # bytes of activations, caches and temporaries at its peak

    @property
    def peak(self) -> int:
        return self.weights + self.working


@dataclass(frozen=True)
class MemoryEstimate:
    """Expected peak memory per stage of one call, and the machine's memory to compare with."""

    width: int
    height: int
    images: int
    mode: Mode
    stages: Tuple[StageMemory, ...]
    available: int
    available_what: str

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    @property
    def fits(self) -> bool:
        return not self.available or self.peak <= self.available

    def stage(self, name: str) -> StageMemory:
        return next(s for s in self.stages if s.stage == name)

    def table(self) -> str:
        """A plain-text table: one line per stage, then the peak against the machine's memory."""
        rows = [f"{'stage':<9} {'weights':>9} {'working':>9} {'peak':>9}"]
        rows += [f"{s.stage:<9} {s.weights / GB:>6.2f} GB {s.working / GB:>6.2f} GB {s.peak / GB:>6.2f} GB"
                 for s in self.stages]
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(f"expected peak {self.peak / GB:.2f} GB for {self.images} image(s) at {self.width}x{self.height}"
                    f", {self.mode.flags()}: {verdict} in {self.available / GB:.1f} GB of {self.available_what}")
        return "\n".join(rows)


# ----------------------------------------------------------------------------- weights

@lru_cache(maxsize=64)
def _part_bytes(part: str, config_json: str, dtype_name: str, bits: Optional[int], group_size: int) -> int:
    from ..quantize import quantized_nbytes

    model = build_part(part, json.loads(config_json))
    return quantized_nbytes(model, bits, group_size, dtype=getattr(mx, dtype_name))


def part_bytes(pipe, source, part: str, mode: Mode) -> int:
    """Bytes of one model part's weights as the pipeline would hold them in `mode`."""
    stored = source.quantization.get(part) or {}
    q = replace(pipe.quantization, base_bits=mode.base_bits, refiner_bits=mode.refiner_bits,
                text_encoder_bits=mode.text_encoder_bits)
    bits = stored.get("bits") or q.bits_for(source.role, part)
    group = stored.get("group_size") or q.group_size
    dtype_name = str(pipe.dtype).replace("mlx.core.", "")
    with source.reading_config(part):
        return _part_bytes(part, json.dumps(source.configs[part], sort_keys=True, default=str), dtype_name, bits,
                           group)


def _resident(pipe, parts: List[Tuple[object, str]], mode: Mode) -> int:
    """Bytes of `parts` ((source, part) pairs), each shared model once."""
    seen: Dict[tuple, int] = {}
    for source, part in parts:
        seen[pipe.models.key(source, part)] = part_bytes(pipe, source, part, mode)
    return sum(seen.values())


# ----------------------------------------------------------------------------- working memory

def _backend() -> str:
    return "cpu" if mx.default_device().type == mx.cpu else "gpu"


@lru_cache(maxsize=16)
def _unet_shape(config_json: str) -> Tuple[int, int, int]:
    """(Σ of the key widths of every transformer layer's cross-attention, the first level's
    channels, the weight count of the largest layer) of a UNet config."""
    model = build_part("unet", json.loads(config_json))
    kv_width = sum(block.attn2.to_k.weight.shape[0] for block in model.transformer_blocks())
    largest = max(m.weight.size for _, m in model.named_modules() if hasattr(m, "weight") and m.weight.ndim > 1)
    return kv_width, model.config.block_out_channels[0], largest


def step_working(config: dict, rows: int, latent_h: int, latent_w: int, itemsize: int, bits: Optional[int],
                 tokens: int = 77, backend: Optional[str] = None) -> int:
    """Working bytes of one UNet step over `rows` latents (images × 2 with guidance)."""
    kv_width, c0, largest = _unet_shape(json.dumps(config, sort_keys=True, default=str))
    kv = 2 * rows * tokens * kv_width * itemsize  # keys and values, every transformer layer
    act = rows * latent_h * latent_w * c0 * itemsize
    dense_copies = 2 * largest * itemsize if bits else 0  # the dequantized layers of two segments
    return int(kv + WORKING_BUFFERS[backend or _backend()]["step"] * act + dense_copies)


def text_working(configs: List[dict], rows: int, itemsize: int, tokens: int = 77,
                 backend: Optional[str] = None) -> int:
    """Working bytes of the text encoders over `rows` prompts."""
    per = WORKING_BUFFERS[backend or _backend()]["text"]
    return int(sum(per * rows * tokens * c["hidden_size"] * itemsize for c in configs))


def decode_working(config: dict, images: int, height: int, width: int, stored_itemsize: int,
                   tile_size: Optional[int], backend: Optional[str] = None) -> int:
    """Working bytes of the VAE decode: the float32 weight copy when it upcasts, plus the
    activations (untiled, or tiled with `tile_size` pixel tiles)."""
    cfg = VAEConfig.from_dict(config)
    upcast = stored_itemsize == 2 and cfg.force_upcast
    e = 4 if upcast else stored_itemsize
    copy = 4 * _decoder_params(json.dumps(config, sort_keys=True, default=str)) if upcast else 0
    c0 = cfg.block_out_channels[0]
    backend = backend or _backend()
    buffers = WORKING_BUFFERS[backend]
    if tile_size is None or max(height, width) <= tile_size:
        tokens = height * width // cfg.scale_factor ** 2  # the mid block attends over every latent
        scores = tokens ** 2 if backend == "gpu" else 0
        return int(copy + e * images * (buffers["decode"] * c0 * height * width + scores))
    th, tw = min(tile_size, height), min(tile_size, width)
    per_image = KEPT_MAPS * c0 * height * width + HALO_ROWS * c0 * th * width + buffers["tile"] * c0 * th * tw
    return int(copy + e * images * per_image)


@lru_cache(maxsize=8)
def _decoder_params(config_json: str) -> int:
    from mlx.utils import tree_flatten

    vae = build_part("vae", json.loads(config_json))
    parts = [vae.decoder, vae.post_quant_conv]
    return sum(v.size for p in parts for _, v in tree_flatten(p.parameters()))


# ----------------------------------------------------------------------------- the estimate

def _stage_parts(pipe, plan) -> Dict[str, List[tuple]]:
    """stage name → the (source, part) pairs it needs."""
    text = [(st.source, p) for st in plan.stages for p in TEXT_ENCODERS if p in st.source.configs]
    parts = {ENCODE: text}
    parts.update({st.name: [(st.source, "unet")] for st in plan.stages})
    if plan.request.output_type != "latent":
        parts[DECODE] = [(pipe.vae_source, "vae")]
    return parts


def decode_tile_size(pipe, mode: Mode, height: int, width: int) -> Optional[int]:
    """The tile size the pipeline's decode uses (runner.output: tiled in low-memory mode, else as
    the VAE's `tile_size` says), None when it decodes the whole image at once."""
    from ..models.vae_tiling import DEFAULT_TILE_SIZE

    loaded = [m for (part, _), m in pipe.models.items() if part == "vae"]
    chosen = loaded[0].tile_size if loaded else DEFAULT_TILE_SIZE
    tile = chosen or DEFAULT_TILE_SIZE
    if max(height, width) <= tile or (chosen is None and not mode.low_memory):
        return None
    return tile


def estimate(pipe, plan, mode: Mode) -> MemoryEstimate:
    """The expected peak of each stage of `plan` in `mode`."""
    images, lh, lw = (plan.latents if plan.image is None else plan.image.noise).shape[:3]
    f = pipe.vae_scale_factor
    height, width = lh * f, lw * f
    e = pipe.dtype.size
    parts = _stage_parts(pipe, plan)
    everything = [p for group in parts.values() for p in group]
    resident = {name: _resident(pipe, group if mode.low_memory else everything, mode) for name, group in parts.items()}
    text_configs = {pipe.models.key(s, p): s.configs[p] for s, p in parts[ENCODE]}
    guided = any(st.guidance.active for st in plan.stages)
    working = {ENCODE: text_working(list(text_configs.values()), images * (2 if guided else 1), e)}
    for st in plan.stages:
        bits = (mode.refiner_bits if st.name == REFINER else mode.base_bits) or \
            (st.source.quantization.get("unet") or {}).get("bits")
        rows = images * (2 if st.guidance.active else 1)
        working[st.name] = step_working(st.source.configs["unet"], rows, lh, lw, e, bits)
    if DECODE in parts:
        working[DECODE] = decode_working(pipe.vae_source.configs["vae"], images, height, width, e,
                                         decode_tile_size(pipe, mode, height, width))
    stages = tuple(StageMemory(name, resident[name], working[name]) for name in parts)
    total, what = device_memory()
    return MemoryEstimate(width, height, images, mode, stages, total, what)


SUGGESTIONS = (Mode(low_memory=True), Mode(refiner_bits=4), Mode(low_memory=True, refiner_bits=4),
               Mode(low_memory=True, base_bits=4, refiner_bits=4))


def suggest(pipe, plan, current: Mode) -> Optional[MemoryEstimate]:
    """The first of SUGGESTIONS (each at least as frugal as `current`) whose estimate fits, if any."""
    for candidate in SUGGESTIONS:
        mode = Mode(low_memory=candidate.low_memory or current.low_memory,
                    base_bits=candidate.base_bits or current.base_bits,
                    refiner_bits=candidate.refiner_bits or current.refiner_bits,
                    text_encoder_bits=current.text_encoder_bits)
        if mode == current:
            continue
        guess = estimate(pipe, plan, mode)
        if guess.fits:
            return guess
    return None


def warning_text(guess: MemoryEstimate, better: Optional[MemoryEstimate]) -> str:
    """What `generate` says when `guess` does not fit."""
    text = (f"this generation is expected to peak at {guess.peak / GB:.1f} GB, more than the "
            f"{guess.available / GB:.1f} GB of {guess.available_what}: it will swap or fail. ")
    if better is None:
        return text + "No mode fits; use a smaller width/height or fewer images per call."
    return text + f"Try {better.mode.flags()} (expected {better.peak / GB:.1f} GB)."


MODE_KEYS = ("low_memory", "base_bits", "refiner_bits", "text_encoder_bits")


def _plan(pipe, request: dict):
    """The checked Plan of `generate(**request)` (no prompt needed: the text does not change memory)."""
    from ..errors import InputError
    from .plan import Request, make_plan

    try:
        req = Request(request.pop("prompt", ""), **request)
    except TypeError as e:
        raise InputError(f"estimate_memory: {e}; it takes generate()'s keywords and {', '.join(MODE_KEYS)}") from None
    return make_plan(req, pipe.base, pipe.refiner, pipe.vae_scale_factor)


def _mode(pipe, overrides: dict) -> Mode:
    """The pipeline's mode with `overrides` (MODE_KEYS) applied; the bit widths checked."""
    q = pipe.quantization
    mode = replace(Mode(pipe.low_memory, q.base_bits, q.refiner_bits, q.text_encoder_bits), **overrides)
    replace(q, base_bits=mode.base_bits, refiner_bits=mode.refiner_bits,
            text_encoder_bits=mode.text_encoder_bits)  # checks the bit widths
    return mode


def for_request(pipe, **kwargs) -> MemoryEstimate:
    """`SDXLPipeline.estimate_memory`: generate()'s keywords plus mode overrides (MODE_KEYS)."""
    overrides = {k: kwargs.pop(k) for k in MODE_KEYS if k in kwargs}
    return estimate(pipe, _plan(pipe, kwargs), _mode(pipe, overrides))


def suggest_for(pipe, mode: Mode, **request) -> Optional[MemoryEstimate]:
    """`suggest` for the call `generate(**request)`."""
    return suggest(pipe, _plan(pipe, request), mode)


class MemoryWarning(UserWarning):
    """A generation is expected to need more memory than the machine has."""


def check(pipe, plan) -> Optional[MemoryEstimate]:
    """Warn (MemoryWarning, with the mode that fits) when `plan` is expected to need more memory
    than the machine has; returns the estimate."""
    q = pipe.quantization
    mode = Mode(pipe.low_memory, q.base_bits, q.refiner_bits, q.text_encoder_bits)
    guess = estimate(pipe, plan, mode)
    if not guess.fits:
        warnings.warn(warning_text(guess, suggest(pipe, plan, mode)), MemoryWarning, stacklevel=2)
    return guess
