"""A request → a plan of stages, checked before any model loads.

Text to image: the base runs the schedule from noise to the hand-off, the refiner the
rest. The schedule of N steps is split at cutoff = round(1000 − f·1000): the base runs
the steps with t ≥ cutoff, the refiner the others (diffusers' `denoising_end=f` then
`denoising_start=f`). Image to image: one stage (the refiner, else the base) runs the
last `strength` share of the schedule from the noised image.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..conditioning import Prompt, as_list, base_time_ids, refiner_time_ids, size_pair
from ..errors import InputError
from ..identity import check_mode
from ..schedulers import Scheduler, default_scheduler, make_scheduler, split_for_handoff
from ..sources import ModelSource
from ..spec import (BASE, DEFAULT_AESTHETIC_SCORE, DEFAULT_GUIDANCE, DEFAULT_HIGH_NOISE_FRAC,
                    DEFAULT_MAX_MEGAPIXELS, DEFAULT_METADATA, DEFAULT_RESIZE, DEFAULT_PROMPT_SYNTAX,
                    DEFAULT_NEGATIVE_AESTHETIC_SCORE, DEFAULT_SIDE, DEFAULT_STEPS,
                    DEFAULT_STRENGTH, MAX_SEED, REFINER, Seed, check_image_count, check_pixels,
                    check_prompt_syntax, check_side, image_seeds, is_int)
from .prompts import PromptTexts
from .compat import is_inpainting
from .stage import Guidance, Stage, per_image_normal

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass(frozen=True)
class Request:
    """Everything one generation is asked to do, as the caller gave it."""

    prompt: Prompt
    negative_prompt: Optional[Prompt] = None
    prompt_2: Optional[Prompt] = None
    negative_prompt_2: Optional[Prompt] = None
    image: object = None                      # img2img input: PIL image(s) or NHWC array in [0, 1]
    strength: float = DEFAULT_STRENGTH
    num_inference_steps: int = DEFAULT_STEPS
    high_noise_frac: Optional[float] = None   # text to image only; DEFAULT_HIGH_NOISE_FRAC when None
    guidance_scale: float = DEFAULT_GUIDANCE
    guidance_rescale: float = 0.0
    width: Optional[int] = None               # text to image only; DEFAULT_SIDE when None
    height: Optional[int] = None
    num_images_per_prompt: int = 1
    seed: Seed = None
    latents: object = None                    # text to image: initial noise (B, h, w, C)
    noise: object = None                      # img2img: the noise added to the image latents
    scheduler: Optional[str] = None           # None: the model's own (its scheduler_config.json), else euler
    timestep_spacing: Optional[str] = None    # None: the model config's; "leading", "linspace", "trailing"
    eta: Optional[float] = None               # tcd only; None: spec.DEFAULT_TCD_ETA
    aesthetic_score: float = DEFAULT_AESTHETIC_SCORE
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE
    original_size: Optional[Tuple[int, int]] = None
    crops_coords_top_left: Tuple[int, int] = (0, 0)
    target_size: Optional[Tuple[int, int]] = None
    negative_original_size: Optional[Tuple[int, int]] = None
    negative_crops_coords_top_left: Tuple[int, int] = (0, 0)
    negative_target_size: Optional[Tuple[int, int]] = None
    clip_skip: Optional[int] = None
    sample_posterior: bool = True
    mask_image: object = None                 # inpainting: white = repaint (PIL image or (H, W) array)
    mask_blur: float = 0.0                    # pixels of Gaussian blur on the mask's edge
    padding_mask_crop: Optional[int] = None   # repaint only a box this much around the mask
    resize: str = DEFAULT_RESIZE              # how an input picture meets width x height
    control: Sequence = ()                    # mlx_sdxl.Control for each ControlNet that drives the base
    guess_mode: bool = False
    output_type: str = "pil"
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    metadata: str = DEFAULT_METADATA          # what the images record: "minimal", "full" or "none"
    prompt_syntax: str = DEFAULT_PROMPT_SYNTAX  # "plain" (diffusers) or "a1111"

    @property
    def texts(self) -> PromptTexts:
        return PromptTexts(self.prompt, self.negative_prompt, self.prompt_2, self.negative_prompt_2,
                           self.prompt_syntax)


@dataclass(frozen=True)
class ImageStart:
    """Image to image: the image's latents, noised to the first stage's first step (or pure
    noise when inpainting at strength 1); with a mask, how the known region is kept."""

    pixels: np.ndarray
    noise: mx.array
    posterior_keys: Optional[Tuple[mx.array, ...]]  # None: the posterior mean
    mask: Optional[np.ndarray] = None               # (H, W) of 0/1, 1 = repaint
    pure_noise: bool = False
    paste: Optional[object] = None                  # inpaint.PasteBack: composite over the original


@dataclass(frozen=True)
class Plan:
    request: Request
    stages: Tuple[Stage, ...]
    seeds: List[int]
    batch: int
    latents: Optional[mx.array]        # text to image: the initial latents
    image: Optional[ImageStart]        # image to image
    settings: List[dict]               # one per image, without the models' identity


# ---------------------------------------------------------------- checks
def number(value, name: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if low_open else value >= low) and value <= high
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
        raise InputError(f"{name} must be a number {'in ' if high < math.inf else ''}{span}, got {value!r}")
    return float(value)


def latent_channels(source: ModelSource) -> int:
    return source.configs["unet"].get("out_channels", 4)


def check_common(req: Request, base: ModelSource) -> Scheduler:
    if not is_int(req.num_inference_steps) or req.num_inference_steps < 1:
        raise InputError(f"num_inference_steps must be an integer >= 1, got {req.num_inference_steps!r}")
    number(req.guidance_scale, "guidance_scale", 0)
    number(req.guidance_rescale, "guidance_rescale", 0, 1)
    check_mode(req.metadata)
    check_prompt_syntax(req.prompt_syntax)
    if req.output_type not in OUTPUT_TYPES:
        raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {req.output_type!r}")
    if not is_int(req.num_images_per_prompt) or req.num_images_per_prompt < 1:
        raise InputError(f"num_images_per_prompt must be an integer >= 1, got {req.num_images_per_prompt!r}")
    if req.clip_skip is not None and (not is_int(req.clip_skip) or req.clip_skip < 0):
        raise InputError(f"clip_skip must be a non-negative integer, got {req.clip_skip!r}")
    return build_scheduler(req, base)  # unknown names and options fail here


def build_scheduler(req: Request, base: ModelSource) -> Scheduler:
    """A fresh sampler for this request, its N-step schedule set: the one asked for, else the
    model's own (its scheduler_config.json's class); the model config gives the schedule."""
    name = req.scheduler if req.scheduler is not None else default_scheduler(base.scheduler_config)
    sched = make_scheduler(name, base.scheduler_config, timestep_spacing=req.timestep_spacing, eta=req.eta)
    sched.set_timesteps(req.num_inference_steps)
    return sched


def guidance_for(req: Request, source: ModelSource) -> Guidance:
    """Classifier-free guidance for a stage run by `source`'s UNet; an LCM UNet
    (time_cond_proj_dim) takes the scale as an embedding and runs one batch."""
    return Guidance(req.guidance_scale, req.guidance_rescale, source.configs["unet"].get("time_cond_proj_dim"))


def check_refiner_steps(sched: Scheduler, handoff: int, frac: float) -> None:
    """A hand-off that leaves the loaded refiner none of the steps is refused: with few steps on
    a trailing or distilled grid (lcm 4 steps: 999 ... 259) every timestep is above the cut."""
    n, last = sched.num_steps, int(sched.timesteps[-1])
    if handoff < n:
        return
    T = sched.config.num_train_timesteps
    raise InputError(f"high_noise_frac={frac:g} leaves the refiner none of the {n} {sched.name} steps (the last "
                     f"timestep is {last}, above the hand-off at t={round(T - frac * T)}); accepted: "
                     f"high_noise_frac below {(T - last) / T:g}, more steps, or no refiner "
                     "(refiner=None, or high_noise_frac=1 to run the base alone)")


def seed_keys(req: Request, batch: int) -> Tuple[List[int], List[mx.array]]:
    """One seed per image, and each seed's three keys (initial noise, first stage, second stage)."""
    seeds = image_seeds(req.seed, batch, lambda: secrets.randbelow(MAX_SEED + 1))
    return seeds, [mx.random.split(mx.random.key(s), 3) for s in seeds]


