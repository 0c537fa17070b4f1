"""`mlx-sdxl serve`: an AUTOMATIC1111-compatible /sdapi/v1 API and a web page.

    mlx-sdxl serve                                  # http://127.0.0.1:7860, the official SDXL
    mlx-sdxl serve --model ~/models/juggernaut.safetensors --models-dir ~/models --api-auth me:secret

Needs the `server` extra: pip install -e ".[server]" (".[cpu,server]" on Linux).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from ..errors import SDXLError
from ..identity import MODELS_DIR_ENV
from ..spec import (BITS, DEFAULT_BASE_ID, DEFAULT_LORA_DIR, DEFAULT_MAX_MEGAPIXELS, DEFAULT_METADATA,
                    DEFAULT_REFINER_ID, LORA_DIR_ENV, METADATA_MODES, PROMPT_SYNTAXES, SERVER_HOST,
                    SERVER_MAX_BODY_MB, SERVER_MAX_IMAGES, SERVER_MAX_QUEUE, SERVER_MAX_STEPS, SERVER_PORT,
                    SERVER_PREVIEW_EVERY)

AUTH_ENV = "MLX_SDXL_API_AUTH"
DTYPES = ("float16", "bfloat16", "float32")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Serve SDXL over AUTOMATIC1111's /sdapi/v1 API, with a web page at /.")
    m = p.add_argument_group("models")
    m.add_argument("--model", metavar="ID|PATH", help=f"the SDXL base (default {DEFAULT_BASE_ID})")
    m.add_argument("--refiner", metavar="ID|PATH|none", help=f"the refiner ({DEFAULT_REFINER_ID} with the default "
                                                             "model; none with a custom --model)")
    m.add_argument("--vae", metavar="PATH", help="a replacement VAE (e.g. the fp16-fix VAE)")
    m.add_argument("--models-dir", metavar="DIR", help=f"checkpoints clients may switch to (sd_model_checkpoint; "
                                                       f"default ${MODELS_DIR_ENV}, as for generate)")
    m.add_argument("--lora-dir", metavar="DIR", help=f"LoRAs that <lora:NAME:SCALE> prompt tags load (.safetensors, "
                                                     f"searched recursively; listed by /sdapi/v1/loras; default "
                                                     f"${LORA_DIR_ENV}, else {DEFAULT_LORA_DIR} if it exists)")
    m.add_argument("--embedding-dir", metavar="DIR", help="SDXL textual-inversion embeddings, all loaded")
    m.add_argument("--taesd", metavar="ID|PATH", help="TAESDXL for live previews (default: madebyollin/taesdxl if it "
                                                      "is in the local hub cache, else a linear latent preview)")
    m.add_argument("--vae-decoder", choices=("full", "taesd"), default="full",
                   help="decode final images with the full VAE (default) or TAESDXL (least memory, lower quality)")
    n = p.add_argument_group("network and security")
    n.add_argument("--host", default=SERVER_HOST, help=f"address to listen on (default {SERVER_HOST}, this machine "
                                                       "only; a warning is printed beyond it without --api-auth)")
    n.add_argument("--port", type=int, default=SERVER_PORT, help=f"port (default {SERVER_PORT}, A1111's)")
    n.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]",
                   help=f"require HTTP Basic authentication for everything (or set ${AUTH_ENV}, which keeps the "
                        "password out of the process list)")
    n.add_argument("--cors-allow-origins", metavar="ORIGIN[,ORIGIN]", help="web origins allowed to call the API")
    _add_limits(p.add_argument_group("request limits (over a limit: 422, or 413 for the body)"))
    o = p.add_argument_group("output, memory and precision")
    o.add_argument("--outputs", metavar="DIR", help="also save every image, with its metadata, in DIR")
    o.add_argument("--metadata", choices=METADATA_MODES, default=DEFAULT_METADATA, help="what each PNG records")
    o.add_argument("--prompt-syntax", choices=PROMPT_SYNTAXES, default="a1111", help="how prompts are read (a1111)")
    o.add_argument("--preview-every", type=int, default=SERVER_PREVIEW_EVERY, metavar="N",
                   help="make a live preview at most every N steps, and only while a client asks (default "
                        f"{SERVER_PREVIEW_EVERY})")
    o.add_argument("--refiner-bits", type=int, choices=BITS, help="quantize the refiner UNet")
    o.add_argument("--low-memory", action="store_true", help="release each model after its stage")
    o.add_argument("--dtype", choices=DTYPES, help="float16 on GPU backends, float32 on CPU (default)")
    o.add_argument("--compile", action="store_true", help="run each UNet step as one compiled MLX graph")
    return p


def _add_limits(g) -> None:
    g.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS, metavar="MP",
                   help=f"largest width × height (default {DEFAULT_MAX_MEGAPIXELS:g} = 2048x2048)")
    g.add_argument("--max-images", type=int, default=SERVER_MAX_IMAGES, metavar="N",
                   help=f"most images per request, batch_size × n_iter (default {SERVER_MAX_IMAGES})")
    g.add_argument("--max-steps", type=int, default=SERVER_MAX_STEPS, metavar="N",
                   help=f"most sampler steps per request (default {SERVER_MAX_STEPS})")
    g.add_argument("--max-body-mb", type=float, default=SERVER_MAX_BODY_MB, metavar="MB",
                   help=f"largest request body, base64 images included (default {SERVER_MAX_BODY_MB:g}; 413 above)")
    g.add_argument("--max-queue", type=int, default=SERVER_MAX_QUEUE, metavar="N",
                   help=f"most requests waiting at once (default {SERVER_MAX_QUEUE}; 503 above)")


def _models(args):
    from ..cli import default_dtype
    from ..identity import locate, models_dir
    from .config import ModelOptions

    model, refiner = args.model, args.refiner
    if not model:
        model = DEFAULT_BASE_ID
        refiner = DEFAULT_REFINER_ID if refiner is None else refiner
    if refiner is not None and refiner.lower() == "none":
        refiner = None
    folder = models_dir(args.models_dir)
    model = locate(model, "model", folder, recorded=False)
    refiner = locate(refiner, "refiner", folder, recorded=False) if refiner else None
    return ModelOptions(model, refiner, vae=args.vae, dtype=args.dtype or default_dtype(),
                        refiner_bits=args.refiner_bits if refiner else None, low_memory=args.low_memory,
                        compile=args.compile, taesd=args.taesd, vae_decoder=args.vae_decoder)


def make_config(args):
    from .config import Limits, ServerConfig, parse_credentials

    folder = lambda value: Path(value).expanduser() if value else None  # noqa: E731
    models_dir = args.models_dir or os.environ.get(MODELS_DIR_ENV)
    lora_dir = args.lora_dir or os.environ.get(LORA_DIR_ENV) or (
        DEFAULT_LORA_DIR if Path(DEFAULT_LORA_DIR).expanduser().is_dir() else None)  # the CLI's folders
    origins = tuple(o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip())
    limits = Limits(max_megapixels=args.max_megapixels, max_steps=args.max_steps, max_images=args.max_images,
                    max_body_mb=args.max_body_mb, max_queue=args.max_queue)
    return ServerConfig(_models(args), host=args.host, port=args.port,
                        credentials=parse_credentials(args.api_auth or os.environ.get(AUTH_ENV)),
                        models_dir=folder(models_dir), lora_dir=folder(lora_dir),
                        embedding_dir=folder(args.embedding_dir), outputs=folder(args.outputs), cors_origins=origins,
                        limits=limits, preview_every=args.preview_every, metadata=args.metadata)


def serve(config, prompt_syntax: str, log=print) -> None:
    """Run the server until Ctrl-C / SIGTERM; the running job is stopped at its next step."""
    import uvicorn

    from .app import create_app
    from .config import exposure_warning
    from .net import listening_socket
    from .service import Service

    warning = exposure_warning(config.host, config.credentials)
    if warning:
        log(warning)
    sock = listening_socket(config.host, config.port)
    service = Service(config, prompt_syntax)
    service.start()
    try:
        server = uvicorn.Server(uvicorn.Config(create_app(service), host=config.host, port=config.port,
                                               log_level="warning", timeout_graceful_shutdown=10))
        server.handle_exit = _stopping_jobs(server.handle_exit, service)
        host = f"[{config.host}]" if ":" in config.host and not config.host.startswith("[") else config.host
        log(f"mlx-sdxl serve: http://{host}:{sock.getsockname()[1]}/ (API at /sdapi/v1; base "
            f"{service.models.default.title}, refiner {getattr(service.models.default_refiner, 'title', 'none')}, "
            f"previews {service.decoders.kind})")
        server.run(sockets=[sock])
    finally:
        service.shutdown()
        sock.close()


def _stopping_jobs(handle_exit, service):
    """Ctrl-C also stops the running job at its next step and drops the waiting ones, so the
    connections close and the server can stop."""
    def handle(sig, frame):
        service.worker.close()
        service.state.close()
        handle_exit(sig, frame)
    return handle


def main(argv: Optional[List[str]] = None, prog: str = "mlx-sdxl serve") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        print(f"{prog}: error: the server needs FastAPI and uvicorn ({e.name} is missing); install the 'server' "
              "extra: pip install -e \".[server]\" (\".[cpu,server]\" on Linux)", file=sys.stderr)
        return 2
    try:
        config = make_config(args)
        serve(config, args.prompt_syntax, log=lambda text: print(text, file=sys.stderr, flush=True))
    except SDXLError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
