"""The `mlx-sdxl` command.

    mlx-sdxl generate "a red fox in snow" [--model ID|PATH] [--refiner ID|PATH|none] [--seed 1 2 3]
    mlx-sdxl generate --from fox-1.png --steps 50      # re-run stored settings, overriding some
    mlx-sdxl generate "sharper" --image photo.png --strength 0.3
    mlx-sdxl info fox-1.png
    mlx-sdxl convert ... / mlx-sdxl bench ...

Bad input exits with code 2 and one `mlx-sdxl: error: ...` line on stderr,
before any model is loaded and without writing a file. Progress goes to
stderr; the paths of the written images go to stdout, one per line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import secrets
import sys
import time
import unicodedata
import warnings
from pathlib import Path
from typing import List, Optional

from . import cli_control, cli_lora
from .errors import InputError, SDXLError
from .metadata import default_filename, read_metadata, save_png
from .progress import Progress
from .schedulers import PREDICTION_TYPES, SCHEDULERS, TIMESTEP_SPACINGS, make_scheduler
from .identity import MODEL_KEYS, MODELS_DIR_ENV, image_field, locate, models_dir, source_fields
from .tempfiles import remove_stale
from .spec import (BITS, DEFAULT_BASE_ID, DEFAULT_MAX_MEGAPIXELS, DEFAULT_METADATA, MAX_IMAGES, METADATA_MODES, DEFAULT_GUIDANCE, DEFAULT_HIGH_NOISE_FRAC, DEFAULT_REFINER_ID,
                   DEFAULT_SCHEDULER, DEFAULT_SIDE, DEFAULT_STEPS, DEFAULT_STRENGTH, MAX_SEED, MIN_SIDE,
                   SIZE_MULTIPLE, check_image_count, check_pixels, is_int)
from .spec import CLI_PROMPT_SYNTAX, DEFAULT_RESIZE, PROMPT_SYNTAXES, RESIZE_MODES
from .version import __version__

PROG = "mlx-sdxl"
DTYPES = ("float16", "bfloat16", "float32")

# Settings a run is made of; every flag below has default None so that we know
# which ones the user gave (they override what `--from IMAGE` recorded).
DEFAULTS = {
    "prompt": None,
    "negative_prompt": None,
    "model": None,
    "refiner": None,
    "vae": None,
    "num_inference_steps": DEFAULT_STEPS,
    "high_noise_frac": DEFAULT_HIGH_NOISE_FRAC,
    "guidance_scale": DEFAULT_GUIDANCE,
    "guidance_rescale": 0.0,
    "scheduler": None,  # the model's own (its scheduler_config.json), else DEFAULT_SCHEDULER
    "timestep_spacing": None,  # the model config's
    "eta": None,  # tcd only
    "prediction_type": None,  # the model's (config, or a single file's v_pred key)
    "width": None,   # DEFAULT_SIDE from text; an input image keeps its own size unless both are given
    "height": None,
    "refiner_bits": None,
    "base_bits": None,
    "low_memory": False,
    "dtype": None,  # float16 on GPU backends, float32 on the CPU backend
    "image": None,
    "strength": DEFAULT_STRENGTH,
    "mask": None,
    "controls": None,   # recorded ControlNets (see cli_control.py); set with --controlnet / --control-image
    "guess_mode": False,
    "mask_blur": 0.0,
    "padding_mask_crop": None,
    "resize": DEFAULT_RESIZE,
    "prompt_syntax": CLI_PROMPT_SYNTAX,
}
# Recorded names that are display names, not loadable paths, when they come from another tool's infotext.
_NAME_ONLY = ("model", "refiner", "vae")


class CLIError(SDXLError):
    """A bad command line (conflicting or out-of-range flags)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def default_dtype() -> str:
    """float16 where MLX runs on a GPU (Metal, CUDA); float32 on the CPU backend, where fp16 is far slower."""
    import mlx.core as mx

    for backend in ("metal", "cuda"):
        module = getattr(mx, backend, None)
        try:
            if module is not None and module.is_available():
                return "float16"
        except Exception:  # a backend module without is_available
            pass
    return "float16" if mx.default_device().type == mx.DeviceType.gpu else "float32"


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Stable Diffusion XL (base + refiner) in MLX.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    i = sub.add_parser("info", help="print the generation settings stored in a PNG")
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("--json", action="store_true", help="print the full settings as JSON")

    sub.add_parser("convert", help="convert checkpoints (see 'mlx-sdxl convert --help')", add_help=False)
    sub.add_parser("bench", help="benchmarks (see 'mlx-sdxl bench --help')", add_help=False)
    sub.add_parser("batch", help="run a file of jobs, resumably, on one or several machines "
                                 "(see 'mlx-sdxl batch --help')", add_help=False)
    sub.add_parser("serve", help="an AUTOMATIC1111-compatible API and a web page (see 'mlx-sdxl serve --help')",
                   add_help=False)
    return parser


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate images (or refine an existing one)",
                       description="Generate images with SDXL; each writes a PNG that records its settings.")
    g.add_argument("prompt", nargs="?", help="the prompt (optional with --from)")
    g.add_argument("--negative-prompt", dest="negative_prompt", metavar="TEXT")
    g.add_argument("--from", dest="from_image", metavar="IMAGE",
                   help="re-run the settings stored in IMAGE; flags given here override them")
    g.add_argument("--prompt-syntax", dest="prompt_syntax", choices=sorted(PROMPT_SYNTAXES),
                   help=f"'a1111': (emphasis:1.2), [less], BREAK and prompts past 77 tokens, as AUTOMATIC1111 reads "
                        f"them; 'plain': the text as written, cut at 77 tokens, as diffusers (default "
                        f"{CLI_PROMPT_SYNTAX})")
    g.add_argument("--embedding", dest="embeddings", action="append", default=[], metavar="PATH",
                   help="load an SDXL textual-inversion embedding (.safetensors with clip_l and clip_g); its "
                        "file name (without .safetensors) is the word that uses it in a prompt; repeatable")
    g.add_argument("--embedding-dir", dest="embedding_dir", metavar="DIR",
                   help="load the embeddings in DIR whose names the prompt or negative prompt use")
    _model_arguments(g.add_argument_group("models"))
    _sampling_arguments(g.add_argument_group("sampling"))
    _size_arguments(g.add_argument_group("size and count"))
    _memory_arguments(g.add_argument_group("memory and precision"))
    _output_arguments(g.add_argument_group("output"))
    _image_arguments(g.add_argument_group("starting from an image"))
    cli_control.add_arguments(g.add_argument_group("ControlNet"))
    cli_lora.add_arguments(g.add_argument_group("LoRA"))


