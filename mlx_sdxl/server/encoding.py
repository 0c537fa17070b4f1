"""Images in and out of JSON: base64 PNG with the metadata chunks kept, input images read
safely (size checked from the header before any pixel is decoded), and png-info."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from typing import Optional, Tuple

from ..errors import InputError
from ..metadata import JSON_KEY, PARAMETERS_KEY
from ..spec import MIN_SIDE, check_pixels


def png_base64(image) -> str:
    """A PIL image as base64 PNG, with every text item of `image.info` as a PNG text chunk (as A1111)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    texts = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    for key, value in texts.items():
        info.add_text(key, value)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info if texts else None)
    return base64.b64encode(out.getvalue()).decode("ascii")


def _bytes(data: str, what: str) -> bytes:
    if not isinstance(data, str) or not data.strip():
        raise InputError(f"{what} is empty; send a base64-encoded PNG or JPEG (a data: URL is accepted)")
    data = data.strip()
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if data.startswith(("http://", "https://")):
        raise InputError(f"{what} is a URL; this server fetches nothing: send the image itself, base64-encoded")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what} is not valid base64; send a base64-encoded PNG or JPEG") from None


def open_image(data: str, what: str):
    """A PIL image from base64, not yet decoded (only its header is read)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(_bytes(data, what)))
    except (UnidentifiedImageError, OSError):
        raise InputError(f"{what} is not a readable image; send a base64-encoded PNG or JPEG") from None
    except Image.DecompressionBombError:
        raise InputError(f"{what} has too many pixels to be opened safely") from None


def read_image(data: str, what: str, max_megapixels: float):
    """A decoded PIL image from base64; its size is checked from the header first."""
    from PIL import Image

    image = open_image(data, what)
    w, h = image.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InputError(f"{what} is {w}x{h}; it must be at least {MIN_SIDE}x{MIN_SIDE}")
    check_pixels(w, h, max_megapixels, what)
    try:
        image.load()
    except (OSError, Image.DecompressionBombError, ValueError):
        raise InputError(f"{what} is damaged or truncated; send a complete PNG or JPEG") from None
    return image


_FIELD = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def infotext_fields(text: str) -> dict:
    """An A1111 infotext as A1111's png-info `parameters`: Prompt, Negative prompt, Size-1/Size-2, ..."""
    lines = text.strip("\n").split("\n")
    fields = {}
    if lines and len(_FIELD.findall(lines[-1])) >= 3:
        for key, value in _FIELD.findall(lines.pop()):
            if value.startswith('"'):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            fields[key.strip()] = value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    size = fields.pop("Size", "")
    if "x" in size:
        out["Size-1"], out["Size-2"] = size.split("x", 1)
    out.update(fields)
    return out


def png_info(data: str) -> Tuple[str, dict, dict]:
    """(infotext, other text items, parsed fields) of a base64 image; its pixels are never decoded."""
    image = open_image(data, "image")
    texts = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    infotext: Optional[str] = texts.pop(PARAMETERS_KEY, None)
    items = {k: v for k, v in texts.items()}
    if JSON_KEY in items:
        try:
            items[JSON_KEY] = json.loads(items[JSON_KEY])
        except (json.JSONDecodeError, RecursionError):
            pass
    return infotext or "", items, infotext_fields(infotext) if infotext else {}