def given_noise(value, shape, what: str, hint: str = "") -> mx.array:
    noise = value if isinstance(value, mx.array) else mx.array(value)
    if tuple(noise.shape) != tuple(shape):
        raise InputError(f"{what} must have shape {tuple(shape)}{hint}, got {tuple(noise.shape)}")
    return noise


def _per_image(value, i: int, per_prompt: int):
    """The entry of a per-prompt list that image i was made from (a string or None is kept)."""
    if isinstance(value, (list, tuple)):
        return value[min(i // per_prompt, len(value) - 1)]
    return value


def record_settings(req: Request, seeds: List[int], sampler: Optional[dict] = None, **fields) -> List[dict]:
    """`sampler`: the sampler that runs (Scheduler.settings: its name, spacing, tcd's eta)."""
    common = dict(num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                  guidance_rescale=req.guidance_rescale, **(sampler or {"scheduler": req.scheduler}),
                  clip_skip=req.clip_skip, prompt_syntax=req.prompt_syntax, **fields)
    n = req.num_images_per_prompt
    return [dict(common, prompt=_per_image(req.prompt, i, n),
                 negative_prompt=_per_image(req.negative_prompt, i, n), seed=seed) for i, seed in enumerate(seeds)]


# ---------------------------------------------------------------- plans
def text_to_image(req: Request, base: ModelSource, refiner: Optional[ModelSource], factor: int) -> Plan:
    prompts = as_list(req.prompt, "prompt")
    sched = check_common(req, base)
    width = check_side(DEFAULT_SIDE if req.width is None else req.width, "width")
    height = check_side(DEFAULT_SIDE if req.height is None else req.height, "height")
    if width % factor or height % factor:
        raise InputError(f"width and height must be multiples of {factor} for this VAE")
    check_pixels(width, height, req.max_megapixels)
    frac = number(DEFAULT_HIGH_NOISE_FRAC if req.high_noise_frac is None else req.high_noise_frac,
                   "high_noise_frac", 0, 1, low_open=True)
    batch = len(prompts) * req.num_images_per_prompt
    check_image_count(batch)
    if is_inpainting(base):
        raise InputError("the base UNet is an inpainting model (9 input channels): give image= and mask_image=")
    shape = (batch, height // factor, width // factor, latent_channels(base))
    seeds, keys = seed_keys(req, batch)
    if req.latents is None:
        noise = per_image_normal(shape, [k[0] for k in keys])
    else:
        noise = given_noise(req.latents, shape, "latents", f" (batch, height/{factor}, width/{factor}, {shape[3]})")
    original = size_pair(req.original_size, (height, width), "original_size")
    target = size_pair(req.target_size, (height, width), "target_size")
    crops = size_pair(req.crops_coords_top_left, (0, 0), "crops_coords_top_left")
    neg_crops = size_pair(req.negative_crops_coords_top_left, (0, 0), "negative_crops_coords_top_left")
    neg_original = size_pair(req.negative_original_size, None, "negative_original_size")
    neg_target = size_pair(req.negative_target_size, None, "negative_target_size")
    aesthetic = number(req.aesthetic_score, "aesthetic_score", -math.inf)
    neg_aesthetic = number(req.negative_aesthetic_score, "negative_aesthetic_score", -math.inf)

    use_refiner = refiner is not None and frac < 1
    n_total = req.num_inference_steps
    n_base = split_for_handoff(sched.timesteps, frac) if use_refiner else n_total
    if use_refiner:
        check_refiner_steps(sched, n_base, frac)
    stages = []
    if n_base > 0:
        ids = base_time_ids(original, crops, target, neg_original, neg_crops, neg_target)
        stages.append(Stage(BASE, base, sched, range(0, n_base), guidance_for(req, base), ids,
                            tuple(k[1] for k in keys)))
    if use_refiner:
        rsched = build_scheduler(req, base)  # fresh: no multistep history
        ids = refiner_time_ids(original, crops, aesthetic, neg_original or original, neg_crops, neg_aesthetic)
        stages.append(Stage(REFINER, refiner, rsched, range(n_base, n_total), guidance_for(req, refiner), ids,
                            tuple(k[2] for k in keys)))
    settings = record_settings(req, seeds, sampler=sched.settings, mode="generate", width=width, height=height,
                         high_noise_frac=frac if use_refiner else None,
                         aesthetic_score=req.aesthetic_score if use_refiner else None)
    return Plan(req, tuple(stages), seeds, batch, noise.astype(mx.float32) * sched.init_noise_sigma, None, settings)


def make_plan(req: Request, base: ModelSource, refiner: Optional[ModelSource], factor: int) -> Plan:
    if req.image is None:
        return text_to_image(req, base, refiner, factor)
    from .image_plan import image_to_image

    return image_to_image(req, base, refiner, factor)
