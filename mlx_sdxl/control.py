"""ControlNet control for the sampler, as diffusers' StableDiffusionXLControlNetPipeline does it.

- `Control(name, image, scale, start, end)`: one loaded ControlNet (by name) with its control
  image, its strength and its window of the schedule.
- `prepare_controls(...)`: the control images once per generation: resized to the output size
  (Lanczos, as diffusers' VaeImageProcessor), RGB in [0, 1], NHWC, repeated for the batch and
  doubled for classifier-free guidance (not in guess mode).
- `control_residuals(...)`: per step, the residuals of every ControlNet active at that step,
  summed (diffusers' MultiControlNetModel), or None when none is active.

A ControlNet is active at step i of n unless i/n < start or (i+1)/n > end (diffusers'
`controlnet_keep`). In guess mode with guidance the ControlNets see only the conditional half
of the batch and the unconditional half gets zero residuals.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .errors import InputError

Residuals = Tuple[List[mx.array], mx.array]


@dataclass(frozen=True)
class Control:
    """One ControlNet's control: `name` as `load_controlnet` named it, `image` (a PIL image,
    a path, an (H, W, 3) uint8 array, or an (H, W, 3) float array in [0, 1]) already
    preprocessed (e.g. an edge map: see `canny`), `scale` its conditioning scale, and
    `start`/`end` the fractions of the schedule in which it acts (0 ≤ start < end ≤ 1)."""

    name: str
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"Control name must be the name of a loaded ControlNet, got {self.name!r}")
        for key in ("scale", "start", "end"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InputError(f"Control {key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        if not 0.0 <= self.start < self.end <= 1.0:
            raise InputError(f"Control start={self.start:g}, end={self.end:g}: accepted 0 <= start < end <= 1 "
                             "(fractions of the schedule)")

    def active(self, step_index: int, num_steps: int) -> bool:
        """Whether the ControlNet runs at step `step_index` of `num_steps` (diffusers' controlnet_keep)."""
        return not (step_index / num_steps < self.start or (step_index + 1) / num_steps > self.end)


@dataclass
class PreparedControl:
    """A Control with its image ready for the ControlNet: (n, H, W, 3) in [0, 1], n the batch
    the ControlNet runs on. Holds the ControlNet's cross-attention keys and values once made."""

    control: Control
    image: mx.array
    _kv_for: Optional[mx.array] = field(default=None, repr=False)
    _kv: Optional[list] = field(default=None, repr=False)

    def cross_kv(self, net, embeds: mx.array, context: mx.array) -> list:
        """`net.cross_attention_kv(context)`, made once for as long as the sampler passes the same `embeds`."""
        if self._kv_for is not embeds:
            self._kv, self._kv_for = net.cross_attention_kv(context), embeds
        return self._kv


# -- control images -----------------------------------------------------------------------------

def _open(path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
        return image
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"cannot read the control image {path}: {e}") from None


def _nearest(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="nearest") of an (H, W, C) array: source index floor(i · in/out)."""
    def index(n_in: int, n_out: int) -> np.ndarray:
        if n_in == n_out:
            return np.arange(n_out)
        scale = np.float32(n_in / n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    return pixels[index(pixels.shape[0], height)][:, index(pixels.shape[1], width)]


def _float_pixels(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """A float (H, W, 3) array in [0, 1], resized as diffusers resizes arrays (nearest)."""
    pixels = array.astype(np.float32)
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
        raise InputError("a float control image must hold values in [0, 1] (or give uint8 / a PIL image)")
    return _nearest(pixels, height, width)


def control_image(image, width: int, height: int) -> np.ndarray:
    """The control image as diffusers' SDXL ControlNet pipeline prepares it: PIL images (and
    paths, uint8 arrays) resized to width × height with Lanczos, then made RGB; float arrays
    in [0, 1] resized nearest. → (height, width, 3) float32 in [0, 1]."""
    from PIL import Image

    if isinstance(image, mx.array):
        image = np.array(image)
    if isinstance(image, (str, os.PathLike)):
        image = _open(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
            image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) == 0:
            raise InputError(f"a control image array must be (H, W, 3), got shape {image.shape}")
        if image.dtype != np.uint8:
            return _float_pixels(image, width, height)
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"a control image must be a PIL image, a path or an (H, W, 3) array, got "
                         f"{type(image).__name__}")
    image = image.resize((width, height), resample=Image.LANCZOS).convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def effective_guess_mode(controls: Sequence[Control], controlnets: Mapping, guess_mode: bool) -> bool:
    """diffusers: guess_mode or the (first) ControlNet's global_pool_conditions."""
    return bool(guess_mode) or bool(controls and controlnets[controls[0].name].config.global_pool_conditions)


def _check_controls(controls, controlnets: Mapping) -> List[Control]:
    controls = [controls] if isinstance(controls, Control) else list(controls)
    if not all(isinstance(c, Control) for c in controls):
        raise InputError("control must be a Control or a list of them: mlx_sdxl.Control(name, image, scale, "
                         "start, end)")
    unknown = sorted({c.name for c in controls if c.name not in controlnets})
    if unknown:
        raise InputError(f"no ControlNet loaded as {', '.join(map(repr, unknown))}; loaded: "
                         f"{', '.join(map(repr, controlnets)) or 'none'} (load one with pipe.load_controlnet)")
    for c in controls:
        channels = controlnets[c.name].config.conditioning_channels
        if channels != 3:
            raise InputError(f"ControlNet {c.name!r} takes {channels}-channel control images; only RGB (3) "
                             "control images are supported")
    return controls


