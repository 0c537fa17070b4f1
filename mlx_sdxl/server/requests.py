"""A validated A1111 request → the `Spec` the worker runs, with every check made before it
is queued: limits (megapixels, batch_size × n_iter, steps), sampler names, model names,
input images. A bad field raises FieldError naming it (a 422); an unknown model name raises
NotInFolder (a 404, as A1111)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Optional, Tuple

from ..errors import SDXLError
from ..lora.tags import parse_lora_tags
from ..schedulers import img2img_start
from ..spec import DEFAULT_GUIDANCE, DEFAULT_SIDE, DEFAULT_STEPS, MAX_SEED, SIZE_MULTIPLE
from .config import Limits
from .encoding import read_image
from .folders import find, list_entries
from .models import Choice, ModelManager
from .samplers import SamplerError, resolve
from .schemas import IGNORED_IF_SET, Img2ImgRequest, Txt2ImgRequest

# A1111's resize_mode → the pipeline's resize: just resize, crop and resize, resize and fill,
# just resize (latent upscale; done as just resize)
RESIZE = {0: "stretch", 1: "crop", 2: "fit", 3: "stretch"}
INPAINTING_FILL = ("fill", "original", "latent noise", "latent nothing")


class FieldError(SDXLError):
    """A request field that is wrong; the 422 names `field` and says what is accepted."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Spec:
    kind: str                       # "txt2img" or "img2img"
    prompt: str
    negative_prompt: str
    sampler: Optional[str]          # ours; None: the model's own
    steps: int
    cfg_scale: float
    width: Optional[int]            # None: img2img at the input's own size
    height: Optional[int]
    seeds: Tuple[int, ...]          # one per image: batch_size × n_iter
    batch_size: int
    n_iter: int
    choice: Choice
    image: object = None            # img2img: a PIL image
    strength: Optional[float] = None
    mask: object = None             # inpainting: a PIL "L" image, white = repaint
    mask_blur: float = 0.0
    padding_mask_crop: Optional[int] = None
    resize: str = "stretch"
    loras: Tuple[Tuple[str, str, float], ...] = ()   # (name, path, scale) from <lora:NAME:SCALE> tags
    notes: Tuple[str, ...] = ()
    styles: Tuple[str, ...] = ()
    send_images: bool = True

    @property
    def steps_per_iteration(self) -> int:
        """The sampler steps one iteration runs (img2img runs the last `strength` share)."""
        if self.kind == "img2img":
            return self.steps - img2img_start(self.steps, self.strength)
        return self.steps


def _seeds(seed: int, count: int) -> Tuple[int, ...]:
    first = secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed
    return tuple((first + i) % (MAX_SEED + 1) for i in range(count))


def _check_size(req: Txt2ImgRequest, limits: Limits) -> Tuple[Optional[int], Optional[int]]:
    for name in ("width", "height"):
        value = getattr(req, name)
        if value is not None and value % SIZE_MULTIPLE:
            raise FieldError(name, f"{name} {value} is not a multiple of {SIZE_MULTIPLE}; accepted: multiples of "
                                   f"{SIZE_MULTIPLE} from 64 (e.g. {value - value % SIZE_MULTIPLE})")
    if isinstance(req, Img2ImgRequest) and req.width is None and req.height is None:
        return None, None
    width, height = req.width or DEFAULT_SIDE, req.height or DEFAULT_SIDE
    if width * height > limits.max_megapixels * 1e6:
        raise FieldError("width", f"width × height = {width}×{height} = {width * height / 1e6:.2f} megapixels, over "
                                  f"this server's limit of {limits.max_megapixels:g} (--max-megapixels)")
    return width, height


def _check_counts(req: Txt2ImgRequest, limits: Limits) -> int:
    steps = DEFAULT_STEPS if req.steps is None else req.steps
    if steps > limits.max_steps:
        raise FieldError("steps", f"steps {steps} is over this server's limit of {limits.max_steps} (--max-steps)")
    if req.batch_size * req.n_iter > limits.max_images:
        raise FieldError("batch_size", f"batch_size × n_iter = {req.batch_size}×{req.n_iter} = "
                                       f"{req.batch_size * req.n_iter} images, over this server's limit of "
                                       f"{limits.max_images} per request (--max-images)")
    return steps


def _check_unsupported(req: Txt2ImgRequest) -> None:
    if req.script_name:
        raise FieldError("script_name", f"scripts are not supported (got {req.script_name!r}); accepted: null or ''")
    if req.alwayson_scripts:
        raise FieldError("alwayson_scripts", f"always-on scripts are not supported (got "
                                             f"{', '.join(map(str, req.alwayson_scripts))}); accepted: {{}}")


