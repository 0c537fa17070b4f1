"""Running a plan: encode every stage's conditioning, start from noise or a picture, run the
stages one after the other, decode, and record the settings. The functions take the pipeline,
whose model cache, lock and settings they use."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Tuple

import mlx.core as mx

from ..errors import InputError
from ..identity import source_fields
from ..memory import wired_limit
from ..spec import DECODE, ENCODE, REFINER, TEXT_ENCODERS
from . import images as pixels
from . import memory_estimate
from .health import nonfinite_error
from .image_run import image_latents, paste_results
from .plan import Plan
from .prompts import embeddings_used, encode_conditioning, encoder_flags
from .result import GenerationResult, StageTiming, Timings
from .stage import Callback, Cancelled, Stage


def run_plan(pipe, plan: Plan, callback: Optional[Callable]) -> GenerationResult:
    timings = Timings()
    settings = [record(pipe, s, plan) for s in plan.settings]
    memory_estimate.check(pipe, plan)
    with pipe._lock, wired_limit():
        try:
            stages = condition(pipe, plan, timings)
            x = plan.latents
            if plan.image is not None:
                x, stages = image_latents(plan, stages, pipe.models.get(pipe.vae_source, "vae", timings),
                                          pipe.scaling_factor, pipe.vae_scale_factor)
            stages = list(stages)
            x = run_stages(pipe, stages, x, callback, timings)
            images = output(pipe, x, plan, settings, callback, timings)
            return GenerationResult(images, plan.seeds, settings, timings.finish())
        except Cancelled:
            mx.clear_cache()
            return GenerationResult(None, plan.seeds, settings, timings.finish(), cancelled=True)


def run_stages(pipe, stages: list, x: mx.array, callback: Optional[Callable], timings: Timings) -> mx.array:
    """Run `stages` in order, emptying the list as it goes: a stage's conditioning (its text
    embeddings) is freed as soon as it has run, before the next stage allocates."""
    while stages:
        x = run_stage(pipe, stages.pop(0), x, callback, timings)
        if pipe.low_memory:
            mx.clear_cache()  # the stage's UNet, keys and values and conditioning are gone now
    return x


def run_stage(pipe, stage: Stage, x: mx.array, callback: Optional[Callable], timings: Timings) -> mx.array:
    """One stage. Its cross-attention keys and values live only inside `Stage.run`; in low-memory
    mode its UNet is released after it and MLX's buffer cache emptied."""
    timings.start_stage()
    unet = pipe.models.get(stage.source, "unet", timings)
    timings.start_stage()  # the load's peak counts toward the call's, not the stage's
    x, timing = stage.run(unet, x, callback, forward=pipe.models.forward(unet))
    timings.record(stage.name, dataclasses.replace(timing, weights_memory=pipe.models.resident_bytes()))
    del unet
    if pipe.low_memory:
        pipe.models.release(stage.source, "unet")
    return x


def condition(pipe, plan: Plan, timings: Timings) -> list:
    """Every stage's conditioning, made before any UNet loads (so low_memory can drop the
    text encoders first)."""
    t0 = time.perf_counter()
    timings.start_stage()
    req = plan.request

    def load(source, part):
        return pipe.models.get(source, part, timings)

    stages, warned = [], set()  # warned: each prompt-length warning once per request
    for stage in plan.stages:
        cond = encode_conditioning(load, stage.source, req.texts, stage.time_ids, dtype=pipe.dtype,
                                   num_images_per_prompt=req.num_images_per_prompt, clip_skip=req.clip_skip,
                                   guided=stage.guidance.active, embeddings=pipe.embeddings, warned=warned)
        flags = encoder_flags(cond, stage.source)
        mx.eval(cond.arrays(), list(flags.values()))
        for part, flag in flags.items():
            if flag.item():
                raise nonfinite_error(f"the {stage.name}'s prompt embeddings hold NaN/inf", part,
                                      load(stage.source, part))
        stages.append(dataclasses.replace(stage, conditioning=cond))
    timings.record(ENCODE, StageTiming(time.perf_counter() - t0, 0, mx.get_peak_memory(), pipe.models.resident_bytes()))
    if pipe.low_memory:
        for source in filter(None, (pipe.base, pipe.refiner)):
            for part in TEXT_ENCODERS:
                pipe.models.release(source, part)
    return stages


