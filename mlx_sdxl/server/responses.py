"""The txt2img / img2img response: `images`, `parameters` and `info`, in A1111's shape
(TextToImageResponse, and Processed.js() for the JSON string in `info`)."""

from __future__ import annotations

import json

from ..version import __version__
from .jobs import Outcome
from .requests import Spec
from .samplers import a1111_name


def info_json(spec: Spec, out: Outcome) -> str:
    """`info`: a JSON string with the seeds, all_seeds and A1111 infotexts of the images returned."""
    seeds = out.seeds  # of the images returned (an interrupt can leave fewer than asked for)
    info = {
        "prompt": spec.prompt, "all_prompts": [spec.prompt] * len(seeds),
        "negative_prompt": spec.negative_prompt, "all_negative_prompts": [spec.negative_prompt] * len(seeds),
        "seed": (seeds or spec.seeds)[0], "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": spec.width if spec.width is not None else (out.images[0].width if out.images else None),
        "height": spec.height if spec.height is not None else (out.images[0].height if out.images else None),
        "sampler_name": a1111_name(out.sampler), "cfg_scale": spec.cfg_scale, "steps": spec.steps,
        "batch_size": spec.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": out.model, "sd_model_hash": out.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": spec.strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": out.infotexts, "styles": list(spec.styles), "job_timestamp": None, "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"mlx-sdxl {__version__}",
        # mlx_sdxl's own: what was ignored, and how an interrupted request ended
        "notes": list(spec.notes), "interrupted": out.interrupted, "interrupted_at_step": out.stopped_at,
        "interrupt_arrived_at_step": out.interrupt_step, "seconds": round(out.seconds, 3),
    }
    return json.dumps(info)


def generation_response(spec: Spec, out: Outcome, parameters: dict) -> dict:
    return {"images": out.encoded, "parameters": parameters, "info": info_json(spec, out)}