def _model_arguments(group) -> None:
    group.add_argument("--model", metavar="ID|PATH",
                   help=f"the SDXL base: a hub id, diffusers folder, .safetensors checkpoint or converted folder "
                        f"(default {DEFAULT_BASE_ID}, downloaded on first use)")
    group.add_argument("--refiner", metavar="ID|PATH|none",
                   help=f"the SDXL refiner; 'none' for base only (default: {DEFAULT_REFINER_ID} when --model is "
                        "not given, else none)")
    group.add_argument("--vae", metavar="PATH", help="a replacement VAE (e.g. the fp16-fix VAE)")
    group.add_argument("--models-dir", dest="models_dir", metavar="DIR",
                   help=f"where model names recorded in a --from image are looked up (default ${MODELS_DIR_ENV})")


def _sampling_arguments(group) -> None:
    group.add_argument("--steps", dest="num_inference_steps", type=int, metavar="N", help=f"total steps (default {DEFAULT_STEPS})")
    group.add_argument("--high-noise-frac", dest="high_noise_frac", type=float, metavar="F",
                   help=f"share of the schedule the base runs before the refiner (default {DEFAULT_HIGH_NOISE_FRAC})")
    group.add_argument("--guidance", dest="guidance_scale", type=float, metavar="CFG",
                   help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE})")
    group.add_argument("--scheduler", choices=SCHEDULERS,
                   help=f"sampler (default: the one the model's scheduler_config.json names, else "
                        f"{DEFAULT_SCHEDULER})")
    group.add_argument("--timestep-spacing", dest="timestep_spacing", choices=TIMESTEP_SPACINGS,
                   help="where the steps sit on the 1000 training timesteps (default: the model config's); "
                        "'trailing' is A1111's 'SGM Uniform', what Lightning, Turbo and zero-SNR models want")
    group.add_argument("--eta", type=float, metavar="E",
                   help="tcd's eta (gamma), 0 (deterministic) to 1 (default 0.3)")
    group.add_argument("--prediction-type", dest="prediction_type", choices=PREDICTION_TYPES,
                   help="what the model predicts (default: its config's; single files: v_prediction when the "
                        "file has a 'v_pred' key, else epsilon)")


