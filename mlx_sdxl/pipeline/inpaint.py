"""Inpainting: the mask (white = repaint), the region around it, and how the known part is kept.

- A 9-channel UNet (the SDXL inpainting model) reads the mask and the masked image's
  latents as extra input channels.
- A 4-channel UNet repaints by blending: after every step the known region is put back
  from the image's latents, noised to the next step (clean after the stage's last step).
- `padding_mask_crop` repaints only a box around the mask (grown by that many pixels, to
  the output's aspect ratio) at the full output size, then pastes it back; `mask_blur`
  softens the mask's edge, and the result is composited over the original with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from ..errors import InputError
from ..schedulers import Scheduler
from .resize import resize_band

Box = Tuple[int, int, int, int]  # (left, top, right, bottom) in pixels


def grey(mask):
    """A mask as a PIL "L" image (PIL images of any mode, or arrays in [0, 1])."""
    from PIL import Image, ImageOps

    if isinstance(mask, Image.Image):
        return ImageOps.exif_transpose(mask).convert("L")
    try:
        values = np.asarray(mask, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"mask_image must be a PIL image or an (H, W) array in [0, 1], got "
                         f"{type(mask).__name__}") from None
    if values.ndim == 3:
        values = values.mean(axis=-1)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise InputError(f"mask_image array must be (H, W) or (H, W, C) with finite values, got {values.shape}")
    return Image.fromarray((np.clip(values, 0, 1) * 255).round().astype(np.uint8), "L")


def binary_mask(mask_l, size: Tuple[int, int], mode: str, blur: float) -> np.ndarray:
    """(H, W) float32 of 0/1 at `size` = (width, height): resized, blurred, cut at one half."""
    from PIL import ImageFilter

    band = resize_band(mask_l, size, mode)
    if blur > 0:
        band = band.filter(ImageFilter.GaussianBlur(blur))
    values = np.asarray(band, np.float32) / 255.0
    if not (values >= 0.5).any():
        raise InputError("the mask is all black: there is nothing to repaint (white marks what is repainted)")
    return (values >= 0.5).astype(np.float32)


def crop_box(mask_l, width: int, height: int, pad: int) -> Box:
    """The box around the mask's non-black pixels, grown by `pad` and then to the aspect ratio
    width:height within the image (diffusers' get_crop_region)."""
    m = np.asarray(mask_l)
    h, w = m.shape
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if cols.size == 0:
        raise InputError("the mask is all black: there is nothing to repaint (white marks what is repainted)")
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, diff: int, limit: int) -> Tuple[int, int]:
    """Grow [a, b) by `diff`, half on each side, shifted back inside [0, limit)."""
    a, b = a - diff // 2, b + diff - diff // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def paste_back(original, generated: np.ndarray, mask_l, box: Optional[Box]) -> np.ndarray:
    """The generated (H, W, 3) image in [0, 1] composited over the original PIL image: inside
    `box` (resized to it) when given; the mask (white = generated) weighs the two."""
    from PIL import Image

    gen = Image.fromarray((generated * 255).round().astype(np.uint8), "RGB")
    width, height = original.size
    canvas = np.zeros((height, width, 3), np.float32)
    if box is None:
        canvas[:] = np.asarray(gen.resize((width, height), Image.LANCZOS) if gen.size != original.size else gen)
    else:
        x1, y1, x2, y2 = box
        bands = [resize_band(b, (x2 - x1, y2 - y1), "crop") for b in gen.split()]
        canvas[y1:y2, x1:x2] = np.stack([np.asarray(b) for b in bands], -1)
    alpha = np.asarray(mask_l.resize((width, height)) if mask_l.size != original.size else mask_l,
                       np.float32)[..., None] / 255.0
    orig = np.asarray(original.convert("RGB"), np.float32)
    return np.clip((canvas * alpha + orig * (1 - alpha)).round(), 0, 255) / 255.0


@dataclass(frozen=True)
class KnownRegion:
    """After-step hook of a 4-channel inpainting stage: keep the unmasked latents."""

    image_latents: mx.array
    noise: mx.array
    mask: mx.array             # (B, h, w, 1), 1 = repaint
    scheduler: Scheduler
    last: int                  # the stage's last step index

    def __call__(self, x: mx.array, i: int) -> mx.array:
        known = self.image_latents if i >= self.last else self.scheduler.add_noise(self.image_latents, self.noise,
                                                                                  i + 1)
        return (1 - self.mask) * known + self.mask * x


def latent_mask(mask: np.ndarray, factor: int, batch: int) -> mx.array:
    """The pixel mask (H, W) at latent size (nearest: every factor-th pixel), (batch, h, w, 1)."""
    small = mask[::factor, ::factor][None, :, :, None]
    return mx.array(np.repeat(small, batch, axis=0))


def masked_pixels(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the repainted region set to mid grey (0 in the VAE's [-1, 1])."""
    keep = (mask < 0.5)[None, :, :, None]
    return np.where(keep, pixels, 0.5).astype(np.float32)
