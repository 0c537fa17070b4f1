"""Plans that start from a picture: img2img (the base from the img2img step, then the
refiner from the hand-off), refining with the refiner alone (`high_noise_frac=0`), and
inpainting with a mask.

The schedule of N steps starts at index N − int(N·strength). The base runs the steps
before the hand-off index (the steps with t ≥ round(1000 − 1000·f), as for text to
image); the refiner the rest. When the hand-off comes before the start, the refiner does
the whole job; without a refiner the base does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import mlx.core as mx

from ..conditioning import as_list, base_time_ids, refiner_time_ids, size_pair
from ..errors import InputError
from ..schedulers import img2img_start, split_for_handoff
from ..sources import ModelSource
from ..spec import BASE, DEFAULT_HIGH_NOISE_FRAC, REFINER, check_image_count, check_pixels, check_side
from . import inpaint
from .compat import is_inpainting
from .images import image_batch
from .plan import (ImageStart, Plan, Request, build_scheduler, check_common, check_refiner_steps, given_noise,
                   guidance_for, latent_channels, number, record_settings, seed_keys)
from .resize import check_mode
from .stage import Stage, per_image_normal


@dataclass(frozen=True)
class PasteBack:
    """Composite the output over the original picture (mask blur, or a repainted box)."""

    original: object           # the PIL image as given
    mask: object               # the PIL "L" mask at the original's size (blurred when asked)
    box: Optional[Tuple[int, int, int, int]]


def _bounds(n: int, start: int, frac: float, sched, has_refiner: bool) -> List[Tuple[str, range]]:
    """(stage, step indices) of each stage that runs."""
    if not has_refiner or frac >= 1:
        return [(BASE, range(start, n))]
    handoff = split_for_handoff(sched.timesteps, frac) if frac > 0 else 0
    if frac > 0:
        check_refiner_steps(sched, handoff, frac)
    first = max(start, handoff)
    return ([(BASE, range(start, first))] if first > start else []) + [(REFINER, range(first, n))]


def _size(req: Request, image) -> Optional[Tuple[int, int]]:
    """The requested (width, height), or None for the image's own size."""
    if req.width is None and req.height is None:
        return None
    if req.width is None or req.height is None:
        raise InputError("give both width and height to resize the input image, or neither to keep its size")
    return check_side(req.width, "width"), check_side(req.height, "height")


def _mask_inputs(req: Request, size: Tuple[int, int], factor: int):
    """(pixel mask at `size`, PasteBack or None, crop box or None) for an inpainting request."""
    mask_l = inpaint.grey(req.mask_image)
    if hasattr(req.image, "size") and mask_l.size != tuple(req.image.size):
        warnings.warn(f"the mask is {mask_l.size[0]}x{mask_l.size[1]} but the image {req.image.size[0]}x"
                      f"{req.image.size[1]}: the mask is resized to fit", stacklevel=4)
        mask_l = mask_l.resize(tuple(req.image.size))
    blur = number(req.mask_blur, "mask_blur", 0, 256)
    box = None
    if req.padding_mask_crop is not None:
        pad = req.padding_mask_crop
        if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
            raise InputError(f"padding_mask_crop must be an integer >= 0 (pixels), got {pad!r}")
        box = inpaint.crop_box(mask_l, size[0], size[1], pad)
    mode = "fit" if box is not None else check_mode(req.resize)
    cropped = mask_l.crop(box) if box is not None else mask_l
    mask = inpaint.binary_mask(cropped, size, mode, blur)
    paste = None
    if box is not None or blur > 0:
        from PIL import ImageFilter

        soft = mask_l.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask_l
        paste = PasteBack(req.image, soft, box)
    return mask, paste, box