def _size_arguments(group) -> None:
    group.add_argument("--width", type=int, help=f"image width, a multiple of {SIZE_MULTIPLE} (default {DEFAULT_SIDE})")
    group.add_argument("--height", type=int, help=f"image height, a multiple of {SIZE_MULTIPLE} (default {DEFAULT_SIDE})")
    group.add_argument("--seed", dest="seeds", type=int, nargs="+", metavar="S",
                   help="one image per seed (default: a random seed, recorded in the PNG)")
    group.add_argument("--n-images", dest="n_images", type=int, metavar="N",
                   help="number of images; with one --seed S, uses seeds S, S+1, ...")
    group.add_argument("--max-megapixels", dest="max_megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                   metavar="MP", help=f"refuse larger images (default {DEFAULT_MAX_MEGAPIXELS:g} = 2048x2048)")


def _memory_arguments(group) -> None:
    group.add_argument("--refiner-bits", dest="refiner_bits", type=int, choices=BITS,
                   help="quantize the refiner UNet to this many bits")
    group.add_argument("--base-bits", dest="base_bits", type=int, choices=BITS,
                   help="quantize the base UNet to this many bits")
    group.add_argument("--low-memory", dest="low_memory", action="store_true", default=None,
                   help="release each model when its stage is done (see --dry-run for what each mode needs)")
    group.add_argument("--dtype", choices=DTYPES, help="float16 on GPU backends, float32 on CPU (default)")
    group.add_argument("--compile", action="store_true",
                   help="run each UNet step as one compiled MLX graph (the first run builds the kernels; "
                        "see the README's Performance section for when it pays)")
    group.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print the expected peak memory of each stage for these settings and exit, "
                        "generating nothing (no weights load)")


def _output_arguments(group) -> None:
    group.add_argument("--output", "-o", metavar="PATH|DIR",
                   help="a .png file (one image) or a directory (default: the current directory)")
    group.add_argument("--overwrite", action="store_true", help="replace existing files")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    group.add_argument("--metadata", choices=METADATA_MODES, default=DEFAULT_METADATA,
                   help="what each PNG records: 'minimal' = settings and model names/hashes, no paths (default); "
                        "'full' = local paths too; 'none' = nothing")


def _image_arguments(group) -> None:
    group.add_argument("--image", metavar="PATH",
                   help="img2img: start from this image; the base re-runs the last --strength of the schedule up to "
                        "the hand-off, the refiner the rest (--high-noise-frac 0: the refiner alone)")
    group.add_argument("--strength", type=float, metavar="F", help=f"share of the schedule re-run (default {DEFAULT_STRENGTH})")
    group.add_argument("--resize", choices=RESIZE_MODES,
                   help=f"how --image meets --width/--height (default {DEFAULT_RESIZE}; without them its own size)")
    group.add_argument("--mask", metavar="PATH", help="inpainting: repaint where this mask is white")
    group.add_argument("--mask-blur", dest="mask_blur", type=float, metavar="PX",
                   help="blur the mask's edge by this many pixels and blend the result over the image (default 0)")
    group.add_argument("--inpaint-only-masked", dest="padding_mask_crop", type=int, nargs="?", const=32, metavar="PAD",
                   help="repaint only a box around the mask, PAD pixels larger (default 32), at the full size")


