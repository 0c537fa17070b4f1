"""Pixels in and out: input images → float arrays, VAE encode/decode, arrays → PNG-ready PIL images."""

from __future__ import annotations

from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..errors import InputError
from ..spec import MIN_SIDE


def _pil_arrays(images, factor: int) -> np.ndarray:
    from PIL import Image

    arrays = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size[0] - im.size[0] % factor, im.size[1] - im.size[1] % factor
        if (w, h) != im.size:
            im = im.resize((w, h), Image.LANCZOS)
        arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    if len({a.shape for a in arrays}) > 1:
        raise InputError("all images must have the same size")
    return np.stack(arrays)


def image_batch(image, factor: int) -> np.ndarray:
    """PIL image(s) or an NHWC / HWC array in [0, 1] → float32 NHWC. PIL images are cropped
    down to a multiple of `factor` by resizing; arrays must already be multiples."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
        pixels = _pil_arrays(image, factor)
    else:
        try:
            pixels = np.asarray(image, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError(f"image must be a PIL image or an NHWC array in [0, 1], got "
                             f"{type(image).__name__}") from None
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise InputError(f"image array must be (H, W, 3) or (B, H, W, 3), got {pixels.shape}")
        if pixels.shape[1] % factor or pixels.shape[2] % factor:
            raise InputError(f"image height and width must be multiples of {factor}, got {pixels.shape[1:3]}")
    if pixels.shape[1] < MIN_SIDE or pixels.shape[2] < MIN_SIDE:
        raise InputError(f"image must be at least {MIN_SIDE}x{MIN_SIDE}, got {pixels.shape[2]}x{pixels.shape[1]}")
    return pixels


def encode_images(vae, pixels: np.ndarray, scaling_factor: float, keys: Optional[Sequence[mx.array]],
                  batch: int) -> mx.array:
    """VAE-encode `pixels` (one image for all, or one per image) to `batch` scaled latents:
    image i sampled from the posterior with keys[i], or the posterior mean when keys is None."""
    posterior = vae.encode(mx.array(pixels * 2 - 1))
    rows = [i if pixels.shape[0] == batch else 0 for i in range(batch)]
    if keys is None:
        latents = posterior.mode()
        latents = latents if pixels.shape[0] == batch else mx.repeat(latents, batch, axis=0)
    else:
        one = (1, *posterior.mean.shape[1:])
        latents = mx.concatenate([
            posterior.mean[r:r + 1] + posterior.std[r:r + 1] * mx.random.normal(one, dtype=posterior.mean.dtype, key=k)
            for r, k in zip(rows, keys)])
    return latents.astype(mx.float32) * scaling_factor


def decode_latents(vae, latents: mx.array, scaling_factor: float, tiled: Optional[bool] = None) -> np.ndarray:
    """Latents (scheduler space) → NHWC float32 images in [0, 1]; `tiled` None follows the VAE's setting."""
    image = vae.decode(latents / scaling_factor, tiled=tiled)
    return np.array(mx.clip(image.astype(mx.float32) / 2 + 0.5, 0, 1))


def to_pil(images: np.ndarray, settings: List[dict]) -> list:
    """NHWC [0, 1] arrays → PIL images, each carrying its settings as PNG metadata."""
    from PIL import Image

    from ..metadata import attach_metadata

    return [attach_metadata(Image.fromarray((img * 255).round().astype(np.uint8)), s)
            for img, s in zip(images, settings)]
