"""A real `mlx-sdxl serve` app on a free loopback port, for the server tests.

The app runs under uvicorn in a thread of the test process (so tests can read the
service's counters); clients talk to it over TCP on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import threading
import time

import numpy as np
import uvicorn

from mlx_sdxl.server.app import create_app
from mlx_sdxl.server.config import Limits, ModelOptions, ServerConfig
from mlx_sdxl.server.net import listening_socket
from mlx_sdxl.server.service import Service

TINY = dict(width=64, height=64)


class RunningServer:
    def __init__(self, config: ServerConfig):
        self.service = Service(config)
        self.service.start()
        sock = listening_socket("127.0.0.1", 0)   # the server's own socket code, on a free loopback port
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.service.shutdown()
        gc.collect()  # the app's reference cycles hold MLX arrays until collected; later tests measure memory


def make_config(base, refiner, **kw) -> ServerConfig:
    limits = kw.pop("limits", Limits(max_megapixels=0.1, max_steps=40, max_images=4, max_body_mb=1, max_queue=32))
    models = ModelOptions(str(base), str(refiner) if refiner else None, **kw.pop("models", {}))
    return ServerConfig(models, limits=limits, **kw)


def decode_png(b64: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_png(b64).convert("RGB"))


def png_b64(image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def info_of(response) -> dict:
    return json.loads(response.json()["info"])
