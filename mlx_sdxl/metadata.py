"""Images that remember how they were made.

Every PNG carries two text chunks:

- ``parameters``: the AUTOMATIC1111 "infotext" (prompt, a ``Negative prompt:``
  line, then one ``Key: value, ...`` line), which A1111, ComfyUI loaders and
  image sites already read;
- ``mlx_sdxl``: the full settings as JSON, with the package version, which
  ``read_metadata`` returns and ``mlx-sdxl generate --from`` re-runs.

Settings use the pipeline's argument names (``prompt``, ``negative_prompt``,
``num_inference_steps``, ``guidance_scale``, ``high_noise_frac``, ``scheduler``,
``seed``, ``width``, ``height``, ``prompt_syntax``, ...) plus ``model``, ``refiner``, ``vae``,
``dtype``, ``mode`` ("generate" or "refine"), ``image`` and ``strength``, and
``embeddings`` ({token: short hash}, A1111's ``TI hashes``) when a prompt used any, and
``loras`` ([{name, scale, hash}], A1111's ``Lora hashes``) when LoRAs were applied.
The prompt is recorded exactly as written, weights and BREAK included.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import unicodedata
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import InputError
from .version import __version__

JSON_KEY = "mlx_sdxl"
PARAMETERS_KEY = "parameters"

# Our scheduler names -> A1111 sampler names (A1111 >= 1.9 also reads the legacy "... Karras" form).
A1111_SAMPLERS = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "euler_karras": "Euler Karras",  # A1111 >= 1.9 splits it: Sampler: Euler, Schedule type: Karras
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "unipc": "UniPC",
    "lcm": "LCM",
    "tcd": "TCD",  # Forge's and ComfyUI's name; A1111 itself has no TCD sampler
}
_FROM_A1111 = {v.lower(): k for k, v in A1111_SAMPLERS.items()}
SGM_UNIFORM = "SGM Uniform"  # A1111's "Schedule type" for trailing timestep spacing
# What started from an existing picture: img2img (base, then refiner), refine (refiner alone), inpaint.
IMAGE_MODES = ("img2img", "refine", "inpaint")


# ---------------------------------------------------------------- settings
def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; the settings checks refuse them before any run anyway
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # dtypes and other small objects: their readable name


def normalize_settings(settings: dict) -> dict:
    """A JSON-ready copy of `settings` with the package version recorded."""
    out = _jsonable(dict(settings))
    out.setdefault("version", __version__)
    return out


def model_name(spec: Optional[str]) -> Optional[str]:
    """A short display name: the last path component without a weights extension."""
    if not spec:
        return None
    name = Path(str(spec).rstrip("/\\")).name or str(spec)
    for ext in (".safetensors", ".ckpt"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name


def _quote(text) -> str:
    """A1111's rule: values with ',', ':' or a newline are written as JSON strings."""
    text = str(text)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _num(x) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def format_parameters(settings: dict) -> str:
    """The A1111 infotext for `settings`."""
    s = settings
    lines = [str(s.get("prompt", ""))]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    fields = [("Steps", s.get("num_inference_steps"))]
    sched = s.get("scheduler")
    fields.append(("Sampler", A1111_SAMPLERS.get(sched, sched)))
    if s.get("timestep_spacing") == "trailing" and not str(A1111_SAMPLERS.get(sched, "")).endswith(" Karras"):
        fields.append(("Schedule type", SGM_UNIFORM))
    fields += [("CFG scale", s.get("guidance_scale")), ("Seed", s.get("seed"))]
    if s.get("width") and s.get("height"):
        fields.append(("Size", f"{s['width']}x{s['height']}"))
    fields.append(("Model", model_name(s.get("model"))))
    if s.get("vae"):
        fields.append(("VAE", model_name(s["vae"])))
    if s.get("mode") in IMAGE_MODES:
        fields.append(("Denoising strength", s.get("strength")))
    if s.get("refiner") and s.get("high_noise_frac") and s.get("mode") != "refine":
        fields += [("Refiner", model_name(s["refiner"])), ("Refiner switch at", s.get("high_noise_frac"))]
    if s.get("mode") == "inpaint":
        fields += [("Mask blur", s.get("mask_blur") or 0), ("Resize mode", s.get("resize"))]
        if s.get("padding_mask_crop") is not None:
            fields += [("Inpaint area", "Only masked"), ("Masked area padding", s["padding_mask_crop"])]
    for i, c in enumerate(s.get("controls") or []):  # A1111's ControlNet extension fields
        fields.append((f"ControlNet {i}", f"Module: {c.get('preprocess') or 'none'}, Model: {model_name(c.get('model'))}, "
                                          f"Weight: {c.get('weight')}, Guidance Start: {c.get('start')}, "
                                          f"Guidance End: {c.get('end')}"))
    if s.get("guidance_rescale"):
        fields.append(("Guidance rescale", s["guidance_rescale"]))
    if s.get("embeddings"):  # A1111's "TI hashes": "token: short hash, ..." of the embeddings used
        fields.append(("TI hashes", ", ".join(f"{token}: {h}" for token, h in s["embeddings"].items())))
    if s.get("loras"):  # A1111's "Lora hashes": "name: short hash, ..." (the scales: the JSON chunk, prompt tags)
        fields.append(("Lora hashes", ", ".join(f"{lora.get('name')}: {lora.get('hash')}" for lora in s["loras"])))
    fields.append(("Version", f"mlx-sdxl {s.get('version', __version__)}"))
    lines.append(", ".join(f"{k}: {_quote(_num(v))}" for k, v in fields if v is not None))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