# ---------------------------------------------------------------- settings
def resolve_settings(args) -> tuple:
    """(settings, seeds, explicit keys) from DEFAULTS, the --from image, and the flags given."""
    settings = dict(DEFAULTS)
    seeds = None
    if args.from_image:
        recorded = read_metadata(args.from_image)
        foreign = "version" not in recorded  # an A1111-style infotext: names, not paths
        for key in DEFAULTS:
            if recorded.get(key) is not None and not (foreign and key in _NAME_ONLY):
                settings[key] = recorded[key]
        if recorded.get("seed") is not None:
            seeds = [recorded["seed"]]
        settings["model_hash"] = recorded.get("model_hash")  # checked against the model found for it
        if not foreign and "prompt_syntax" not in recorded:  # made before prompt syntaxes existed
            settings["prompt_syntax"] = "plain"
        settings["embeddings"] = recorded.get("embeddings")  # compared with the embeddings loaded
        settings["loras"] = recorded.get("loras")  # loaded again unless --lora is given (cli_lora.py)
    explicit = {k for k in DEFAULTS if getattr(args, k, None) is not None}
    for key in explicit:
        settings[key] = getattr(args, key)
    if not settings["model"]:  # the official SDXL; its refiner too unless one was named (or 'none')
        settings["model"] = DEFAULT_BASE_ID
        if settings["refiner"] is None:
            settings["refiner"] = DEFAULT_REFINER_ID
    if isinstance(settings["refiner"], str) and settings["refiner"].lower() == "none":
        settings["refiner"] = None
    if args.seeds:
        seeds = list(args.seeds)
    return settings, seeds, explicit