def prepare_controls(controls, controlnets: Mapping, width: int, height: int, batch: int, guided: bool,
                     guess_mode: bool = False) -> List[PreparedControl]:
    """Check `controls` (a Control or a list) against the loaded `controlnets` (name → ControlNetModel)
    and prepare their images for `batch` images of width × height: (batch, H, W, 3), or
    (2·batch, …) when `guided` and not in guess mode. Cheap; run it before any heavy work."""
    controls = _check_controls(controls, controlnets)
    guess = effective_guess_mode(controls, controlnets, guess_mode)
    rows = 2 * batch if guided and not guess else batch
    prepared = []
    for c in controls:
        pixels = mx.array(control_image(c.image, width, height)).astype(controlnets[c.name].dtype)
        prepared.append(PreparedControl(c, mx.broadcast_to(pixels[None], (rows, *pixels.shape))))
    return prepared


# -- per step -----------------------------------------------------------------------------------

def _conditional_half(xin, t, embeds, pooled, time_ids):
    """The conditional half of a guided batch ([unconditional, conditional], as diffusers orders it)."""
    half = xin.shape[0] // 2
    if isinstance(t, mx.array) and t.ndim == 1 and t.shape[0] == xin.shape[0]:
        t = t[half:]
    return xin[half:], t, embeds[half:], pooled[half:], time_ids[half:]


def _sum(total: Optional[Residuals], part: Residuals) -> Residuals:
    if total is None:
        return part
    return [a + b for a, b in zip(total[0], part[0])], total[1] + part[1]


def control_residuals(controls_prepared: Sequence[PreparedControl], controlnets: Mapping, xin: mx.array, t,
                      embeds: mx.array, pooled: mx.array, time_ids: mx.array, step_index: int, num_steps: int,
                      guided: bool, guess_mode: bool = False,
                      forwards: Optional[Mapping[str, Callable]] = None) -> Optional[Residuals]:
    """(down residuals, mid residual) for the UNet call of this step, summed over every ControlNet
    active at `step_index` of `num_steps`, each at its Control's scale; None when none is
    active (the UNet call is then the plain one).

    `xin`, `t`, `embeds`, `pooled`, `time_ids` are exactly the UNet's inputs of this step (the
    batch doubled when `guided`). `num_steps` is diffusers' len(timesteps): the steps of the
    run's schedule (after img2img's strength cut, before the refiner hand-off). `forwards`,
    optional: name → how each step calls that ControlNet (e.g. its `compiled()`)."""
    active = [p for p in controls_prepared if p.control.active(step_index, num_steps)]
    if not active:
        return None
    guess = effective_guess_mode([p.control for p in controls_prepared], controlnets, guess_mode)
    split = guided and guess
    inputs = (xin, t, embeds, pooled, time_ids)
    x, tt, context, text_embeds, ids = _conditional_half(*inputs) if split else inputs
    total = None
    for p in active:
        net = controlnets[p.control.name]
        forward = (forwards or {}).get(p.control.name, net)
        total = _sum(total, forward(x, tt, context, p.image, p.control.scale, text_embeds=text_embeds,
                                    time_ids=ids, guess_mode=guess, cross_kv=p.cross_kv(net, embeds, context)))
    down, mid = total
    if split:  # the unconditional half is left as it is
        down = [mx.concatenate([mx.zeros_like(r), r]) for r in down]
        mid = mx.concatenate([mx.zeros_like(mid), mid])
    return down, mid


# -- preprocessors ------------------------------------------------------------------------------

def _cv2():
    try:
        import cv2
    except ImportError:
        raise InputError("the canny preprocessor needs OpenCV, which is not installed: "
                         "pip install 'mlx-sdxl[canny]' (or pip install opencv-python-headless); "
                         "any ready-made control image works without it") from None
    return cv2


def canny(image, low_threshold: int = 100, high_threshold: int = 200):
    """The Canny edge map of `image` (PIL image, path or uint8 array) as an RGB PIL image, white
    edges on black: cv2.Canny(rgb, 100, 200) as diffusers' SDXL ControlNet examples make it."""
    from PIL import Image

    cv2 = _cv2()
    if isinstance(image, (str, os.PathLike)):
        image = _open(image)
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InputError(f"canny takes a PIL image, a path or an (H, W, 3) uint8 array; got {rgb.dtype} "
                         f"{rgb.shape}")
    edges = cv2.Canny(rgb, low_threshold, high_threshold)
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))


PREPROCESSORS = {"canny": canny}


def preprocess(name: str, image):
    """Run the preprocessor `name` (one of PREPROCESSORS) on `image`."""
    if name not in PREPROCESSORS:
        raise InputError(f"unknown control preprocessor {name!r}; accepted: {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[name](image)
