"""The two-stage SDXL pipeline: the base denoises from noise to the hand-off
point, the refiner finishes the low-noise steps, the VAE decodes.

Semantics follow diffusers' `StableDiffusionXLPipeline(denoising_end=f,
output_type="latent")` followed by `StableDiffusionXLImg2ImgPipeline(
denoising_start=f)`: one timestep grid is split at
cutoff = round(1000 - f * 1000); the base runs t >= cutoff, the refiner the rest.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .conditioning import (Prompt, as_list, base_time_ids, broadcast, guide, refiner_time_ids, size_pair,
                           time_ids_batch)
from .errors import InputError, SDXLError, WeightsError
from .schedulers import img2img_start, make_scheduler, split_for_handoff
from .sources import BASE, REFINER, ModelSource, open_source
from .tokenizer import tokenize
from .weights import parse_dtype

OUTPUT_TYPES = ("pil", "np", "latent")
LOW_MEMORY_CACHE_BYTES = 256 * 1024 * 1024


class Cancelled(Exception):
    """Raised inside the sampler when a callback returns False; never leaves the pipeline."""


@dataclass
class StageTiming:
    seconds: float = 0.0
    steps: int = 0
    peak_memory: int = 0


class SDXLPipeline:
    """SDXL base + refiner ("ensemble of expert denoisers") in MLX.

    Models load lazily on first use and stay loaded (`low_memory=True` releases
    each as soon as its stage is done). One pipeline object serves any number of
    calls, one at a time; it is safe to drive from a worker thread.
    """

    def __init__(self, base: ModelSource, refiner: Optional[ModelSource] = None, *, dtype=mx.float16,
                 refiner_bits: Optional[int] = None, low_memory: bool = False, vae: Optional[ModelSource] = None,
                 base_bits: Optional[int] = None, text_encoder_bits: Optional[int] = None,
                 group_size: int = 64, compile: bool = False):
        self.base = base
        self.refiner = refiner
        self.dtype = parse_dtype(dtype) or mx.float16
        self.refiner_bits = refiner_bits
        self.base_bits = base_bits
        self.text_encoder_bits = text_encoder_bits
        self.group_size = group_size
        if any((refiner_bits, base_bits, text_encoder_bits)):
            from .quantize import check_settings

            for bits in filter(None, (refiner_bits, base_bits, text_encoder_bits)):
                check_settings(bits, group_size)
        self.low_memory = low_memory
        if not isinstance(compile, bool):
            raise InputError(f"compile must be True or False, got {compile!r}")
        self.compile = compile
        self.vae_source = vae or base
        self._models = {}
        self._compiled = {}  # id(UNet) -> (UNet, its compiled forward), with compile=True
        self._lock = threading.RLock()
        self.last_timings = {}
        self._check_compatible()
        if low_memory:
            # keep MLX's buffer cache small so memory freed by one stage is returned, not hoarded
            mx.set_cache_limit(LOW_MEMORY_CACHE_BYTES)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, base, refiner=None, *, dtype=mx.float16, refiner_bits: Optional[int] = None,
                        low_memory: bool = False, vae=None, config=None, refiner_config=None, tokenizer=None,
                        tokenizer_2=None, base_bits: Optional[int] = None, text_encoder_bits: Optional[int] = None,
                        group_size: int = 64, compile: bool = False) -> "SDXLPipeline":
        """Load lazily from any source: a diffusers folder, a hub id, a single-file
        .safetensors checkpoint, or a folder written by `mlx-sdxl convert` (whose
        refiner/ is used unless refiner=False).

        `vae` replaces the VAE (folder or single file); `config` / `refiner_config`
        override the UNet config inferred for single files; `tokenizer` /
        `tokenizer_2` say where single files find their tokenizers. `refiner_bits`,
        `base_bits` and `text_encoder_bits` (2, 3, 4, 5, 6 or 8, with `group_size` 32,
        64 or 128) quantize those models as they load; pre-quantized converted
        folders need no flag.

        `compile=True` runs each UNet step as one compiled MLX graph. On an H200
        (MLX CUDA) that made steps 2-5% faster; a first run on a fresh machine spent
        up to 35 s building kernels, which MLX kept for later processes. With CUDA
        graphs kept it raised the 4-bit refiner's peak memory (H100: 2.5 → 3.4 GiB),
        and on the CPU backend it was slower. It has not been measured on a Mac.
        """
        from pathlib import Path

        from .sources import is_converted, vae_source

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
        return cls(base_src, refiner_src, dtype=dtype, refiner_bits=refiner_bits, low_memory=low_memory,
                   vae=vae_src, base_bits=base_bits, text_encoder_bits=text_encoder_bits, group_size=group_size,
                   compile=compile)

    def _check_compatible(self) -> None:
        b, r = self.base, self.refiner
        vae_cfg = self.vae_source.configs["vae"]
        for src in filter(None, (b, r)):
            unet = src.configs["unet"]
            if unet.get("in_channels", 4) != vae_cfg.get("latent_channels", 4):
                raise WeightsError(
                    f"the {src.role} UNet takes {unet.get('in_channels')} latent channels but the VAE makes "
                    f"{vae_cfg.get('latent_channels')}"
                )
        if r is None:
            return
        te2_b, te2_r = b.configs["text_encoder_2"], r.configs["text_encoder_2"]
        for key in ("hidden_size", "num_hidden_layers", "projection_dim", "vocab_size"):
            if te2_b.get(key) != te2_r.get(key):
                raise WeightsError(
                    f"base and refiner text_encoder_2 differ in {key} ({te2_b.get(key)} vs {te2_r.get(key)}); "
                    "an SDXL refiner must use the same OpenCLIP bigG encoder as its base"
                )
        cross = r.configs["unet"].get("cross_attention_dim")
        if cross != te2_r.get("hidden_size"):
            raise WeightsError(f"the refiner UNet attends to width {cross} but text_encoder_2 gives "
                               f"{te2_r.get('hidden_size')}")
        if r.configs["vae"].get("latent_channels") != vae_cfg.get("latent_channels"):
            raise WeightsError("base and refiner VAEs have different latent channels")

    def _model(self, source: ModelSource, name: str):
        """Load a model part once; parts with identical weights are shared across base and refiner."""
        with self._lock:
            fp = source.fingerprints.get(name) or f"{source.description}:{name}"
            key = (name, fp)
            if key not in self._models:
                t0 = time.perf_counter()
                model = source.load(name, self.dtype)
                bits = self._bits_for(source, name)
                if bits and name not in source.quantization:  # converted folders may come pre-quantized
                    from .quantize import quantize_model

                    model = quantize_model(model, bits=bits, group_size=self.group_size)
                self._models[key] = model
                self.last_timings[f"load_{source.role}_{name}"] = time.perf_counter() - t0
            return self._models[key]

    def _bits_for(self, source: ModelSource, name: str) -> Optional[int]:
        if name == "unet":
            return self.refiner_bits if source.role == REFINER else self.base_bits
        if name.startswith("text_encoder"):
            return self.text_encoder_bits
        return None

    def _release(self, source: ModelSource, name: str) -> None:
        with self._lock:
            fp = source.fingerprints.get(name) or f"{source.description}:{name}"
            model = self._models.pop((name, fp), None)
            self._compiled.pop(id(model), None)
            del model  # its weights are freed here, before the cache is emptied
        mx.clear_cache()

    @property
    def vae(self):
        return self._model(self.vae_source, "vae")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_source.configs["vae"]["block_out_channels"]) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_source.configs["vae"].get("scaling_factor", 0.13025))

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: Prompt, negative_prompt: Optional[Prompt] = None, *, stage: str = BASE,
                      prompt_2: Optional[Prompt] = None, negative_prompt_2: Optional[Prompt] = None,
                      num_images_per_prompt: int = 1, clip_skip: Optional[int] = None, do_cfg: bool = True):
        """Return (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled), like diffusers.

        Base: CLIP-L and bigG penultimate states concatenated (B, 77, 2048);
        refiner: bigG only (B, 77, 1280), fed `prompt` (diffusers ignores prompt_2
        there). With no negative prompt the base uses zeros
        (force_zeros_for_empty_prompt); the refiner encodes "".
        """
        if stage not in (BASE, REFINER):
            raise InputError(f"stage must be 'base' or 'refiner', got {stage!r}")
        source = self.base if stage == BASE else self.refiner
        if source is None:
            raise InputError("no refiner is loaded")
        prompts = as_list(prompt, "prompt")
        if stage == BASE:
            prompts_2 = as_list(prompt_2, "prompt_2") if prompt_2 is not None else prompts
            parts = [("tokenizer", "text_encoder", prompts), ("tokenizer_2", "text_encoder_2", prompts_2)]
        else:
            parts = [("tokenizer_2", "text_encoder_2", prompts)]
        self._check_batch(prompts, [p for _, _, p in parts], "prompt_2")

        def encode(parts_, skip):
            hiddens, pooled = [], None
            for tok_name, enc_name, texts in parts_:
                ids = mx.array(tokenize(source.tokenizer(tok_name), texts))
                encoder = self._model(source, enc_name)
                need_pooled = enc_name == "text_encoder_2"
                hidden, pool = encoder(ids, clip_skip=skip, need_pooled=need_pooled)
                hiddens.append(hidden)
                if need_pooled:
                    pooled = pool
            return mx.concatenate(hiddens, axis=-1) if len(hiddens) > 1 else hiddens[0], pooled

        embeds, pooled = encode(parts, clip_skip)
        zero_negative = negative_prompt is None and source.force_zeros_for_empty_prompt
        if not do_cfg:
            neg_embeds = neg_pooled = None
        elif zero_negative:
            neg_embeds, neg_pooled = mx.zeros_like(embeds), mx.zeros_like(pooled)
        else:
            neg = as_list(negative_prompt if negative_prompt is not None else "", "negative_prompt")
            neg = broadcast(neg, len(prompts), "negative_prompt")
            if stage == BASE:
                neg_2 = neg if negative_prompt_2 is None else broadcast(
                    as_list(negative_prompt_2, "negative_prompt_2"), len(prompts), "negative_prompt_2")
                neg_parts = [("tokenizer", "text_encoder", neg), ("tokenizer_2", "text_encoder_2", neg_2)]
            else:
                neg_parts = [("tokenizer_2", "text_encoder_2", neg)]
            neg_embeds, neg_pooled = encode(neg_parts, None)

        def repeat(x):
            return None if x is None else mx.repeat(x, num_images_per_prompt, axis=0)

        dtype = self.dtype
        out = [repeat(x) for x in (embeds, neg_embeds, pooled, neg_pooled)]
        return tuple(None if x is None else x.astype(dtype) for x in out)

    def _check_batch(self, prompts, lists, what):
        for texts in lists:
            if len(texts) != len(prompts):
                raise InputError(f"{what} has {len(texts)} entries but prompt has {len(prompts)}")

    # ------------------------------------------------------------------ sampling
    def _denoise(self, stage: str, unet, sched, x, indices, cond, guidance_scale, guidance_rescale, key,
                 callback, total_steps):
        """Run the scheduler steps `indices` with one mx.eval per step."""
        embeds, pooled, time_ids = cond
        do_cfg = guidance_scale > 1
        steps = list(indices)
        keys = mx.random.split(key, max(len(steps), 1))
        t0 = time.perf_counter()
        mx.reset_peak_memory()
        cross_kv = unet.cross_attention_kv(embeds)  # the prompt's keys and values, once per stage
        mx.eval(cross_kv)
        unet = self._step_forward(unet)
        for n, i in enumerate(steps):
            t = float(sched.timesteps[i])
            xin = sched.scale_model_input(x, i)
            if do_cfg:
                xin = mx.concatenate([xin, xin], axis=0)
            eps = unet(xin, t, embeds, text_embeds=pooled, time_ids=time_ids, cross_kv=cross_kv)
            if do_cfg:
                eps = guide(eps, guidance_scale, guidance_rescale)
            x = sched.step(eps, i, x, key=keys[n])
            bad = mx.any(mx.logical_not(mx.isfinite(x)))
            mx.eval(x, bad)
            if bad.item():
                raise SDXLError(
                    f"the {stage} produced NaN/inf latents at step {n + 1}/{len(steps)} (t={t:g}); "
                    "with float16 try dtype=float32 or bfloat16"
                )
            if callback is not None and callback(stage, n + 1, total_steps, x) is False:
                raise Cancelled()
        self.last_timings[stage] = StageTiming(time.perf_counter() - t0, len(steps), mx.get_peak_memory())
        return x

    def _step_forward(self, unet):
        """The UNet as each step calls it: compiled or not, per `compile`. A compiled
        forward is made once per loaded model and dropped with it (see _release)."""
        if not self.compile:
            return unet
        with self._lock:
            model, forward = self._compiled.get(id(unet), (None, None))
            if model is not unet:
                forward = unet.compiled()
                self._compiled[id(unet)] = (unet, forward)
            return forward

    def _stage_conditioning(self, stage, prompts, negative_prompt, prompt_2, negative_prompt_2, num_images,
                            clip_skip, do_cfg, ids_pos, ids_neg):
        pe, npe, pp, npp = self.encode_prompt(
            prompts, negative_prompt, stage=stage, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            num_images_per_prompt=num_images, clip_skip=clip_skip, do_cfg=do_cfg)
        ids = time_ids_batch(ids_pos, ids_neg, pe.shape[0], do_cfg)
        if do_cfg:
            pe, pp = mx.concatenate([npe, pe]), mx.concatenate([npp, pp])
        cond = (pe, pp, ids.astype(self.dtype))
        mx.eval(cond)
        return cond

    def _release_text_encoders(self) -> None:
        for source in filter(None, (self.base, self.refiner)):
            for name in ("text_encoder", "text_encoder_2"):
                self._release(source, name)

    def _validate_common(self, num_inference_steps, guidance_scale, guidance_rescale, output_type,
                         scheduler, num_images_per_prompt):
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise InputError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if not 0 <= guidance_rescale <= 1:
            raise InputError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        sched = make_scheduler(scheduler, self.base.scheduler_config)  # unknown names fail here
        sched.set_timesteps(num_inference_steps)
        return sched

    def _seed_key(self, seed):
        if seed is None:
            seed = secrets.randbelow(2**31)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        return int(seed), mx.random.key(int(seed))

    def __call__(self, prompt: Prompt, negative_prompt: Optional[Prompt] = None, *,
                 prompt_2: Optional[Prompt] = None, negative_prompt_2: Optional[Prompt] = None,
                 num_inference_steps: int = 40, high_noise_frac: float = 0.8, guidance_scale: float = 5.0,
                 guidance_rescale: float = 0.0, width: int = 1024, height: int = 1024,
                 num_images_per_prompt: int = 1, seed: Optional[int] = None, latents=None,
                 scheduler: str = "euler", aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                 original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=(0, 0), negative_target_size=None,
                 clip_skip: Optional[int] = None, output_type: str = "pil", callback: Optional[Callable] = None):
        """Generate images. Returns a list of PIL images ("pil"), an NHWC float32
        array in [0, 1] ("np"), or the final latents ("latent"); None when a
        callback cancelled the run."""
        prompts = as_list(prompt, "prompt")
        sched = self._validate_common(num_inference_steps, guidance_scale, guidance_rescale, output_type,
                                      scheduler, num_images_per_prompt)
        for name, v in (("width", width), ("height", height)):
            if not isinstance(v, int) or v < 64 or v % 8:
                raise InputError(f"{name} must be a multiple of 8 and at least 64, got {v!r}")
        if not isinstance(high_noise_frac, (int, float)) or not 0 < high_noise_frac <= 1:
            raise InputError(f"high_noise_frac must be in (0, 1], got {high_noise_frac!r}")
        if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0):
            raise InputError(f"clip_skip must be a non-negative integer, got {clip_skip!r}")
        vsf = self.vae_scale_factor
        if width % vsf or height % vsf:
            raise InputError(f"width and height must be multiples of {vsf} for this VAE")
        batch = len(prompts) * num_images_per_prompt
        channels = self.base.configs["unet"].get("in_channels", 4)
        shape = (batch, height // vsf, width // vsf, channels)
        seed, key = self._seed_key(seed)
        noise_key, base_key, refiner_key = mx.random.split(key, 3)
        if latents is None:
            noise = mx.random.normal(shape, key=noise_key)
        else:
            noise = mx.array(latents) if not isinstance(latents, mx.array) else latents
            if tuple(noise.shape) != shape:
                raise InputError(f"latents must have shape {shape} (batch, height/{vsf}, width/{vsf}, "
                                 f"{channels}), got {tuple(noise.shape)}")
        original_size = size_pair(original_size, (height, width), "original_size")
        target_size = size_pair(target_size, (height, width), "target_size")
        crops = size_pair(crops_coords_top_left, (0, 0), "crops_coords_top_left")
        neg_crops = size_pair(negative_crops_coords_top_left, (0, 0), "negative_crops_coords_top_left")
        neg_original = size_pair(negative_original_size, None, "negative_original_size")
        neg_target = size_pair(negative_target_size, None, "negative_target_size")

        use_refiner = self.refiner is not None and high_noise_frac < 1
        n_total = num_inference_steps
        n_base = split_for_handoff(sched.timesteps, high_noise_frac) if use_refiner else n_total
        do_cfg = guidance_scale > 1
        self.last_timings = {k: v for k, v in self.last_timings.items() if k.startswith("load_")}

        with self._lock:
            try:
                # encode every prompt first, so low_memory can drop the text encoders before any UNet loads
                t0 = time.perf_counter()
                cond_base = cond_refiner = None
                if n_base > 0:
                    pos, neg = base_time_ids(original_size, crops, target_size, neg_original, neg_crops,
                                                   neg_target)
                    cond_base = self._stage_conditioning(BASE, prompts, negative_prompt, prompt_2,
                                                         negative_prompt_2, num_images_per_prompt, clip_skip,
                                                         do_cfg, pos, neg)
                if use_refiner and n_base < n_total:
                    pos, neg = refiner_time_ids(original_size, crops, aesthetic_score,
                                                      neg_original or original_size, neg_crops,
                                                      negative_aesthetic_score)
                    cond_refiner = self._stage_conditioning(REFINER, prompts, negative_prompt, prompt_2,
                                                            negative_prompt_2, num_images_per_prompt, clip_skip,
                                                            do_cfg, pos, neg)
                self.last_timings["encode"] = time.perf_counter() - t0
                if self.low_memory:
                    self._release_text_encoders()

                x = noise.astype(mx.float32) * sched.init_noise_sigma
                if cond_base is not None:
                    unet = self._model(self.base, "unet")
                    x = self._denoise(BASE, unet, sched, x, range(n_base), cond_base, guidance_scale,
                                      guidance_rescale, base_key, callback, n_base)
                    del unet, cond_base
                    if self.low_memory:
                        self._release(self.base, "unet")
                if cond_refiner is not None:
                    rsched = make_scheduler(scheduler, self.base.scheduler_config)  # fresh: no multistep history
                    rsched.set_timesteps(n_total)
                    unet = self._model(self.refiner, "unet")
                    x = self._denoise(REFINER, unet, rsched, x, range(n_base, n_total), cond_refiner,
                                      guidance_scale, guidance_rescale, refiner_key, callback, n_total - n_base)
                    del unet, cond_refiner
                    if self.low_memory:
                        self._release(self.refiner, "unet")
                self.last_seed = seed
                settings = dict(
                    mode="generate", prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    guidance_rescale=guidance_rescale, high_noise_frac=high_noise_frac if use_refiner else None,
                    scheduler=scheduler, width=width, height=height, clip_skip=clip_skip,
                    aesthetic_score=aesthetic_score if use_refiner else None)
                return self._finish(x, output_type, callback, settings)
            except Cancelled:
                mx.clear_cache()
                return None

    def _settings(self, settings: dict) -> dict:
        out = {k: v for k, v in settings.items() if v is not None}
        out.update(model=self.base.description, dtype=str(self.dtype).replace("mlx.core.", ""))
        if self.refiner is not None and (settings.get("high_noise_frac") or settings.get("mode") == "refine"):
            out["refiner"] = self.refiner.description
            if self.refiner_bits:
                out["refiner_bits"] = self.refiner_bits
        if self.vae_source is not self.base:
            out["vae"] = self.vae_source.description
        return out

    def _finish(self, x, output_type, callback, settings):
        if output_type == "latent":
            return x
        t0 = time.perf_counter()
        mx.reset_peak_memory()
        images = self.decode_latents(x)
        if callback is not None and callback("decode", 1, 1, x) is False:
            raise Cancelled()
        self.last_timings["decode"] = StageTiming(time.perf_counter() - t0, 1, mx.get_peak_memory())
        if output_type == "np":
            return images
        from PIL import Image

        from .metadata import attach_metadata

        settings = self._settings(settings)
        pil = []
        for i, img in enumerate(images):
            image = Image.fromarray((img * 255).round().astype(np.uint8))
            attach_metadata(image, dict(settings, batch_index=i) if len(images) > 1 else settings)
            pil.append(image)
        return pil

    def decode_latents(self, latents: mx.array) -> np.ndarray:
        """Latents (scheduler space) → NHWC float32 images in [0, 1]."""
        vae = self.vae
        z = latents / self.scaling_factor
        if self.low_memory:
            image = vae.decode(z, tiled=True)
        else:
            image = vae.decode(z)
        image = mx.clip(image.astype(mx.float32) / 2 + 0.5, 0, 1)
        return np.array(image)

    # ------------------------------------------------------------------ img2img
    def refine(self, image, prompt: Prompt, negative_prompt: Optional[Prompt] = None, *, strength: float = 0.3,
               num_inference_steps: int = 40, guidance_scale: float = 5.0, guidance_rescale: float = 0.0,
               num_images_per_prompt: int = 1, seed: Optional[int] = None, noise=None, scheduler: str = "euler",
               aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, original_size=None,
               crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
               negative_crops_coords_top_left=(0, 0), clip_skip: Optional[int] = None,
               sample_posterior: bool = True, output_type: str = "pil", callback: Optional[Callable] = None):
        """Img2img on an existing image with the refiner (or the base when no
        refiner is loaded): VAE-encode, scale by 0.13025, noise at the first kept
        step, denoise the remaining `strength` share of the schedule."""
        prompts = as_list(prompt, "prompt")
        sched = self._validate_common(num_inference_steps, guidance_scale, guidance_rescale, output_type,
                                      scheduler, num_images_per_prompt)
        if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise InputError(f"strength must be in (0, 1], got {strength!r}")
        start = img2img_start(num_inference_steps, strength)  # refuses a strength that leaves no step
        pixels = self._image_array(image)
        batch = len(prompts) * num_images_per_prompt
        if pixels.shape[0] not in (1, batch):
            raise InputError(f"got {pixels.shape[0]} images for a batch of {batch}")
        vsf = self.vae_scale_factor
        h, w = pixels.shape[1], pixels.shape[2]
        seed, key = self._seed_key(seed)
        post_key, noise_key, step_key = mx.random.split(key, 3)
        channels = self.base.configs["unet"].get("in_channels", 4)
        shape = (batch, h // vsf, w // vsf, channels)
        if noise is not None:
            noise = noise if isinstance(noise, mx.array) else mx.array(noise)
            if tuple(noise.shape) != shape:
                raise InputError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        source = self.refiner or self.base
        stage = source.role
        original_size = size_pair(original_size, (h, w), "original_size")
        target_size = size_pair(target_size, (h, w), "target_size")
        crops = size_pair(crops_coords_top_left, (0, 0), "crops_coords_top_left")
        neg_crops = size_pair(negative_crops_coords_top_left, (0, 0), "negative_crops_coords_top_left")
        neg_original = size_pair(negative_original_size, original_size, "negative_original_size")
        do_cfg = guidance_scale > 1

        with self._lock:
            try:
                x0 = self._encode_image(pixels, sample_posterior, post_key)
                if x0.shape[0] != batch:
                    x0 = mx.repeat(x0, batch // x0.shape[0], axis=0)
                if noise is None:
                    noise = mx.random.normal(shape, key=noise_key)
                x = sched.add_noise(x0, noise.astype(mx.float32), start)
                if stage == REFINER:
                    pos, neg = refiner_time_ids(original_size, crops, aesthetic_score, neg_original,
                                                      neg_crops, negative_aesthetic_score)
                else:
                    pos, neg = base_time_ids(original_size, crops, target_size, None, neg_crops, None)
                cond = self._stage_conditioning(stage, prompts, negative_prompt, None, None,
                                                num_images_per_prompt, clip_skip, do_cfg, pos, neg)
                if self.low_memory:
                    self._release_text_encoders()
                unet = self._model(source, "unet")
                x = self._denoise(stage, unet, sched, x, range(start, num_inference_steps), cond, guidance_scale,
                                  guidance_rescale, step_key, callback, num_inference_steps - start)
                del unet, cond
                self.last_seed = seed
                settings = dict(mode="refine", prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                strength=strength, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                scheduler=scheduler, width=w, height=h, clip_skip=clip_skip,
                                aesthetic_score=aesthetic_score if stage == REFINER else None)
                return self._finish(x, output_type, callback, settings)
            except Cancelled:
                mx.clear_cache()
                return None

    def _image_array(self, image) -> np.ndarray:
        """PIL image(s) or an NHWC / HWC array in [0, 1] → float32 NHWC, sides floored to the VAE factor."""
        from PIL import Image

        vsf = self.vae_scale_factor
        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
            arrays = []
            for im in image:
                im = im.convert("RGB")
                w, h = im.size[0] - im.size[0] % vsf, im.size[1] - im.size[1] % vsf
                if (w, h) != im.size:
                    im = im.resize((w, h), Image.LANCZOS)
                arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
            if len({a.shape for a in arrays}) > 1:
                raise InputError("all images must have the same size")
            pixels = np.stack(arrays)
        else:
            try:
                pixels = np.asarray(image, dtype=np.float32)
            except (TypeError, ValueError):
                raise InputError(f"image must be a PIL image or an NHWC array in [0, 1], got "
                                 f"{type(image).__name__}") from None
            if pixels.ndim == 3:
                pixels = pixels[None]
            if pixels.ndim != 4 or pixels.shape[-1] != 3:
                raise InputError(f"image array must be (H, W, 3) or (B, H, W, 3), got {pixels.shape}")
            if pixels.shape[1] % vsf or pixels.shape[2] % vsf:
                raise InputError(f"image height and width must be multiples of {vsf}, got {pixels.shape[1:3]}")
        if pixels.shape[1] < 64 or pixels.shape[2] < 64:
            raise InputError(f"image must be at least 64x64, got {pixels.shape[2]}x{pixels.shape[1]}")
        return pixels

    def _encode_image(self, pixels: np.ndarray, sample: bool, key) -> mx.array:
        posterior = self.vae.encode(mx.array(pixels * 2 - 1))
        latents = posterior.sample(key=key) if sample else posterior.mode()
        return latents.astype(mx.float32) * self.scaling_factor