def _loras(req: Txt2ImgRequest, models: ModelManager) -> Tuple[Tuple[str, str, float], ...]:
    """The prompt's <lora:NAME:SCALE> tags, each NAME looked up only in --lora-dir (NotInFolder: 404)."""
    tags = {}
    for field in ("negative_prompt", "prompt"):  # tags in the negative prompt are checked, not loaded (A1111)
        try:
            found = parse_lora_tags(getattr(req, field))[1]
        except SDXLError as e:
            raise FieldError(field, str(e)) from None
        if field == "prompt":
            tags = {tag.name: tag for tag in found}  # a LoRA tagged twice keeps its last scale
    folder = models.config.lora_dir
    entries = list_entries(folder)
    where = "--lora-dir" if folder else "the server (no --lora-dir was given)"
    out = []
    for tag in tags.values():
        entry = find(entries, tag.name, "LoRA", where)
        out.append((entry.title, str(entry.path), tag.scale))
    return tuple(out)


def _notes(req: Txt2ImgRequest) -> Tuple[str, ...]:
    notes = [f"{name} is not supported and was ignored" for name in IGNORED_IF_SET if getattr(req, name)]
    if req.styles:
        notes.append(f"styles are ignored (this server has no saved styles): {', '.join(req.styles)}")
    others = sorted(set(req.override_settings or {}) - {"sd_model_checkpoint"})
    if others:
        notes.append(f"override_settings other than sd_model_checkpoint are ignored: {', '.join(others)}")
    return tuple(notes)


def _sampler(req: Txt2ImgRequest) -> Optional[str]:
    try:
        return resolve(req.sampler_name or req.sampler_index, req.scheduler)
    except SamplerError as e:
        raise FieldError(e.field, str(e)) from None


def _choice(req: Txt2ImgRequest, models: ModelManager) -> Choice:
    checkpoint = (req.override_settings or {}).get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise FieldError("override_settings", "override_settings.sd_model_checkpoint must be a checkpoint name")
    return models.choose(checkpoint, req.refiner_checkpoint, req.refiner_switch_at)


def txt2img_spec(req: Txt2ImgRequest, limits: Limits, models: ModelManager, kind: str = "txt2img", **extra) -> Spec:
    _check_unsupported(req)
    steps = _check_counts(req, limits)
    width, height = _check_size(req, limits)
    notes = _notes(req) + tuple(extra.pop("notes", ()))
    return Spec(kind, req.prompt, req.negative_prompt, _sampler(req), steps,
                DEFAULT_GUIDANCE if req.cfg_scale is None else req.cfg_scale, width, height,
                _seeds(req.seed, req.batch_size * req.n_iter), req.batch_size, req.n_iter, _choice(req, models),
                loras=_loras(req, models), notes=notes, styles=tuple(req.styles or ()), send_images=req.send_images,
                **extra)


def _picture(data: str, field: str, limits: Limits):
    try:
        return read_image(data, field, limits.max_megapixels)
    except SDXLError as e:
        raise FieldError(field.split("[")[0], str(e)) from None


def _inpainting(req: Img2ImgRequest, limits: Limits) -> dict:
    """The mask and its options, as the pipeline takes them (nothing without a mask)."""
    if not req.mask:
        return {}
    from PIL import ImageOps

    mask = _picture(req.mask, "mask", limits).convert("L")
    if req.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur = 4.0 if req.mask_blur is None else float(req.mask_blur)
    if not 0 <= blur <= 256:
        raise FieldError("mask_blur", f"mask_blur must be in [0, 256] pixels, got {req.mask_blur}")
    notes = () if req.inpainting_fill == 1 else (
        f"inpainting_fill {req.inpainting_fill} ({INPAINTING_FILL[req.inpainting_fill]}) is not supported: the "
        "masked area starts from the original picture (1, original)",)
    return dict(mask=mask, mask_blur=blur, notes=notes,
                padding_mask_crop=req.inpaint_full_res_padding if req.inpaint_full_res else None)


def img2img_spec(req: Img2ImgRequest, limits: Limits, models: ModelManager) -> Spec:
    """img2img, and inpainting when a mask is given. With width and height the picture is
    brought to that size by `resize_mode`; without, it keeps its own size."""
    if not req.init_images:
        raise FieldError("init_images", "img2img needs one input picture: init_images = [base64 PNG or JPEG]")
    if (req.width is None) != (req.height is None):
        raise FieldError("width" if req.width is None else "height",
                         "give both width and height to resize the input picture, or neither to keep its size")
    steps = DEFAULT_STEPS if req.steps is None else req.steps
    try:
        img2img_start(steps, req.denoising_strength)
    except SDXLError as e:
        raise FieldError("denoising_strength", str(e)) from None
    image = _picture(req.init_images[0], "init_images[0]", limits)
    inpaint = _inpainting(req, limits)
    notes = ["only the first of init_images is used"] if len(req.init_images) > 1 else []
    notes += list(inpaint.pop("notes", ()))
    if req.resize_mode == 3:
        notes.append("resize_mode 3 (latent upscale) is done as 0 (just resize)")
    return txt2img_spec(req, limits, models, "img2img", image=image, strength=req.denoising_strength,
                        resize=RESIZE[req.resize_mode], notes=notes, **inpaint)