def output(pipe, x, plan: Plan, settings: list, callback, timings: Timings):
    request = plan.request
    if request.output_type == "latent":
        return x
    t0 = time.perf_counter()
    timings.start_stage()
    vae = pipe.models.get(pipe.vae_source, "vae", timings)
    timings.start_stage()
    images = pixels.decode_latents(vae, x, pipe.scaling_factor, tiled=True if pipe.low_memory else None)
    if callback is not None and callback(DECODE, 1, 1, x) is False:
        raise Cancelled()
    timings.record(DECODE, StageTiming(time.perf_counter() - t0, 1, mx.get_peak_memory(), pipe.models.resident_bytes()))
    images = paste_results(images, plan)
    if request.output_type == "np":
        return images
    return pixels.to_pil(images, None if request.metadata == "none" else settings)


def record(pipe, settings: dict, plan: Plan) -> dict:
    """What a PNG records: the request's settings, without None, plus the models used."""
    mode = plan.request.metadata
    out = {k: v for k, v in settings.items() if v is not None}
    out.update(source_fields("model", pipe.base, mode), dtype=str(pipe.dtype).replace("mlx.core.", ""))
    if pipe.quantization.base_bits:
        out["base_bits"] = pipe.quantization.base_bits
    if any(stage.name == REFINER for stage in plan.stages):
        out.update(source_fields("refiner", pipe.refiner, mode))
        if pipe.refiner_bits:
            out["refiner_bits"] = pipe.refiner_bits
    if pipe.vae_source is not pipe.base:
        out.update(source_fields("vae", pipe.vae_source, mode))
    req = plan.request
    texts = [t for v in (settings.get("prompt"), settings.get("negative_prompt"), req.prompt_2,
                         req.negative_prompt_2) if v for t in ([v] if isinstance(v, str) else v)]
    used = embeddings_used(pipe.base, texts, req.prompt_syntax, pipe.embeddings)
    if used:
        out["embeddings"] = used  # {token: short hash}: A1111's "TI hashes"
    roles = {stage.source.role for stage in plan.stages}
    loras = [lora.record(mode == "full") for lora in pipe.models.loras if lora.scale != 0 and lora.role in roles]
    if loras:
        out["loras"] = loras  # [{name, scale, hash[, target][, path]}]: A1111's "Lora hashes"
    return out


def run_first_stage(pipe, plan: Plan, callback: Optional[Callback] = None,
                    timings: Optional[Timings] = None) -> Tuple[mx.array, Tuple[Stage, ...]]:
    """Encode every stage's conditioning and run a text-to-image plan's first stage: (its
    latents, the later stages with their conditioning). Loads the text encoders and that UNet."""
    if plan.image is not None:
        raise InputError("only a text-to-image plan runs in two halves")
    timings = Timings() if timings is None else timings
    with pipe._lock, wired_limit():
        stages = condition(pipe, plan, timings)
        return run_stage(pipe, stages[0], plan.latents, callback, timings), tuple(stages[1:])


def run_last_stages(pipe, plan: Plan, x: mx.array, stages: Tuple[Stage, ...] = (),
                    callback: Optional[Callback] = None, timings: Optional[Timings] = None) -> GenerationResult:
    """Run `stages` (conditioned, e.g. by `run_first_stage` in another process) on the
    latents `x`, then decode: what `generate` returns for `plan`. Loads those UNets and the VAE."""
    timings = Timings() if timings is None else timings
    settings = [record(pipe, s, plan) for s in plan.settings]
    with pipe._lock, wired_limit():
        try:
            x = run_stages(pipe, list(stages), x, callback, timings)
            return GenerationResult(output(pipe, x, plan, settings, callback, timings), plan.seeds, settings,
                                    timings.finish())
        except Cancelled:
            mx.clear_cache()
            return GenerationResult(None, plan.seeds, settings, timings.finish(), cancelled=True)