def _check_int(value, low, flag):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CLIError(f"{flag} must be an integer >= {low}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fraction(value, flag, allow_zero=False):
    if not _is_number(value) or not ((0 <= value if allow_zero else 0 < value) and value <= 1):
        raise CLIError(f"{flag} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")


def _validate_sampler(settings: dict) -> None:
    """--scheduler, --timestep-spacing, --eta, --prediction-type (also as a --from image recorded them)."""
    name = settings["scheduler"]
    if name is not None and name not in SCHEDULERS:
        raise CLIError(f"unknown scheduler {name!r}; accepted: {', '.join(SCHEDULERS)}")
    if settings["prediction_type"] is not None and settings["prediction_type"] not in PREDICTION_TYPES:
        raise CLIError(f"unknown prediction type {settings['prediction_type']!r}; accepted: "
                       f"{', '.join(PREDICTION_TYPES)}")
    spacing, eta = settings["timestep_spacing"], settings["eta"]
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        raise CLIError(f"unknown timestep spacing {spacing!r}; accepted: {', '.join(TIMESTEP_SPACINGS)}")
    if name is not None:  # without a name the model's own sampler decides, once the model is opened
        try:
            make_scheduler(name, None, timestep_spacing=spacing, eta=eta)
        except SDXLError as e:
            raise CLIError(str(e).replace("timestep_spacing", "--timestep-spacing")) from None


def validate(settings: dict, explicit: set, args) -> None:
    """Everything that can be checked without loading a model."""
    if settings["prompt"] is None:
        raise CLIError("give a prompt (or --from IMAGE to re-use a stored one)")
    _check_int(settings["num_inference_steps"], 1, "--steps")
    _validate_image_settings(settings, explicit)
    g = settings["guidance_scale"]
    if not _is_number(g) or g < 0:
        raise CLIError(f"--guidance must be a finite number >= 0, got {g!r}")
    _check_fraction(settings["guidance_rescale"], "guidance_rescale", allow_zero=True)
    _validate_sampler(settings)
    if settings["prompt_syntax"] not in PROMPT_SYNTAXES:
        raise CLIError(f"unknown prompt syntax {settings['prompt_syntax']!r}; accepted: {', '.join(PROMPT_SYNTAXES)}")
    if settings["dtype"] is not None and settings["dtype"] not in DTYPES:
        raise CLIError(f"unknown dtype {settings['dtype']!r}; accepted: {', '.join(DTYPES)}")
    if settings["refiner"] is None:
        if "refiner_bits" in explicit:
            raise CLIError("--refiner-bits needs a refiner (--refiner ID|PATH)")
        settings["refiner_bits"] = None
    elif settings["refiner_bits"] is not None and settings["refiner_bits"] not in BITS:
        raise CLIError(f"--refiner-bits must be one of {BITS}, got {settings['refiner_bits']!r}")
    if settings["base_bits"] is not None and settings["base_bits"] not in BITS:
        raise CLIError(f"--base-bits must be one of {BITS}, got {settings['base_bits']!r}")
    if args.n_images is not None:
        _check_int(args.n_images, 1, "--n-images")
    if not _is_number(args.max_megapixels) or args.max_megapixels <= 0:
        raise CLIError(f"--max-megapixels must be a positive number, got {args.max_megapixels!r}")
    if settings["width"] is not None:
        check_pixels(settings["width"], settings["height"], args.max_megapixels)


def _validate_image_settings(settings: dict, explicit: set) -> None:
    """Size, hand-off and the image-only flags: text needs a size (1024² by default), an image keeps its own
    unless both sides are given."""
    from_image = settings["image"] is not None
    sides = [settings["width"], settings["height"]]
    if not from_image:
        settings["width"], settings["height"] = (DEFAULT_SIDE if v is None else v for v in sides)
    elif (sides[0] is None) != (sides[1] is None):
        raise CLIError("with --image give both --width and --height (to resize it), or neither")
    for flag in ("width", "height"):
        v = settings[flag]
        if v is not None and (not is_int(v) or v < MIN_SIDE or v % SIZE_MULTIPLE):
            raise CLIError(f"--{flag} must be a multiple of {SIZE_MULTIPLE} and at least {MIN_SIDE}, got {v!r}")
    _check_fraction(settings["high_noise_frac"], "--high-noise-frac", allow_zero=from_image)
    if from_image:
        _check_fraction(settings["strength"], "--strength")
    for key, flag in (("strength", "--strength"), ("mask", "--mask"), ("resize", "--resize")):
        if key in explicit and not from_image:
            raise CLIError(f"{flag} needs --image (it sets how an existing image is used)")
    for key, flag in (("mask_blur", "--mask-blur"), ("padding_mask_crop", "--inpaint-only-masked")):
        if key in explicit and settings["mask"] is None:
            raise CLIError(f"{flag} needs --mask")
    blur = settings["mask_blur"]
    if not _is_number(blur) or not 0 <= blur <= 256:
        raise CLIError(f"--mask-blur must be a number of pixels in [0, 256], got {blur!r}")
    pad = settings["padding_mask_crop"]
    if pad is not None and (not is_int(pad) or pad < 0):
        raise CLIError(f"--inpaint-only-masked must be an integer >= 0 (pixels), got {pad!r}")


def resolve_seeds(seeds: Optional[List[int]], n_images: Optional[int]) -> List[int]:
    if n_images is not None and n_images > MAX_IMAGES:
        raise CLIError(f"--n-images {n_images}: at most {MAX_IMAGES} images per run")
    if seeds is None:
        return [secrets.randbelow(MAX_SEED + 1) for _ in range(n_images or 1)]
    if n_images is not None and n_images != len(seeds):
        if len(seeds) != 1:
            raise CLIError(f"--n-images {n_images} conflicts with the {len(seeds)} seeds given; "
                           "give one seed per image, or one seed to count up from")
        seeds = [seeds[0] + i for i in range(n_images)]
    for s in seeds:
        if not is_int(s) or not 0 <= s <= MAX_SEED:
            raise CLIError(f"seeds must be integers in [0, {MAX_SEED}], got {s!r}")
    check_image_count(len(seeds))
    return seeds


def output_paths(output: Optional[str], prompt: str, seeds: List[int], overwrite: bool) -> List[Path]:
    """Where each image goes; fails (before any work) on conflicts, unwritable places and existing files."""
    target = Path(output).expanduser() if output else Path(".")
    as_dir = output is None or target.is_dir() or output.endswith(("/", os.sep)) or target.suffix == ""
    if as_dir:
        paths = [target / default_filename(prompt, s) for s in seeds]
        folder = target
    else:
        if len(seeds) > 1:
            raise CLIError(f"--output {output} is one file but {len(seeds)} images were asked for; "
                           "give a directory instead")
        if target.suffix.lower() != ".png":
            raise CLIError(f"--output must be a .png file or a directory, got {output}")
        paths, folder = [target], target.parent
    if len(set(paths)) < len(paths):
        raise CLIError("two images would get the same file name; give distinct seeds")
    # the nearest existing ancestor must be a writable directory
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"cannot write to {folder}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write to {folder}: permission denied")
    if not as_dir and not folder.is_dir():
        raise CLIError(f"cannot write {target}: directory {folder} does not exist")
    for path in paths:
        if path.is_dir():
            raise CLIError(f"{path} is a directory")
        if path.exists() and not overwrite:
            raise CLIError(f"{path} already exists (pass --overwrite to replace it)")
    return paths


