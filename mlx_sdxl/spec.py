"""What mlx_sdxl knows and accepts, each fact defined once.

The pipeline, the command line, `convert/` and `bench/` all read these names and
rules, so a limit or a name changes in one place.
"""

from __future__ import annotations

import numbers
from typing import List, Sequence, Union

from .errors import InputError

# ---------------------------------------------------------------- names
BASE, REFINER = "base", "refiner"          # the two SDXL models, and the stages they run
DECODE = "decode"                          # the VAE stage, as progress callbacks name it
ENCODE = "encode"                          # the text-encoding stage, as timings name it
STAGES = (BASE, REFINER)
MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# The official weights, used when no model is named.
DEFAULT_BASE_ID = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER_ID = "stabilityai/stable-diffusion-xl-refiner-1.0"

# ---------------------------------------------------------------- generation defaults
DEFAULT_STEPS = 40
DEFAULT_GUIDANCE = 5.0
DEFAULT_HIGH_NOISE_FRAC = 0.8      # the base runs this share of the schedule, the refiner the rest
DEFAULT_STRENGTH = 0.3             # img2img: the share of the schedule re-run
DEFAULT_SCHEDULER = "euler"        # when the model's scheduler_config.json names no sampler of ours
DEFAULT_TCD_ETA = 0.3              # tcd's eta (gamma): TCDScheduler's default and the TCD paper's
DEFAULT_AESTHETIC_SCORE = 6.0      # refiner conditioning (positive / negative branch)
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5

# ---------------------------------------------------------------- prompts
# "plain": the text goes to CLIP as written, cut at 77 tokens (diffusers). "a1111": AUTOMATIC1111's
# syntax: (emphasis), [de-emphasis], (x:1.3), BREAK, and prompts past 77 tokens in 75-token chunks.
PROMPT_SYNTAXES = ("plain", "a1111")
DEFAULT_PROMPT_SYNTAX = "plain"        # the Python API: diffusers parity
CLI_PROMPT_SYNTAX = "a1111"            # the command line: prompts as A1111 / Civitai users write them
CHUNK_TOKENS = 75                      # a1111: prompt tokens per chunk (+ start and end token = CLIP's 77)
COMMA_BACKTRACK = 20                   # a1111: a full chunk ends after its last comma if it is this close
MAX_PROMPT_CHUNKS = 16                 # a1111: chunks kept (1200 tokens); bounds the UNet's text context


def check_prompt_syntax(value) -> str:
    if value not in PROMPT_SYNTAXES:
        raise InputError(f"prompt_syntax must be one of {', '.join(map(repr, PROMPT_SYNTAXES))}, got {value!r}")
    return value


# ---------------------------------------------------------------- quantization
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64

# ---------------------------------------------------------------- sizes
SIZE_MULTIPLE = 8      # the VAE halves the image three times
MIN_SIDE = 64
DEFAULT_SIDE = 1024
DEFAULT_MAX_MEGAPIXELS = 4.2   # 2048×2048 fits; raise it with max_megapixels= / --max-megapixels
MAX_IMAGES = 64                # images per call (prompts × images per prompt, or CLI seeds)
RESIZE_MODES = ("crop", "fit", "stretch")  # how an input picture meets a requested size
DEFAULT_RESIZE = "crop"
ALPHA_BACKGROUND = (255, 255, 255)  # transparent input pixels are composited over white, as A1111 does

# ---------------------------------------------------------------- LoRAs
# where `<lora:NAME:SCALE>` prompt tags find NAME.safetensors (searched recursively): --lora-dir, else
# $MLX_SDXL_LORA_DIR, else this folder
LORA_DIR_ENV = "MLX_SDXL_LORA_DIR"
DEFAULT_LORA_DIR = "~/mlx-sdxl/loras"

# ---------------------------------------------------------------- metadata
METADATA_MODES = ("minimal", "full", "none")   # identifiers only / local paths too / nothing
DEFAULT_METADATA = "minimal"

# ---------------------------------------------------------------- seeds
MAX_SEED = 2**32 - 1   # seeds are 32-bit unsigned, as in A1111 and ComfyUI

# ---------------------------------------------------------------- server (`mlx-sdxl serve`)
SERVER_HOST = "127.0.0.1"      # loopback only, unless --host says otherwise
SERVER_PORT = 7860             # AUTOMATIC1111's port, where its API clients look first
SERVER_MAX_STEPS = 150         # sampler steps per request (A1111's UI maximum)
SERVER_MAX_IMAGES = 16         # batch_size × n_iter per request
SERVER_MAX_BODY_MB = 32.0      # request body size (base64 input images make it large)
SERVER_MAX_QUEUE = 64          # requests waiting at once; more are refused with 503
SERVER_PREVIEW_EVERY = 1       # live previews at most every N sampler steps, and only while polled

# ---------------------------------------------------------------- batches (`mlx-sdxl batch`)
BATCH_LOG = "batch-log.jsonl"  # what each run of a batch did, one JSON object a line, in its output folder
BATCH_HASH_CHARS = 8           # hex digits of the settings hash in an image's name: <job>-<hash>.png
BATCH_INDEX_DIGITS = 4         # job numbers in names are zero-padded to at least this many digits
BATCH_MAX_JOBS = 100_000       # jobs (lines) one job file may hold
BATCH_MAX_FILE_MB = 64.0       # size of a job file
BATCH_STAGES = "base@0,refiner@1"  # the one stage split: text encoders + base on rank 0, refiner + VAE on rank 1

Seed = Union[int, Sequence[int], None]


def is_int(value) -> bool:
    """A real integer (numpy integers too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_side(value, name: str) -> int:
    """An image side: an integer, a multiple of SIZE_MULTIPLE, at least MIN_SIDE."""
    if not is_int(value) or value < MIN_SIDE or value % SIZE_MULTIPLE:
        raise InputError(f"{name} must be a multiple of {SIZE_MULTIPLE} and at least {MIN_SIDE}, got {value!r}")
    return int(value)


def check_pixels(width: int, height: int, max_megapixels: float, what: str = "the image") -> None:
    """Refuse sizes over the megapixel limit before any work is done."""
    if not isinstance(max_megapixels, (int, float)) or isinstance(max_megapixels, bool) \
            or not 0 < max_megapixels < float("inf"):
        raise InputError(f"max_megapixels must be a positive number, got {max_megapixels!r}")
    if width * height > max_megapixels * 1e6:
        raise InputError(f"{what} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
                         f"{max_megapixels:g}; raise the limit (max_megapixels= or --max-megapixels) if you mean it")


def check_image_count(count: int) -> None:
    if count > MAX_IMAGES:
        raise InputError(f"{count} images were asked for in one call; at most {MAX_IMAGES} are accepted")


def check_seed(value, name: str = "seed") -> int:
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        raise InputError(f"{name} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return int(value)


def image_seeds(seed: Seed, count: int, draw) -> List[int]:
    """One seed per image: a list is used as given (one per image); one seed S gives
    S, S+1, ... (wrapping at MAX_SEED); None draws S with `draw()`."""
    if isinstance(seed, (list, tuple)):
        seeds = [check_seed(s, "each seed") for s in seed]
        if len(seeds) != count:
            raise InputError(f"got {len(seeds)} seeds for {count} images; give one seed or one per image")
        return seeds
    first = check_seed(draw() if seed is None else seed)
    return [(first + i) % (MAX_SEED + 1) for i in range(count)]