# A1111 infotext fields read as one setting each.
_SIMPLE_FIELDS = {
    "Steps": ("num_inference_steps", int),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Denoising strength": ("strength", float),
    "Refiner switch at": ("high_noise_frac", float),
    "Mask blur": ("mask_blur", float),
    "Masked area padding": ("padding_mask_crop", int),
    "Guidance rescale": ("guidance_rescale", float),
    "Model": ("model", str),
    "Refiner": ("refiner", str),
    "VAE": ("vae", str),
}


def _split_infotext(text: str):
    """(prompt lines, the `Key: value` fields of the last line)."""
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
    return lines, fields


def _read_field(out: dict, key: str, value: str, fields: dict) -> bool:
    """Put one infotext field into `out`; False when it is not one mlx_sdxl reads."""
    if key in _SIMPLE_FIELDS:
        name, cast = _SIMPLE_FIELDS[key]
        out[name] = cast(value)
    elif key == "Size":
        w, h = value.lower().split("x")
        out["width"], out["height"] = int(w), int(h)
    elif key == "Sampler":
        sampler = value.lower()
        schedule = fields.get("Schedule type", "").lower()
        if schedule == "karras":
            sampler += " karras"
        elif schedule == SGM_UNIFORM.lower():
            out["timestep_spacing"] = "trailing"
        out["scheduler"] = _FROM_A1111.get(sampler, value)
    elif key == "TI hashes":  # "token: hash, token: hash"
        pairs = [part.split(":") for part in value.split(",")]
        out["embeddings"] = {token.strip(): h.strip() for token, h in pairs}
    elif key == "Lora hashes":  # "name: hash, name: hash" (scales live in the prompt's <lora:...> tags)
        pairs = [part.rsplit(":", 1) for part in value.split(",")]
        out["loras"] = [{"name": name.strip(), "hash": h.strip()} for name, h in pairs]
    else:
        return False
    return True


def parse_parameters(text: str) -> dict:
    """Settings from an A1111 infotext (ours or another tool's); unknown fields are kept under "extra"."""
    lines, fields = _split_infotext(text)
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    out = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative) if in_negative else None}
    extra = {}
    for key, value in fields.items():
        try:
            if not _read_field(out, key, value, fields):
                extra[key] = value
        except ValueError:
            extra[key] = value
    if "strength" in out:
        out["mode"] = "inpaint" if "mask_blur" in out else "img2img" if "high_noise_frac" in out else "refine"
    if extra:
        out["extra"] = extra
    return out


# ---------------------------------------------------------------- PIL images
def attach_metadata(image, settings: dict):
    """Record `settings` in `image.info` (both chunks' text) and return the same image."""
    settings = normalize_settings(settings)
    image.info[PARAMETERS_KEY] = format_parameters(settings)
    image.info[JSON_KEY] = json.dumps(settings, ensure_ascii=True, sort_keys=True, allow_nan=False)
    return image