def open_image(path: str, max_megapixels: float, flag: str = "--image"):
    """An input image (`flag` names it in errors), checked for size from its header before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            _check_image_size(path, im.size, max_megapixels, flag)
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise InputError(f"{flag} {path}: file not found") from None
    except Image.DecompressionBombError:
        raise InputError(f"{flag} {path} has too many pixels to be opened safely") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{flag} {path} is not a readable image ({e.__class__.__name__})") from None
    except ValueError as e:
        if isinstance(e, SDXLError):
            raise
        raise InputError(f"{flag} {path} is not a readable image ({e.__class__.__name__})") from None


def _check_image_size(path: str, size, max_megapixels: float, flag: str) -> None:
    w, h = size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InputError(f"{flag} {path} is {w}x{h}; it must be at least {MIN_SIDE}x{MIN_SIDE}")
    check_pixels(w, h, max_megapixels, f"{flag} {path}")


# ---------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    settings, seeds, explicit = resolve_settings(args)
    validate(settings, explicit, args)
    seeds = resolve_seeds(seeds, args.n_images)
    paths = output_paths(args.output, settings["prompt"], seeds, args.overwrite)
    for folder in {p.parent for p in paths if p.parent.is_dir()}:
        remove_stale(folder)  # temporaries our killed runs left there
    source_image, mask_image = (_input_image(settings, explicit, key, args.max_megapixels) for key in ("image", "mask"))
    settings["controls"] = cli_control.controls_from_args(args, settings["controls"])
    loras = cli_lora.plan_loras(settings, args)  # tags and files checked before any model loads
    folder = models_dir(args.models_dir)
    for key in MODEL_KEYS:
        if settings[key] is not None:
            settings[key] = locate(settings[key], key, folder, recorded=bool(args.from_image) and key not in explicit)
    settings["dtype"] = settings["dtype"] or default_dtype()
    refine = source_image is not None
    if not refine:
        settings["strength"] = None

    import mlx.core as mx

    from .pipeline import SDXLPipeline

    progress = Progress(quiet=args.quiet)
    pipe = SDXLPipeline.from_pretrained(
        settings["model"], settings["refiner"], dtype=getattr(mx, settings["dtype"]),
        refiner_bits=settings["refiner_bits"], base_bits=settings["base_bits"],
        low_memory=bool(settings["low_memory"]), vae=settings["vae"], compile=args.compile,
        prediction_type=settings["prediction_type"])
    guess = _memory_check(pipe, settings, (source_image, mask_image), args)
    if args.dry_run:
        print(guess.table())
        return 0
    progress.timings = pipe.models.load_seconds.copy
    _load_embeddings(pipe, args, settings, progress)
    cli_lora.load_loras(pipe, loras, progress)
    controls = cli_control.load_controls(pipe, settings["controls"], folder, bool(args.from_image) and not
                                         args.controlnets, open_image, args.max_megapixels)
    recorded_hash = "model" not in explicit and settings.pop("model_hash", None)
    if recorded_hash and recorded_hash != pipe.base.short_hash:
        progress.log(f"note: {pipe.base.name} has hash {pipe.base.short_hash}, the image recorded {recorded_hash}")
    what = (f"refine {source_image.width}x{source_image.height} image, strength {settings['strength']}" if refine
            else f"{settings['width']}x{settings['height']}")
    progress.log(f"{PROG} {__version__}: {what}, {settings['num_inference_steps']} steps "
                 f"{settings['scheduler'] or 'with the sampler of the model config'}, "
                 f"{settings['dtype']}, base {settings['model']}"
                 + (f", refiner {settings['refiner']}" if settings["refiner"] else ""))

    try:
        for n, (seed, path) in enumerate(zip(seeds, paths), 1):
            progress.begin()
            if len(seeds) > 1:
                progress.log(f"image {n}/{len(seeds)}, seed {seed}")
            _generate_one(pipe, settings, (source_image, mask_image, controls), seed, path, progress, args)
    finally:
        progress.end()  # a bar cut short by Ctrl-C or an error still gets its newline
    return 0


def _memory_check(pipe, settings: dict, inputs, args):
    """The memory estimate of these settings; a warning on stderr (also with --quiet), with the
    mode that fits, when it exceeds the machine's memory."""
    from .pipeline.memory_estimate import suggest_for, warning_text

    kwargs = generate_kwargs(settings, (*inputs[:2], ()), 0, args)  # ControlNets: not modelled
    guess = pipe.estimate_memory(**kwargs)
    if not guess.fits:
        print(f"{PROG}: warning: {warning_text(guess, suggest_for(pipe, guess.mode, **kwargs))}", file=sys.stderr)
    return guess


