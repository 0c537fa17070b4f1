"""/sdapi/v1/txt2img, img2img, progress, interrupt and skip.

A generation request is checked (in a worker thread of the HTTP server, so decoding input
images never stalls other requests), queued, and awaited while the connection is watched:
a client that goes away before its job has started gets its job dropped. Progress,
interrupt and skip read or set the shared state only, so they answer at once.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from .requests import img2img_spec, txt2img_spec
from .responses import generation_response
from .schemas import Img2ImgRequest, Txt2ImgRequest, as_parameters
from .service import Service

POLL_SECONDS = 0.1   # how often a waiting request looks for its client having gone


class ClientGone(Exception):
    """The client closed its connection while its request waited or ran."""


async def await_job(job, request: Request):
    """The job's result; its exception re-raised; ClientGone (and the job dropped if it had not
    started) when the client disconnects first."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=POLL_SECONDS)
        if done:
            return future.result()
        if await request.is_disconnected():
            job.future.cancel()  # True when it had not started: the worker drops it
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits for it now
            raise ClientGone()


async def _run(service: Service, request: Request, make_spec, body):
    spec = await run_in_threadpool(make_spec, body, service.config.limits, service.models)
    job = service.worker.submit(spec.kind, lambda: service.run(spec))
    try:
        outcome = await await_job(job, request)
    except ClientGone:
        return JSONResponse({"detail": "the client went away"}, status_code=499)
    return generation_response(spec, outcome, as_parameters(body))


def generation_routes(service: Service) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    @router.post("/txt2img")
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await _run(service, request, txt2img_spec, body)

    @router.post("/img2img")
    async def img2img(body: Img2ImgRequest, request: Request):
        return await _run(service, request, img2img_spec, body)

    @router.get("/progress")
    async def progress(skip_current_image: bool = False):
        return service.state.progress(want_image=not skip_current_image)

    @router.post("/interrupt")
    async def interrupt():
        service.state.interrupt()
        return {}

    @router.post("/skip")
    async def skip():
        service.state.skip()
        return {}

    return router