def image_to_image(req: Request, base: ModelSource, refiner: Optional[ModelSource], factor: int) -> Plan:
    prompts = as_list(req.prompt, "prompt")
    sched = check_common(req, base)
    if req.latents is not None:
        raise InputError("latents does not apply when starting from an image; noise= sets the noise added to it")
    strength = number(req.strength, "strength", 0, 1, low_open=True)
    frac = number(DEFAULT_HIGH_NOISE_FRAC if req.high_noise_frac is None else req.high_noise_frac,
                  "high_noise_frac", 0, 1)
    n = req.num_inference_steps
    start = img2img_start(n, strength)  # refuses a strength that leaves no step
    batch = len(prompts) * req.num_images_per_prompt
    check_image_count(batch)
    size = _size(req, req.image)
    masked = req.mask_image is not None
    if masked and not hasattr(req.image, "crop"):
        raise InputError("inpainting takes the image as a PIL image")
    if not masked and is_inpainting(base):
        raise InputError("the base UNet is an inpainting model (9 input channels): give mask_image= too")
    box = paste = mask = None
    if masked:
        w0, h0 = req.image.size
        check_pixels(w0, h0, req.max_megapixels, "the input image")
        target = size or (w0 - w0 % factor, h0 - h0 % factor)
        mask, paste, box = _mask_inputs(req, target, factor)
        size = target
    source = req.image.crop(box) if box is not None else req.image
    pixels = image_batch(source, factor, req.max_megapixels, size=size,
                         resize="fit" if box is not None else check_mode(req.resize))
    if pixels.shape[0] not in (1, batch):
        raise InputError(f"got {pixels.shape[0]} images for a batch of {batch}")
    h, w = pixels.shape[1], pixels.shape[2]
    check_pixels(w, h, req.max_megapixels)
    shape = (batch, h // factor, w // factor, latent_channels(base))
    seeds, keys = seed_keys(req, batch)
    noise = per_image_normal(shape, [k[1] for k in keys]) if req.noise is None else \
        given_noise(req.noise, shape, "noise")
    stages = _stages(req, base, refiner, sched, _bounds(n, start, frac, sched, refiner is not None), keys, (h, w))
    image = ImageStart(pixels, noise, tuple(k[0] for k in keys) if req.sample_posterior else None, mask,
                       pure_noise=masked and strength == 1, paste=paste)
    ran_refiner = any(s.name == REFINER for s in stages)
    settings = record_settings(req, seeds, sampler=sched.settings, mode="inpaint" if masked else "refine" if stages[0].name == REFINER
                               else "img2img", strength=strength, width=w, height=h,
                               high_noise_frac=frac if ran_refiner and len(stages) > 1 else None,
                               aesthetic_score=req.aesthetic_score if ran_refiner else None,
                               mask_blur=req.mask_blur or None, padding_mask_crop=req.padding_mask_crop)
    return Plan(req, tuple(stages), seeds, batch, None, image, settings)


def _stages(req: Request, base, refiner, sched, bounds, keys, hw) -> List[Stage]:
    original = size_pair(req.original_size, hw, "original_size")
    target = size_pair(req.target_size, hw, "target_size")
    crops = size_pair(req.crops_coords_top_left, (0, 0), "crops_coords_top_left")
    neg_crops = size_pair(req.negative_crops_coords_top_left, (0, 0), "negative_crops_coords_top_left")
    neg_original = size_pair(req.negative_original_size, original, "negative_original_size")
    neg_target = size_pair(req.negative_target_size, target, "negative_target_size")
    stages = []
    for n, (name, steps) in enumerate(bounds):
        stage_keys = tuple(k[2] if n == 0 else mx.random.split(k[2], 2)[1] for k in keys)
        if name == BASE:
            ids = base_time_ids(original, crops, target, neg_original, neg_crops, neg_target)
            stages.append(Stage(BASE, base, sched, steps, guidance_for(req, base), ids, stage_keys))
            continue
        rsched = sched
        if n > 0:
            rsched = build_scheduler(req, base)  # fresh: no multistep history
        ids = refiner_time_ids(original, crops, number(req.aesthetic_score, "aesthetic_score", -math.inf),
                               neg_original, neg_crops,
                               number(req.negative_aesthetic_score, "negative_aesthetic_score", -math.inf))
        stages.append(Stage(REFINER, refiner, rsched, steps, guidance_for(req, refiner), ids, stage_keys))
    return stages