def _load_embeddings(pipe, args, settings: dict, progress) -> None:
    """--embedding files, then the --embedding-dir files the prompts name; a note when the
    --from image used embeddings that are not loaded now."""
    from .embeddings import named_in

    texts = [settings["prompt"], settings["negative_prompt"]]
    found = named_in(args.embedding_dir, texts) if args.embedding_dir else []
    for path in [*args.embeddings, *found]:
        pipe.load_embedding(path)
    missing = sorted(set(settings.pop("embeddings", None) or {}) - {e.token for e in pipe.embeddings})
    if missing:
        progress.log(f"note: the image used the embeddings {', '.join(missing)}, which are not loaded now "
                     "(--embedding PATH or --embedding-dir DIR)")


def _input_image(settings: dict, explicit: set, key: str, max_megapixels: float):
    """The --image or --mask as a PIL image (None when not given); a name recorded by a --from
    image must be found here."""
    value = settings[key]
    if value is None:
        return None
    if key not in explicit and not Path(value).expanduser().exists():
        raise CLIError(f"the image was made from the {key} {value!r}, which is not here; pass --{key} PATH")
    return open_image(value, max_megapixels, f"--{key}")


def generate_kwargs(settings: dict, inputs, seed: int, args) -> dict:
    """The `pipe.generate` arguments of one image (`inputs`: the opened image and mask, or Nones);
    `mlx-sdxl batch` makes its images with these too."""
    common = dict(num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                  guidance_rescale=settings["guidance_rescale"], scheduler=settings["scheduler"],
                  timestep_spacing=settings["timestep_spacing"], eta=settings["eta"],
                  seed=seed, max_megapixels=args.max_megapixels, metadata=args.metadata,
                  prompt_syntax=settings["prompt_syntax"])
    source_image, mask_image, controls = inputs
    if controls:
        common.update(control=controls, guess_mode=bool(settings["guess_mode"]))
    if source_image is not None:
        common.update(image=source_image, strength=settings["strength"], mask_image=mask_image,
                      mask_blur=settings["mask_blur"], padding_mask_crop=settings["padding_mask_crop"],
                      resize=settings["resize"])
    return dict(common, prompt=cli_lora.clean(settings["prompt"]),  # <lora:...> tags never reach CLIP
                negative_prompt=cli_lora.clean(settings["negative_prompt"]),
                high_noise_frac=settings["high_noise_frac"], width=settings["width"], height=settings["height"])


