"""/sdapi/v1 listings and settings: sd-models, options, samplers, schedulers, loras,
embeddings, upscalers, scripts, refresh-checkpoints, refresh-loras and png-info."""

from __future__ import annotations

from typing import Any, Dict

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from .api_generate import ClientGone, await_job
from .encoding import png_info
from .models import loras
from .requests import FieldError
from .samplers import sampler_items, scheduler_items
from .schemas import PNGInfoRequest
from .service import Service


def _models(service: Service) -> list:
    items = []
    for c in service.models.checkpoints():
        model_name = c.entry.stem if c.entry else c.title
        items.append({"title": c.title, "model_name": model_name, "hash": service.models.loaded_hash(c),
                      "sha256": None, "filename": c.entry.name if c.entry else c.title, "config": None})
    return items


def _options(service: Service) -> dict:
    selected = service.models.selected
    refiner = service.models.default_refiner
    return {"sd_model_checkpoint": selected.title, "sd_checkpoint_hash": service.models.loaded_hash(selected),
            "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "samples_format": "png",
            "live_previews_enable": True, "show_progress_every_n_steps": service.config.preview_every,
            "live_previews_image_format": "png", "show_progress_type": service.decoders.kind,
            "sd_model_refiner": refiner.title if refiner else "None"}


async def _set_options(service: Service, body: Dict[str, Any], request: Request):
    name = body.get("sd_model_checkpoint")
    if name is None:
        return None
    if not isinstance(name, str):
        raise FieldError("sd_model_checkpoint", "sd_model_checkpoint must be a checkpoint title from "
                                                "GET /sdapi/v1/sd-models")
    checkpoint = service.models.checkpoint(name)
    try:
        await await_job(service.worker.submit("options", lambda: service.models.select(checkpoint)), request)
    except ClientGone:
        pass
    return None


def info_routes(service: Service) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")
    router.add_api_route("/sd-models", lambda: _models(service), methods=["GET"])
    router.add_api_route("/samplers", sampler_items, methods=["GET"])
    router.add_api_route("/schedulers", scheduler_items, methods=["GET"])
    router.add_api_route("/loras", lambda: loras(service.config.lora_dir), methods=["GET"])
    router.add_api_route("/upscalers", lambda: [], methods=["GET"])
    router.add_api_route("/scripts", lambda: {"txt2img": [], "img2img": []}, methods=["GET"])
    router.add_api_route("/embeddings", lambda: {"loaded": service.models.embeddings_loaded,
                                                 "skipped": service.models.embeddings_skipped}, methods=["GET"])
    # every listing is read afresh from its folder, so a refresh has nothing to do
    router.add_api_route("/refresh-checkpoints", lambda: None, methods=["POST"])
    router.add_api_route("/refresh-loras", lambda: None, methods=["POST"])

    @router.get("/options")
    async def options():  # on the event loop: no file or model work, so it answers at once under load
        return _options(service)

    @router.post("/options")
    async def set_options(body: Dict[str, Any], request: Request):
        return await _set_options(service, body, request)

    @router.post("/png-info")
    async def png_info_route(body: PNGInfoRequest):
        try:
            info, items, parameters = await run_in_threadpool(png_info, body.image)
        except ValueError as e:
            raise FieldError("image", str(e)) from None
        return {"info": info, "items": items, "parameters": parameters}

    return router
