"""SDXLPipeline: the public entry point. It loads models (through its ModelCache), turns
each call into a Plan of stages, runs the plan, and returns a GenerationResult."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Callable, Optional, Tuple

import mlx.core as mx

from ..conditioning import Prompt
from ..embeddings import EmbeddingSet
from ..errors import InputError
from ..schedulers import with_prediction_type
from ..sources import ModelSource, is_converted, open_source, vae_source
from ..spec import (BASE, DEFAULT_AESTHETIC_SCORE, DEFAULT_GROUP_SIZE, DEFAULT_GUIDANCE, DEFAULT_HIGH_NOISE_FRAC,
                    DEFAULT_MAX_MEGAPIXELS, DEFAULT_METADATA, DEFAULT_PROMPT_SYNTAX, DEFAULT_RESIZE,
                    DEFAULT_NEGATIVE_AESTHETIC_SCORE, DEFAULT_STEPS,
                    DEFAULT_STRENGTH, REFINER, Seed)
from ..quantize import check_settings
from ..weights import parse_dtype
from . import images as pixels
from .addons import AddOns
from .cache import ModelCache, Quantization
from .compat import check_compatible
from .controlnets import ControlNets, with_controls
from .plan import Plan, Request, make_plan
from .prompts import PromptTexts, encode_prompt
from .result import GenerationResult, Timings
from . import memory_estimate, runner
from .memory_estimate import MemoryEstimate
from .stage import Callback, Stage

LOW_MEMORY_CACHE_BYTES = 256 * 1024 * 1024


class SDXLPipeline(AddOns):
    """SDXL base + refiner ("ensemble of expert denoisers") in MLX.

    Models load lazily on first use and stay loaded (`low_memory=True` releases each as
    soon as its stage is done, and decodes in tiles). One pipeline serves any number of
    calls, one at a time; it is safe to call from several threads, and each call gets
    its own GenerationResult.
    """

    def __init__(self, base: ModelSource, refiner: Optional[ModelSource] = None, *, dtype=mx.float16,
                 refiner_bits: Optional[int] = None, low_memory: bool = False, vae: Optional[ModelSource] = None,
                 base_bits: Optional[int] = None, text_encoder_bits: Optional[int] = None,
                 group_size: int = DEFAULT_GROUP_SIZE, compile: bool = False,
                 controlnet_bits: Optional[int] = None):
        if not isinstance(compile, bool):
            raise InputError(f"compile must be True or False, got {compile!r}")
        self.base, self.refiner = base, refiner
        self.vae_source = vae or base
        self.dtype = parse_dtype(dtype) or mx.float16
        self.low_memory = low_memory
        self.compile = compile
        self.quantization = Quantization(base_bits, refiner_bits, text_encoder_bits, group_size)
        check_compatible(self.base, self.refiner, self.vae_source)
        self.models = ModelCache(self.dtype, self.quantization, compile)
        if controlnet_bits:
            check_settings(controlnet_bits, group_size)
        self.controlnets = ControlNets(self.dtype, controlnet_bits, group_size)
        self.embeddings = EmbeddingSet()
        self._lock = threading.RLock()
        if low_memory:
            # keep MLX's buffer cache small so memory freed by one stage is returned, not hoarded
            mx.set_cache_limit(LOW_MEMORY_CACHE_BYTES)

    @property
    def refiner_bits(self) -> Optional[int]:
        return self.quantization.refiner_bits

    @classmethod
    def from_pretrained(cls, base, refiner=None, *, dtype=mx.float16, refiner_bits: Optional[int] = None,
                        low_memory: bool = False, vae=None, config=None, refiner_config=None, tokenizer=None,
                        tokenizer_2=None, base_bits: Optional[int] = None, text_encoder_bits: Optional[int] = None,
                        group_size: int = DEFAULT_GROUP_SIZE, compile: bool = False,
                        prediction_type: Optional[str] = None,
                        controlnet_bits: Optional[int] = None) -> "SDXLPipeline":
        """Load lazily from any source: a diffusers folder, a hub id, a single-file
        .safetensors checkpoint, or a folder written by `mlx-sdxl convert` (whose
        refiner/ is used unless refiner=False).

        `vae` replaces the VAE (folder or single file); `config` / `refiner_config`
        override the UNet config inferred for single files; `tokenizer` /
        `tokenizer_2` say where single files find their tokenizers. `refiner_bits`,
        `base_bits` and `text_encoder_bits` (2, 3, 4, 5, 6 or 8, with `group_size` 32,
        64 or 128) quantize those models as they load; pre-quantized converted
        folders need no flag. `compile=True` runs each UNet step as one compiled MLX
        graph (the first step of each shape pays for the compilation).
        `prediction_type` ("epsilon", "v_prediction", "sample") says what the models predict,
        over their scheduler_config.json or, for single files, the `v_pred` key detection.
        """
        with_prediction_type(None, prediction_type)  # a bad value fails before any file is opened
        base_path = Path(str(base)).expanduser()
        if refiner is None and base_path.is_dir() and (base_path / "manifest.json").is_file() \
                and (base_path / REFINER).is_dir() and is_converted(base_path):
            refiner = base_path / REFINER
        if refiner is False or (isinstance(refiner, str) and refiner.lower() == "none"):
            refiner = None
        base_src = open_source(base, BASE, config=config, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
        near = tokenizer if tokenizer is not None else (base_path if base_path.is_dir() else None)
        refiner_src = open_source(refiner, REFINER, config=refiner_config, tokenizer=near,
                                  tokenizer_2=tokenizer_2) if refiner is not None else None
        vae_src = vae_source(vae) if vae is not None else None
        if prediction_type is not None:
            base_src, refiner_src = (None if s is None else dataclasses.replace(
                s, scheduler_config=with_prediction_type(s.scheduler_config, prediction_type))
                for s in (base_src, refiner_src))
        return cls(base_src, refiner_src, dtype=dtype, refiner_bits=refiner_bits, low_memory=low_memory,
                   vae=vae_src, base_bits=base_bits, text_encoder_bits=text_encoder_bits, group_size=group_size,
                   compile=compile, controlnet_bits=controlnet_bits)

    # ------------------------------------------------------------------ parts
    @property
    def vae(self):
        return self.models.get(self.vae_source, "vae")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_source.configs["vae"]["block_out_channels"]) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_source.configs["vae"].get("scaling_factor", 0.13025))

    def _source(self, stage: str) -> ModelSource:
        if stage not in (BASE, REFINER):
            raise InputError(f"stage must be 'base' or 'refiner', got {stage!r}")
        source = self.base if stage == BASE else self.refiner
        if source is None:
            raise InputError("no refiner is loaded")
        return source

    def encode_prompt(self, prompt: Prompt, negative_prompt: Optional[Prompt] = None, *, stage: str = BASE,
                      prompt_2: Optional[Prompt] = None, negative_prompt_2: Optional[Prompt] = None,
                      num_images_per_prompt: int = 1, clip_skip: Optional[int] = None, do_cfg: bool = True,
                      prompt_syntax: str = DEFAULT_PROMPT_SYNTAX):
        """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled), like diffusers.

        Base: CLIP-L and bigG penultimate states concatenated (B, 77, 2048); refiner:
        bigG only (B, 77, 1280), fed `prompt`. With no negative prompt the base uses
        zeros (force_zeros_for_empty_prompt); the refiner encodes "". With
        prompt_syntax="a1111" the token axis is 77 × the number of chunks.
        """
        source = self._source(stage)
        with self._lock:
            return encode_prompt(self.models.get, source, PromptTexts(prompt, negative_prompt, prompt_2,
                                                                      negative_prompt_2, prompt_syntax),
                                 dtype=self.dtype, num_images_per_prompt=num_images_per_prompt,
                                 clip_skip=clip_skip, do_cfg=do_cfg, embeddings=self.embeddings)

    def decode_latents(self, latents: mx.array):
        """Latents (scheduler space) → NHWC float32 images in [0, 1]."""
        return pixels.decode_latents(self.vae, latents, self.scaling_factor, tiled=True if self.low_memory else None)

    # ------------------------------------------------------------------ calls
    def generate(self, prompt: Prompt, negative_prompt: Optional[Prompt] = None, *,
                 prompt_2: Optional[Prompt] = None, negative_prompt_2: Optional[Prompt] = None, image=None,
                 strength: float = DEFAULT_STRENGTH, num_inference_steps: int = DEFAULT_STEPS,
                 high_noise_frac: Optional[float] = None, guidance_scale: float = DEFAULT_GUIDANCE,
                 guidance_rescale: float = 0.0, width: Optional[int] = None, height: Optional[int] = None,
                 num_images_per_prompt: int = 1, seed: Seed = None, latents=None, noise=None,
                 scheduler: Optional[str] = None, timestep_spacing: Optional[str] = None,
                 eta: Optional[float] = None, aesthetic_score: float = DEFAULT_AESTHETIC_SCORE,
                 negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 clip_skip: Optional[int] = None, sample_posterior: bool = True, mask_image=None,
                 mask_blur: float = 0.0, padding_mask_crop: Optional[int] = None, resize: str = DEFAULT_RESIZE,
                 control=(), guess_mode: bool = False,
                 output_type: str = "pil", max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
                 metadata: str = DEFAULT_METADATA, prompt_syntax: str = DEFAULT_PROMPT_SYNTAX,
                 callback: Optional[Callback] = None) -> GenerationResult:
        """Generate images and return a GenerationResult (images, seeds, settings, timings).

        Without `image`: text to image at `width`×`height` (default 1024²); the base runs
        the first `high_noise_frac` (default 0.8) of the schedule, the refiner the rest.
        With `image`: image to image: the last `strength` share of the schedule is re-run
        on the VAE-encoded image, by the base up to the hand-off and the refiner after it
        (`high_noise_frac=0`: the refiner alone, as `refine`). `width`/`height` resize the
        image (`resize`: "crop", "fit" or "stretch"); `noise` is the noise added to it and
        `sample_posterior=False` encodes it to the posterior mean.
        With `mask_image` too (white = repaint): inpainting, with a 9-channel inpainting UNet
        or by blending the known region back after every step; `mask_blur` softens the edge
        and `padding_mask_crop` repaints only a box that much around the mask.
        `control`: a list of `mlx_sdxl.Control(name, image, scale, start, end)` for ControlNets
        loaded with `load_controlnet`; they drive the base stage (`guess_mode` as diffusers).
        `seed`: one int S (images get S, S+1, ...), one per image, or None for a random one.
        Sizes over `max_megapixels` (default 4.2, i.e. 2048×2048) are refused before any work.
        `metadata`: what each image records: "minimal" (model identifiers, no paths), "full"
        (local paths too) or "none".
        `prompt_syntax`: "plain" (default; the text as written, cut at 77 tokens, as
        diffusers) or "a1111" (emphasis, BREAK, prompts of any length, as AUTOMATIC1111).
        `scheduler`: a name from `schedulers.SCHEDULERS`; None runs the model's own sampler (the
        class its scheduler_config.json names, with its settings; Euler when it names none of
        ours). `timestep_spacing` ("leading", "linspace", "trailing") overrides the model
        config's; `eta` is tcd's (0 to 1, default 0.3). With `guidance_scale` <= 1 no
        unconditional batch runs (the way to run Turbo, Lightning and Hyper-SD).
        """
        request = Request(**{k: v for k, v in locals().items() if k not in ("self", "callback")})
        plan = make_plan(request, self.base, self.refiner, self.vae_scale_factor)  # all checks, no heavy work
        if request.control:
            plan = with_controls(plan, self.controlnets.nets)
        return self._run(plan, callback)

    def __call__(self, prompt: Prompt, negative_prompt: Optional[Prompt] = None, *,
                 prompt_2: Optional[Prompt] = None, negative_prompt_2: Optional[Prompt] = None,
                 num_inference_steps: int = DEFAULT_STEPS, high_noise_frac: float = DEFAULT_HIGH_NOISE_FRAC,
                 guidance_scale: float = DEFAULT_GUIDANCE, guidance_rescale: float = 0.0,
                 width: Optional[int] = None, height: Optional[int] = None, num_images_per_prompt: int = 1,
                 seed: Seed = None, latents=None, scheduler: Optional[str] = None,
                 timestep_spacing: Optional[str] = None, eta: Optional[float] = None,
                 aesthetic_score: float = DEFAULT_AESTHETIC_SCORE,
                 negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE, original_size=None,
                 crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                 negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 clip_skip: Optional[int] = None, output_type: str = "pil",
                 max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, prompt_syntax: str = DEFAULT_PROMPT_SYNTAX,
                 image=None, strength: float = DEFAULT_STRENGTH, mask_image=None, mask_blur: float = 0.0,
                 padding_mask_crop: Optional[int] = None, resize: str = DEFAULT_RESIZE, noise=None,
                 sample_posterior: bool = True, control=(), guess_mode: bool = False,
                 callback: Optional[Callback] = None):
        """Text to image at `width`×`height` (default 1024²), or image to image / inpainting
        with `image` (and `mask_image`), as `generate` describes. Returns a list of PIL
        images ("pil"), an NHWC float32 array in [0, 1] ("np"), or the final latents
        ("latent"); None when a callback cancelled the run."""
        return self.generate(**{k: v for k, v in locals().items() if k != "self"}).images

    def refine(self, image, prompt: Prompt, negative_prompt: Optional[Prompt] = None, *,
               strength: float = DEFAULT_STRENGTH, num_inference_steps: int = DEFAULT_STEPS,
               guidance_scale: float = DEFAULT_GUIDANCE, guidance_rescale: float = 0.0,
               num_images_per_prompt: int = 1, seed: Seed = None, noise=None, scheduler: Optional[str] = None,
               timestep_spacing: Optional[str] = None, eta: Optional[float] = None,
               aesthetic_score: float = DEFAULT_AESTHETIC_SCORE,
               negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE, original_size=None,
               crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
               negative_crops_coords_top_left=(0, 0), clip_skip: Optional[int] = None,
               sample_posterior: bool = True, output_type: str = "pil",
               max_megapixels: float = DEFAULT_MAX_MEGAPIXELS, prompt_syntax: str = DEFAULT_PROMPT_SYNTAX,
               callback: Optional[Callback] = None):
        """Img2img on an existing image with the refiner (or the base when no refiner is
        loaded): VAE-encode, noise to the first kept step, denoise the remaining
        `strength` share of the schedule. Returns what `__call__` returns."""
        return self.generate(**{k: v for k, v in locals().items() if k != "self"}, high_noise_frac=0.0).images

    def estimate_memory(self, width: Optional[int] = None, height: Optional[int] = None,
                        **kwargs) -> MemoryEstimate:
        """The expected peak memory (bytes) of each stage (encode, base, refiner, decode) of
        `generate(width=, height=, **kwargs)`, from the architecture and a working-memory model
        (pipeline/memory_estimate.py), before any weights load. `kwargs`: generate()'s keywords
        (the prompt is not needed), and low_memory, base_bits, refiner_bits or text_encoder_bits
        to ask what another mode would need. `.table()` prints it; `.fits` compares the peak
        with the machine's memory."""
        return memory_estimate.for_request(self, width=width, height=height, **kwargs)

    # ------------------------------------------------------------------ running a plan (see runner.py)
    def _run(self, plan: Plan, callback: Optional[Callable]) -> GenerationResult:
        return runner.run_plan(self, plan, callback)

    # mlx_sdxl.batch runs the text encoders and the base in one process and the refiner and the
    # VAE in another (`mlx-sdxl batch --stages`); the two halves make `_run`'s images bit for bit.
    def plan(self, prompt: Prompt, **kwargs) -> Plan:
        """The checked Plan that `generate(prompt, **kwargs)` runs (no model loads)."""
        return make_plan(Request(prompt, **kwargs), self.base, self.refiner, self.vae_scale_factor)


    def run_first_stage(self, plan: Plan, callback: Optional[Callback] = None,
                        timings: Optional[Timings] = None) -> Tuple[mx.array, Tuple[Stage, ...]]:
        """Encode every stage's conditioning and run a text-to-image plan's first stage: (its
        latents, the later stages with their conditioning). Loads the text encoders and that UNet."""
        return runner.run_first_stage(self, plan, callback, timings)

    def run_last_stages(self, plan: Plan, x: mx.array, stages: Tuple[Stage, ...] = (),
                        callback: Optional[Callback] = None, timings: Optional[Timings] = None) -> GenerationResult:
        """Run `stages` (conditioned, e.g. by `run_first_stage` in another process) on the
        latents `x`, then decode: what `generate` returns for `plan`. Loads those UNets and the VAE."""
        return runner.run_last_stages(self, plan, x, stages, callback, timings)