def finish_image(result, pipe, settings: dict, seed: int, args) -> tuple:
    """(the image, the settings its PNG records) of a one-image GenerationResult."""
    if result.cancelled:  # only a callback can cancel; ours never does
        raise InputError("generation was cancelled")
    image = result.images[0]
    if result.settings[0].get("embeddings"):  # {token: short hash} of those the prompts used
        settings = dict(settings, embeddings=result.settings[0]["embeddings"])
    settings = dict(settings, loras=result.settings[0].get("loras"))  # [{name, scale, hash}] of those applied
    settings = dict(settings, mode=result.settings[0]["mode"])
    ran = result.settings[0]  # the sampler that ran: the model's own when none was named
    settings.update({k: ran.get(k) for k in ("scheduler", "timestep_spacing", "eta")})
    return image, record(settings, pipe, args.metadata, seed, image)


def _generate_one(pipe, settings, inputs, seed, path, progress, args) -> None:
    from .pipeline.memory_estimate import MemoryWarning

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryWarning)  # cmd_generate said it once already
        result = pipe.generate(**generate_kwargs(settings, inputs, seed, args), callback=progress)
    image, recorded = finish_image(result, pipe, settings, seed, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, path, recorded, overwrite=args.overwrite)
    progress.summary(result.timings, time.perf_counter() - t0)
    print(path, flush=True)


def record(settings: dict, pipe, mode: str, seed: int, image) -> dict:
    """What the PNG records for this run (empty for --metadata none): the settings, with the
    models named as the metadata mode says (see mlx_sdxl/identity.py)."""
    if mode == "none":
        return {}
    out = dict(settings, seed=seed, width=image.width, height=image.height,
               image=image_field(settings["image"], mode), mask=image_field(settings["mask"], mode),
               controls=cli_control.record_controls(settings["controls"], pipe, mode) or None)
    used = {"model": pipe.base, "refiner": pipe.refiner if settings["refiner"] else None,
            "vae": pipe.vae_source if settings["vae"] else None}
    for key, source in used.items():
        out.pop(f"{key}_hash", None)
        out[key] = None
        if source is not None:
            out.update(source_fields(key, source, mode))
    return out


def printable(text: str) -> str:
    """`text` with control and format characters escaped, so a crafted PNG cannot drive the terminal."""
    return "".join(c if c == " " or not unicodedata.category(c).startswith(("C", "Z")) else
                   c.encode("unicode_escape").decode("ascii") for c in str(text))


def cmd_info(args) -> int:
    settings = read_metadata(args.image)
    if args.json:
        print(json.dumps(settings, indent=2, sort_keys=True))  # JSON escapes control characters itself
        return 0
    width = max((len(printable(k)) for k in settings), default=0)
    for key in sorted(settings):
        value = settings[key]
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        print(f"{printable(key):<{width}}  {printable(value)}")
    return 0


def delegate(command: str, argv: List[str]) -> int:
    """Run `<command>.cli:main(argv)` from the package's sibling tools (or mlx_sdxl's own, for
    `batch`), imported only when asked for."""
    module_name = {"batch": "mlx_sdxl.batch.cli", "serve": "mlx_sdxl.server.cli"}.get(command, f"{command}.cli")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name not in (command, module_name):
            raise
        print(f"{PROG}: error: '{PROG} {command}' is not available in this installation "
              f"(module {module_name} not found)", file=sys.stderr)
        return 2
    return int(module.main(argv, prog=f"{PROG} {command}") or 0)


def _fail(message: str) -> int:
    message = " ".join(str(message).split("\n"))
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("convert", "bench", "batch", "serve"):
        return delegate(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already reported
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from .signals import report, terminate_as_interrupt

    with terminate_as_interrupt():  # SIGTERM / SIGHUP unwind like Ctrl-C, so temporaries are removed
        try:
            if args.command == "info":
                return cmd_info(args)
            return cmd_generate(args)
        except SDXLError as e:
            return _fail(str(e))
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            return _fail(f"{where}{e.strerror or e}")
        except KeyboardInterrupt as e:  # Ctrl-C 130; signals.Terminated: SIGTERM 143, SIGHUP 129
            return report(PROG, e)


if __name__ == "__main__":
    sys.exit(main())
