"""Running one generation request on the worker: its iterations (n_iter batches of
batch_size images), progress, previews when asked for, interrupt and skip.

Interrupt and skip act at the end of the sampler step that is running when they arrive.
The iteration that was stopped still returns its images, decoded from the latents of the
last finished step (the sampler's state, scaled as an image latent; noisy when stopped
early), as A1111 returns its current images. Each such image's metadata records
`interrupted_at` ("step/steps"). Interrupt ends the request; skip goes on with the next
iteration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

from ..lora.tags import strip_lora_tags
from ..metadata import attach_metadata
from ..pipeline.images import to_pil
from ..schedulers import default_scheduler
from ..spec import DECODE
from .encoding import png_base64
from .previews import Decoders, Schedule
from .requests import Spec
from .state import ServerState


@dataclass
class Outcome:
    images: List[object] = field(default_factory=list)     # PIL images with metadata
    seeds: List[int] = field(default_factory=list)
    infotexts: List[str] = field(default_factory=list)
    interrupted: bool = False
    stopped_at: Optional[int] = None                        # the step the last stopped iteration ended at
    interrupt_step: Optional[int] = None                    # the step the interrupt arrived at
    encoded: List[str] = field(default_factory=list)        # base64 PNGs (made in the worker)
    sampler: str = ""                                       # the sampler that ran (ours)
    model: str = ""
    model_hash: Optional[str] = None
    seconds: float = 0.0


class StepTracker:
    """The pipeline callback of one iteration: progress, previews on demand, interrupt/skip."""

    def __init__(self, state: ServerState, decoders: Decoders, schedule: Schedule, first_index: int, total: int):
        self.state, self.decoders, self.schedule = state, decoders, schedule
        self.first_index, self.total = first_index, total
        self.stage, self.offset, self.stage_total = None, 0, 0
        self.done, self.latents = 0, None

    def __call__(self, stage, step, total, latents):
        if stage == DECODE:
            return None  # never cancel after the decode: the images are made
        if stage != self.stage:
            self.offset += self.stage_total
            self.stage, self.stage_total = stage, total
        self.done, self.latents = self.offset + step, latents
        stop = self.state.at_step(self.done)
        if not stop and self.state.preview_due():
            view = self.schedule.viewable(latents, self.first_index + self.done)
            self.state.set_preview(png_base64(self.decoders.preview(view)), self.done)
        return False if stop else None

    def partial(self):
        """The latents of the last finished step, scaled as image latents (None before any step)."""
        if self.latents is None:
            return None
        return self.schedule.viewable(self.latents, self.first_index + self.done)


def _generate(pipe, spec: Spec, sampler: str, seeds, tracker: StepTracker, options: dict):
    common = dict(seed=list(seeds), num_images_per_prompt=len(seeds), num_inference_steps=spec.steps,
                  guidance_scale=spec.cfg_scale, scheduler=sampler, callback=tracker,
                  high_noise_frac=spec.choice.high_noise_frac, width=spec.width, height=spec.height, **options)
    if spec.kind == "img2img":
        common.update(image=spec.image, strength=spec.strength, resize=spec.resize)
        if spec.mask is not None:
            common.update(mask_image=spec.mask, mask_blur=spec.mask_blur, padding_mask_crop=spec.padding_mask_crop)
    # <lora:...> tags never reach the text encoders; the images record the prompt as written
    return pipe.generate(strip_lora_tags(spec.prompt), strip_lora_tags(spec.negative_prompt) or None, **common)


def apply_loras(pipe, loras) -> None:
    """Make the pipeline's LoRAs exactly the request's (name, path, scale) list: those no longer
    asked for come off, new ones are loaded, changed scales are set. Kept loaded between requests."""
    wanted = {name: (path, scale) for name, path, scale in loras}
    for name in list(pipe.loras):
        if name not in wanted:
            pipe.unload_lora(name)
    loaded = pipe.loras
    for name, (path, scale) in wanted.items():
        if name not in loaded:
            pipe.load_lora(path, scale, name=name)
        elif loaded[name] != scale:
            pipe.set_lora_scale(name, scale)


def _as_written(spec: Spec, settings: list, metadata: str, **extra) -> Optional[list]:
    if metadata == "none":
        return None
    return [dict(s, prompt=spec.prompt, negative_prompt=spec.negative_prompt or None, **extra) for s in settings]


def _finish(spec: Spec, result, decoders: Decoders, taesd: bool, metadata: str) -> list:
    if not taesd:
        settings = _as_written(spec, result.settings, metadata)
        return [attach_metadata(im, s) for im, s in zip(result.images, settings)] if settings else result.images
    return to_pil(decoders.decode(result.images), _as_written(spec, result.settings, metadata, vae_decoder="taesd"))


def _partial(spec: Spec, pipe, result, tracker: StepTracker, decoders: Decoders, taesd: bool, metadata: str) -> list:
    latents = tracker.partial()
    if latents is None:
        return []
    pixels = decoders.decode(latents) if taesd else pipe.decode_latents(latents)
    return to_pil(pixels, _as_written(spec, result.settings, metadata,
                                      interrupted_at=f"{tracker.done}/{tracker.total}"))


def run_generation(spec: Spec, pipe, state: ServerState, decoders: Decoders, *, taesd: bool, metadata: str,
                   prompt_syntax: str, max_megapixels: float) -> Outcome:
    """All iterations of `spec` on `pipe`; the state tells progress readers what runs."""
    t0 = time.perf_counter()
    sampler = spec.sampler or default_scheduler(pipe.base.scheduler_config)
    out = Outcome(model=pipe.base.name, model_hash=pipe.base.short_hash, sampler=sampler)
    options = dict(output_type="latent" if taesd else "pil", metadata=metadata, prompt_syntax=prompt_syntax,
                   max_megapixels=max_megapixels)
    first = spec.steps - spec.steps_per_iteration  # img2img starts part-way into the schedule
    state.begin(spec.kind, spec.n_iter, spec.steps_per_iteration)
    try:
        apply_loras(pipe, spec.loras)
        for k in range(spec.n_iter):
            if state.interrupted:
                break
            state.next_iteration(k)
            seeds = spec.seeds[k * spec.batch_size:(k + 1) * spec.batch_size]
            tracker = StepTracker(state, decoders, Schedule(sampler, pipe.base.scheduler_config, spec.steps),
                                  first, spec.steps_per_iteration)
            result = _generate(pipe, spec, sampler, seeds, tracker, options)
            if result.cancelled:
                images = _partial(spec, pipe, result, tracker, decoders, taesd, metadata)
                out.stopped_at = tracker.done
            else:
                images = _finish(spec, result, decoders, taesd, metadata)
            out.images += images
            out.seeds += list(seeds[:len(images)])
        out.interrupted, out.interrupt_step = state.interrupted, state.interrupt_step
    finally:
        state.end()
    out.infotexts = [im.info.get("parameters", "") for im in out.images]
    out.encoded = [png_base64(im) for im in out.images] if spec.send_images else []
    out.seconds = time.perf_counter() - t0
    return out
