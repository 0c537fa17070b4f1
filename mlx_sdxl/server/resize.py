"""img2img input pictures brought to the requested size, by A1111's `resize_mode`:
0 just resize (stretch), 1 crop and resize (cover, centred), 2 resize and fill (fit, the
border filled by repeating the edge pixels), 3 latent upscale (here: as 0)."""

from __future__ import annotations

import numpy as np

RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize (latent upscale)"}


def _rgb_or_rgba(image):
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return image.convert("RGBA" if has_alpha else "RGB")


def fit_image(image, width: int, height: int, mode: int):
    """`image` as a width×height PIL image (RGB, or RGBA when it has transparency)."""
    from PIL import Image

    image = _rgb_or_rgba(image)
    if image.size == (width, height):
        return image
    w, h = image.size
    if mode == 1:
        scale = max(width / w, height / h)
    elif mode == 2:
        scale = min(width / w, height / h)
    else:
        return image.resize((width, height), Image.LANCZOS)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = image.resize(size, Image.LANCZOS)
    if mode == 1:
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        return resized.crop((left, top, left + width, top + height))
    pixels = np.asarray(resized)
    left, top = (width - size[0]) // 2, (height - size[1]) // 2
    pad = [(top, height - size[1] - top), (left, width - size[0] - left), (0, 0)]
    return Image.fromarray(np.pad(pixels, pad, mode="edge"), resized.mode)
