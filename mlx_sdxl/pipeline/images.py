"""Pixels in and out: input images → float arrays, VAE encode/decode, arrays → PNG-ready PIL images."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..errors import InputError
from ..spec import ALPHA_BACKGROUND, MIN_SIDE, check_image_count, check_pixels
from .health import nonfinite, nonfinite_error
from .resize import resize_pixels


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


def rgb_pixels(im, background=ALPHA_BACKGROUND) -> np.ndarray:
    """Any PIL image → (H, W, 3) float32 in [0, 1], at its own bit depth's scale.

    16-bit grey (I;16*) and 32-bit integer (I, read as 16-bit values) images are divided
    by 65535; float (F) images are read as [0, 1] when no value exceeds 1, else as [0, 255];
    palettes, CMYK and the rest go through Pillow's RGB conversion. Transparent pixels
    are composited over `background` (RGB, 0-255). EXIF orientation is applied.
    """
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        grey = np.asarray(im, dtype=np.float32)
        if im.mode == "F":
            grey = grey if np.nanmax(grey, initial=0) <= 1 else grey / 255.0
        else:
            grey = grey / 65535.0
        return np.repeat(np.clip(np.nan_to_num(grey), 0, 1)[..., None], 3, axis=-1)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _WITH_ALPHA:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:]
        return rgba[..., :3] * alpha + np.asarray(background, np.float32) / 255.0 * (1 - alpha)
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _pil_arrays(images, factor: int, size: Optional[Tuple[int, int]], mode: str) -> np.ndarray:
    from PIL import ImageOps

    arrays = []
    for im in images:
        w, h = im.size
        if size is None and (w < MIN_SIDE or h < MIN_SIDE):  # kept at its own size: it must be one we make
            raise InputError(f"image must be at least {MIN_SIDE}x{MIN_SIDE}, got {w}x{h}")
        im = ImageOps.exif_transpose(im)
        w, h = im.size
        target, how = (size, mode) if size is not None else ((w - w % factor, h - h % factor), "stretch")
        arrays.append(resize_pixels(im, rgb_pixels(im), target, how).astype(np.float32))
    if len({a.shape for a in arrays}) > 1:
        raise InputError("all images must have the same size")
    return np.stack(arrays)


def image_batch(image, factor: int, max_megapixels: float, size: Optional[Tuple[int, int]] = None,
                resize: str = "crop") -> np.ndarray:
    """PIL image(s) or an NHWC / HWC array in [0, 1] → float32 NHWC. PIL images are resized
    to `size` = (width, height) by the `resize` mode, or else stretched down to a multiple of
    `factor`; arrays must already be multiples (and of `size`, when given)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
        check_image_count(len(image))
        for im in image:  # before any pixel is decoded
            check_pixels(im.size[0], im.size[1], max_megapixels, "the input image")
        pixels = _pil_arrays(image, factor, size, resize)
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
        check_image_count(pixels.shape[0])
        check_pixels(pixels.shape[2], pixels.shape[1], max_megapixels, "the input image")
        if not np.isfinite(pixels).all():
            raise InputError("image array holds NaN or infinite values; give values in [0, 1]")
        if pixels.shape[1] % factor or pixels.shape[2] % factor:
            raise InputError(f"image height and width must be multiples of {factor}, got {pixels.shape[1:3]}")
        if size is not None and (pixels.shape[2], pixels.shape[1]) != tuple(size):
            raise InputError(f"an image array is not resized: give it at {size[0]}x{size[1]}, or leave width and "
                             f"height out (got {pixels.shape[2]}x{pixels.shape[1]})")
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
    """Latents (scheduler space) → NHWC float32 images in [0, 1]; `tiled` as `AutoencoderKL.decode`
    (None: exact tiles when the image is larger than the VAE's `tile_size`). The decode is evaluated
    tile by tile or, whole, block by block (so Ctrl-C is seen between them); NaN/inf pixels raise."""
    image = vae.decode(latents / scaling_factor, tiled=tiled, between_blocks=mx.eval).astype(mx.float32)
    bad = nonfinite(image)
    mx.eval(image, bad)
    if bad.item():
        raise nonfinite_error("the decoded image holds NaN/inf pixels", "vae", vae)
    return np.array(mx.clip(image / 2 + 0.5, 0, 1))


def to_pil(images: np.ndarray, settings: Optional[List[dict]]) -> list:
    """NHWC [0, 1] arrays → PIL images, each carrying its settings as PNG metadata (none when None)."""
    from PIL import Image

    from ..metadata import attach_metadata

    pil = [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]
    return pil if settings is None else [attach_metadata(im, s) for im, s in zip(pil, settings)]