def image_settings(image) -> Optional[dict]:
    """The settings attached to a PIL image (by `attach_metadata` or read from a PNG), or None."""
    text = getattr(image, "text", None) if image.format == "PNG" else None
    info = dict(image.info)
    if text:
        info.update(text)
    if JSON_KEY in info:
        try:
            settings = json.loads(info[JSON_KEY])
        except (json.JSONDecodeError, RecursionError):
            raise InputError(f"the image's {JSON_KEY!r} chunk is not valid JSON") from None
        if not isinstance(settings, dict):
            raise InputError(f"the image's {JSON_KEY!r} chunk holds a JSON {type(settings).__name__}, "
                             "not the object of settings mlx-sdxl writes")
        return settings
    if PARAMETERS_KEY in info:
        return parse_parameters(info[PARAMETERS_KEY])
    return None


def pnginfo(settings: dict):
    """A PngInfo carrying both chunks, for `image.save(path, pnginfo=pnginfo(settings))`."""
    from PIL.PngImagePlugin import PngInfo

    settings = normalize_settings(settings)
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, format_parameters(settings))  # iTXt when not latin-1
    info.add_text(JSON_KEY, json.dumps(settings, ensure_ascii=True, sort_keys=True, allow_nan=False))
    return info


def _open_temp(fd: int):
    """The file object save_png writes through (a test replaces it to simulate a full disk)."""
    return os.fdopen(fd, "wb")


def save_png(image, path, settings: Optional[dict] = None, *, overwrite: bool = False) -> Path:
    """Write `image` as a PNG with its settings, atomically (temp file + os.replace).

    `settings` defaults to what `attach_metadata` stored on the image. An
    existing file raises FileExistsError unless `overwrite=True`. The temporary,
    `.NAME.png.<pid>.<random>.tmp` beside `path`, is removed on any error or
    interruption (SIGTERM/SIGHUP too, inside signals.terminate_as_interrupt), and
    temporaries of dead processes in that folder are removed first. An OSError
    (a full disk, ...) names `path`.
    """
    from .signals import deferred
    from .tempfiles import png_temp_prefix, remove_stale

    path = Path(path)
    if settings is None:
        settings = image_settings(image)
    if not overwrite and path.exists():
        raise FileExistsError(17, "file exists; pass overwrite=True to replace it", str(path))
    remove_stale(path.parent)
    tmp = f = None
    try:
        with deferred():  # a signal cannot land between creating the temporary and knowing its name
            fd, tmp = tempfile.mkstemp(prefix=png_temp_prefix(path), suffix=".tmp", dir=path.parent)
            f = _open_temp(fd)
        with f:
            image.save(f, format="PNG", **({"pnginfo": pnginfo(settings)} if settings else {}))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if not overwrite and path.exists():
            raise FileExistsError(17, "file exists; pass overwrite=True to replace it", str(path))
        os.replace(tmp, path)
    except BaseException as e:
        _discard(f, tmp)
        if isinstance(e, OSError) and e.filename != str(path):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    return path


def _discard(f, tmp: Optional[str]) -> None:
    """Close and remove a temporary after a failed save, quietly."""
    try:
        if f is not None:
            f.close()
    except OSError:  # closing flushes, which fails again on a full disk
        pass
    if tmp is not None:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def read_metadata(path) -> dict:
    """The generation settings stored in an image: our JSON chunk, else a parsed A1111 infotext."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            settings = image_settings(im)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path} is not a readable image ({e.__class__.__name__})") from None
    if settings is None:
        raise InputError(f"{path} carries no generation settings (no {JSON_KEY!r} or {PARAMETERS_KEY!r} chunk)")
    return settings


# ---------------------------------------------------------------- file names
def slugify(text: str, max_length: int = 60) -> str:
    """Lowercase ASCII words joined by '-', cut at a word boundary; "image" when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = ""
    for word in re.findall(r"[a-z0-9]+", ascii_text.lower()):
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_length:
            if not slug:
                slug = word[:max_length]
            break
        slug = candidate
    return slug or "image"


def default_filename(prompt: str, seed: int) -> str:
    return f"{slugify(prompt)}-{seed}.png"
