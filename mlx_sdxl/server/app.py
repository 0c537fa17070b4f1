"""The FastAPI application: the /sdapi/v1 routes, the web page at /, the guards (auth, body
size, CORS) and the mapping of errors to HTTP statuses:

- a bad field: 422 with FastAPI's shape, `{"detail": [{"loc": ["body", FIELD], "msg": ...}]}`;
- a checkpoint name not in its folder: 404; bad input found while generating: 422;
- a full queue or a server that is stopping: 503; a body over --max-body-mb: 413;
- anything else: 500 with the error's type and message.
"""

from __future__ import annotations

from concurrent.futures import CancelledError
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from ..errors import SDXLError
from .api_generate import generation_routes
from .api_info import info_routes
from .folders import NotInFolder
from .guards import BasicAuth, BodyLimit
from .requests import FieldError
from .service import Service
from .worker import QueueFull

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# The page loads only its own files and shows images from data: URLs; it can reach nothing else.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _errors(app: FastAPI) -> None:
    @app.exception_handler(FieldError)
    async def field_error(request: Request, e: FieldError):
        return JSONResponse({"detail": [{"type": "value_error", "loc": ["body", e.field], "msg": str(e)}]}, 422)

    @app.exception_handler(NotInFolder)
    async def not_found(request: Request, e: NotInFolder):
        return JSONResponse({"detail": str(e)}, 404)

    @app.exception_handler(SDXLError)
    async def bad_input(request: Request, e: SDXLError):
        return JSONResponse({"detail": str(e)}, 422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return JSONResponse({"detail": str(e)}, 503)

    @app.exception_handler(CancelledError)
    async def cancelled(request: Request, e: CancelledError):
        return JSONResponse({"detail": "the server is shutting down; the request was not run"}, 503)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):  # a bug or a machine fault: say what, as JSON
        return JSONResponse({"detail": f"the server failed: {e.__class__.__name__}: {e}"}, 500)


def _page(app: FastAPI) -> None:
    files = {name: (STATIC / name).read_bytes() for name in ("index.html", *PAGE_FILES)}
    headers = {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(files["index.html"], media_type="text/html; charset=utf-8", headers=headers)

    for name, media in PAGE_FILES.items():
        app.add_api_route(f"/static/{name}", _file_route(files[name], media, headers), methods=["GET"],
                          include_in_schema=False)


def _file_route(body: bytes, media: str, headers: dict):
    async def route():
        return Response(body, media_type=media, headers=headers)
    return route


def create_app(service: Service):
    """The ASGI application: CORS (when configured) → auth → body limit → FastAPI."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.shutdown()

    app = FastAPI(title="mlx-sdxl", description="AUTOMATIC1111-compatible /sdapi/v1 API", lifespan=lifespan)
    _errors(app)
    app.include_router(generation_routes(service))
    app.include_router(info_routes(service))
    _page(app)
    config = service.config
    wrapped = BasicAuth(BodyLimit(app, config.limits.max_body_bytes), config.credentials)
    if config.cors_origins:
        wrapped = CORSMiddleware(wrapped, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type"], allow_credentials=True)
    return wrapped
