"""Fitting an input picture to the size asked for, with the geometry diffusers uses.

- "crop": scale to cover the size, keeping the aspect ratio, and cut the overflow evenly;
- "fit": scale to fit inside, and fill the margins with the image's own edges, stretched;
- "stretch": scale each side independently.

Each channel is resampled on its own with Lanczos, so 8-bit RGB gives exactly diffusers'
`VaeImageProcessor.resize` ("crop", "fill", "default"), and higher bit depths keep theirs.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from ..errors import InputError
from ..spec import RESIZE_MODES


def check_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise InputError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    return mode


def _centered(band, size: Tuple[int, int]):
    from PIL import Image

    canvas = Image.new(band.mode, size)
    canvas.paste(band, box=(size[0] // 2 - band.width // 2, size[1] // 2 - band.height // 2))
    return canvas


def _fill_margins(canvas, scaled, size: Tuple[int, int], wider: bool):
    """Stretch the scaled image's first and last row (or column) over the empty margins."""
    w, h = size
    if wider:  # margins above and below
        fill = h // 2 - scaled.height // 2
        if fill > 0:
            canvas.paste(scaled.resize((w, fill), box=(0, 0, w, 0)), box=(0, 0))
            canvas.paste(scaled.resize((w, fill), box=(0, scaled.height, w, scaled.height)),
                         box=(0, fill + scaled.height))
    else:
        fill = w // 2 - scaled.width // 2
        if fill > 0:
            canvas.paste(scaled.resize((fill, h), box=(0, 0, 0, h)), box=(0, 0))
            canvas.paste(scaled.resize((fill, h), box=(scaled.width, 0, scaled.width, h)),
                         box=(fill + scaled.width, 0))
    return canvas


def resize_band(band, size: Tuple[int, int], mode: str):
    """One single-channel PIL image ("L" or "F") resized to `size` = (width, height)."""
    from PIL import Image

    w, h = size
    if band.size == (w, h):
        return band
    if mode == "stretch":
        return band.resize((w, h), Image.LANCZOS)
    ratio, src_ratio = w / h, band.width / band.height
    if mode == "crop":
        sw = w if ratio > src_ratio else band.width * h // band.height
        sh = h if ratio <= src_ratio else band.height * w // band.width
        return _centered(band.resize((sw, sh), Image.LANCZOS), size)
    sw = w if ratio < src_ratio else band.width * h // band.height
    sh = h if ratio >= src_ratio else band.height * w // band.width
    scaled = band.resize((sw, sh), Image.LANCZOS)
    if ratio == src_ratio:
        return _centered(scaled, size)
    return _fill_margins(_centered(scaled, size), scaled, size, wider=ratio < src_ratio)


def resize_pixels(image, pixels: np.ndarray, size: Tuple[int, int], mode: str) -> np.ndarray:
    """`pixels` (H, W, 3) in [0, 1], read from PIL `image`, at `size` = (width, height).
    8-bit RGB images are resampled in 8 bits, as diffusers does; others in float."""
    from PIL import Image

    if (pixels.shape[1], pixels.shape[0]) == tuple(size):
        return pixels
    if image is not None and image.mode == "RGB":
        bands: List = list(image.split())
        return np.stack([np.asarray(resize_band(b, size, mode), np.float32) for b in bands], -1) / 255.0
    bands = [Image.fromarray(np.ascontiguousarray(pixels[..., c]), "F") for c in range(3)]
    return np.clip(np.stack([np.asarray(resize_band(b, size, mode), np.float32) for b in bands], -1), 0, 1)
