"""The measurements: UNet steps, VAE decode, text encoding, whole images.

Every stage loads its models, warms up, then times `repeats` runs (each ends
with mx.eval, so the time is the computation's), records the median and spread
and the peak memory since the stage began (weights included), and frees its
models before the next stage, so one full model at a time is resident.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_sdxl.models.clip import CLIPTextConfig
from mlx_sdxl.models.unet import UNetConfig
from mlx_sdxl.models.vae import VAEConfig
from mlx_sdxl.sources import BASE, REFINER, ModelSource
from mlx_sdxl.spec import DEFAULT_GUIDANCE
from mlx_sdxl.tokenizer import tokenize
from mlx_sdxl.weights import parse_dtype

from . import flops
from .models import unet_inputs

STAGES = ("unet", "vae", "text", "e2e")
PROMPT = "a photograph of an astronaut riding a horse on mars, detailed, 35mm"
NEGATIVE = "blurry, low quality"


@dataclass
class Settings:
    width: int = 1024
    height: int = 1024
    steps: int = 40
    high_noise_frac: float = 0.8
    batch: int = 2
    dtypes: List[str] = field(default_factory=lambda: ["float16"])
    repeats: int = 3
    warmup: int = 1
    refiner_bits: Optional[int] = None
    only: List[str] = field(default_factory=lambda: list(STAGES))
    compare: Optional[str] = None
    e2e_limit_minutes: float = 30.0
    low_memory: bool = False
    compile: bool = False
    few_steps: Optional[int] = None  # also time a guidance-0 base-only image of this many steps


def stats(runs: List[float]) -> dict:
    runs = [float(r) for r in runs]
    q = statistics.quantiles(runs, n=4, method="inclusive") if len(runs) > 1 else [runs[0]] * 3
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "q1": q[0], "q3": q[2],
            "mean": statistics.fmean(runs), "runs": runs}


def time_runs(fn: Callable[[], object], repeats: int, warmup: int):
    """Wall times of fn() + mx.eval of its result, after `warmup` untimed runs; and the last result."""
    for _ in range(warmup):
        mx.eval(fn())
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        mx.eval(out)
        runs.append(time.perf_counter() - t0)
    return runs, out


def free() -> None:
    gc.collect()
    mx.clear_cache()


def dtype_name(dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def param_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Runner:
    """Measures the stages for one base (and optional refiner) source."""

    def __init__(self, base: ModelSource, refiner: Optional[ModelSource], settings: Settings,
                 compare: Optional[object] = None, log: Callable[[str], None] = _say):
        self.base, self.refiner, self.s, self.compare, self.log = base, refiner, settings, compare, log
        self.results: List[dict] = []
        self.skipped: List[dict] = []

    # ------------------------------------------------------------------ helpers
    def _record(self, name: str, stage: str, dtype, runs: List[float], peak: int, load: Optional[float],
                flop: Optional[int] = None, load_peak: Optional[int] = None, **extra) -> dict:
        rec = {"name": name, "stage": stage, "dtype": dtype_name(dtype), "seconds": stats(runs),
               "peak_memory_bytes": int(peak), "load_seconds": load,
               "load_peak_memory_bytes": None if load_peak is None else int(load_peak), "flops": flop,
               "tflops_per_second": (flop / stats(runs)["median"] / 1e12) if flop else None}
        rec.update(extra)
        self.results.append(rec)
        m = rec["seconds"]
        self.log(f"  {name:<22} {rec['dtype']:<9} median {m['median']:.4g} s "
                 f"(min {m['min']:.4g}, max {m['max']:.4g}), peak {peak / 2 ** 30:.2f} GiB"
                 + (f", load {load:.3g} s" if load is not None else ""))
        return rec

    def _load(self, source: ModelSource, name: str, dtype, bits: Optional[int] = None):
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        model = source.load(name, dtype)
        if bits and name == "unet" and "unet" not in source.quantization:
            from mlx_sdxl.quantize import quantize_unet

            model = quantize_unet(model, bits=bits)
        mx.eval(model.parameters())
        seconds = time.perf_counter() - t0
        # what a step needs is the resident weights plus the step's own working memory; the
        # loading peak (a dense copy being quantized, say) is kept apart
        self.load_peak = mx.get_peak_memory()
        free()
        mx.reset_peak_memory()
        return model, seconds

    # ------------------------------------------------------------------ stages
    def unet(self, role: str, dtype, bits: Optional[int] = None) -> None:
        source = self.base if role == BASE else self.refiner
        cfg = UNetConfig.from_dict(source.configs["unet"])
        s, f = self.s, self.vae_factor
        h, w, b = s.height // f, s.width // f, s.batch
        model, load = self._load(source, "unet", dtype, bits)
        n_ids = 6 if role == BASE else 5
        inputs = unet_inputs(cfg, role, s.height, s.width, b, f)
        compiled = s.compile
        forward = model.compiled() if compiled else model
        t = mx.array(500.0)
        # a sampler's step: the prompt's cross-attention keys and values are made once per stage
        cross_kv = model.cross_attention_kv(inputs["encoder_hidden_states"])
        mx.eval(cross_kv)
        step = lambda: forward(inputs["sample"], t, inputs["encoder_hidden_states"],  # noqa: E731
                               text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"], cross_kv=cross_kv)
        runs, out = time_runs(step, s.repeats, s.warmup)
        cross_kv = None
        name = f"unet_{role}" + (f"_q{bits}" if bits else "")
        flop = flops.unet_flops(cfg, h, w, b, n_ids, cross_kv_made=False)
        rec = self._record(name, "unet", dtype, runs, mx.get_peak_memory(), load, flop, self.load_peak,
                           model=role, bits=bits, compiled=compiled, batch=b, latent_size=[h, w],
                           weights_bytes=param_bytes(model))
        if self.compare is not None and not bits:
            self.compare.unet(rec, model, inputs, out)  # frees our model's arrays as it copies them
        model = None  # frees the weights before the next stage
        free()

    def vae(self, dtype) -> None:
        s, f = self.s, self.vae_factor
        model, load = self._load(self.base, "vae", dtype)
        z = mx.random.normal((1, s.height // f, s.width // f, model.config.latent_channels), key=mx.random.key(1))
        runs, out = time_runs(lambda: model.decode(z), s.repeats, s.warmup)
        flop = flops.vae_decode_flops(model.config, s.height // f, s.width // f)
        rec = self._record("vae_decode", "vae", dtype, runs, mx.get_peak_memory(), load, flop, self.load_peak,
                           compute_dtype=dtype_name(model.compute_dtype), batch=1, image_size=[s.height, s.width])
        if self.compare is not None:
            self.compare.vae(rec, model, z, out)
        model = None  # frees the weights before the next stage
        free()

    def text(self, dtype) -> None:
        """CLIP-L and bigG on a prompt and a negative prompt (what a base run encodes)."""
        s = self.s
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        encoders, ids = [], []
        for tok_name, name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
            model = self.base.load(name, dtype)
            mx.eval(model.parameters())
            encoders.append(model)
            ids.append(mx.array(tokenize(self.base.tokenizer(tok_name), [PROMPT, NEGATIVE])))
        load = time.perf_counter() - t0
        load_peak = mx.get_peak_memory()
        mx.reset_peak_memory()

        def encode():
            h1, _ = encoders[0](ids[0], need_pooled=False)
            h2, pooled = encoders[1](ids[1])
            return mx.concatenate([h1, h2], axis=-1), pooled

        runs, out = time_runs(encode, s.repeats, s.warmup)
        flop = sum(flops.text_encoder_flops(CLIPTextConfig.from_dict(self.base.configs[n]), batch=2)
                   for n in ("text_encoder", "text_encoder_2"))
        rec = self._record("text_encode", "text", dtype, runs, mx.get_peak_memory(), load, flop, load_peak, batch=2)
        if self.compare is not None:
            self.compare.text(rec, encoders, ids, out)
        encoders = None
        free()

    def e2e(self, dtype) -> None:
        from mlx_sdxl import SDXLPipeline

        s = self.s
        estimate = self._e2e_estimate(dtype)
        if estimate is not None and s.e2e_limit_minutes and estimate / 60 > s.e2e_limit_minutes:
            reason = (f"estimated {estimate / 60:.0f} min per image from the stage timings, over "
                      f"--e2e-limit {s.e2e_limit_minutes:g} min (raise it, or use a smaller --width/--height/--steps)")
            self.skipped.append({"name": "e2e", "dtype": dtype_name(dtype), "reason": reason,
                                 "estimated_seconds": estimate})
            self.log(f"  e2e                    skipped: {reason}")
            return
        pipe = SDXLPipeline(self.base, self.refiner, dtype=dtype, refiner_bits=s.refiner_bits,
                            low_memory=s.low_memory)
        frac = s.high_noise_frac if self.refiner is not None else 1.0
        run = lambda steps: pipe.generate(PROMPT, negative_prompt=NEGATIVE,  # noqa: E731
                                          num_inference_steps=steps, width=s.width, height=s.height,
                                          high_noise_frac=frac, seed=0, output_type="np").timings
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        warmup = run(2)  # loads every model and builds the kernels
        load = sum(v for k, v in warmup.items() if k.startswith("load_"))
        self.log(f"  e2e warm-up (2 steps, models loading) {time.perf_counter() - t0:.3g} s")
        runs, per_stage = self._whole_images(run, s.steps)
        self._record("e2e", "e2e", dtype, runs, mx.get_peak_memory(), load, None, steps=s.steps,
                     high_noise_frac=frac if self.refiner is not None else None, refiner_bits=s.refiner_bits,
                     guidance_scale=DEFAULT_GUIDANCE, unet_evaluations=2 * s.steps,
                     per_stage_seconds=per_stage, image_size=[s.height, s.width])
        if s.few_steps:
            self.e2e_few_steps(pipe, dtype, load)
        pipe = None
        free()

    def _whole_images(self, run: Callable[[int], dict], steps: int):
        """Wall times of `repeats` whole images of `steps` steps, and the medians of their stage timings."""
        runs, breakdown = [], []
        for _ in range(self.s.repeats):
            t0 = time.perf_counter()
            timings = run(steps)
            runs.append(time.perf_counter() - t0)
            breakdown.append({k: (v.seconds if hasattr(v, "seconds") else v)
                              for k, v in timings.items() if not k.startswith("load_")})
        return runs, {k: statistics.median(b[k] for b in breakdown) for k in breakdown[0]}

    def e2e_few_steps(self, pipe, dtype, load: float) -> None:
        """A few-step image as Lightning / Turbo-style models run (`--few-steps N`): the base alone,
        Euler with trailing spacing, guidance 0 (no unconditional batch), in the same process as `e2e`."""
        s = self.s
        sampler = dict(scheduler="euler", timestep_spacing="trailing", guidance_scale=0.0)
        run = lambda steps: pipe.generate(PROMPT, num_inference_steps=steps, width=s.width,  # noqa: E731
                                          height=s.height, high_noise_frac=1.0, seed=0, output_type="np",
                                          **sampler).timings
        mx.reset_peak_memory()
        if s.warmup:
            run(1)  # the batch-1 shapes once, untimed
        runs, per_stage = self._whole_images(run, s.few_steps)
        self._record("e2e_few_steps", "e2e", dtype, runs, mx.get_peak_memory(), load, None, steps=s.few_steps,
                     high_noise_frac=None, refiner_bits=None, unet_evaluations=s.few_steps,
                     per_stage_seconds=per_stage, image_size=[s.height, s.width], **sampler)

    def _e2e_estimate(self, dtype) -> Optional[float]:
        """Seconds per image from this run's stage results, if they were measured."""
        got = {r["name"]: r["seconds"]["median"] for r in self.results if r["dtype"] == dtype_name(dtype)}
        if "unet_base" not in got:
            return None
        s = self.s
        n_base = round(s.steps * s.high_noise_frac) if self.refiner is not None else s.steps
        refiner = got.get(f"unet_refiner_q{s.refiner_bits}" if s.refiner_bits else "unet_refiner", got["unet_base"])
        return n_base * got["unet_base"] + (s.steps - n_base) * refiner + got.get("vae_decode", 0) \
            + got.get("text_encode", 0)

    # ------------------------------------------------------------------ all
    @property
    def vae_factor(self) -> int:
        return VAEConfig.from_dict(self.base.configs["vae"]).scale_factor

    def run(self) -> None:
        s = self.s
        dtypes = [parse_dtype(d) for d in s.dtypes]
        main = dtypes[0]
        if "text" in s.only:
            self.log("text encoders")
            self.text(main)
        if "unet" in s.only:
            for dtype in dtypes:
                self.log(f"UNets, {dtype_name(dtype)}")
                self.unet(BASE, dtype)
                if self.refiner is not None:
                    self.unet(REFINER, dtype)
                    if s.refiner_bits:
                        self.unet(REFINER, dtype, bits=s.refiner_bits)
        if "vae" in s.only:
            self.log("VAE decode")
            self.vae(main)
        if "e2e" in s.only:
            self.log(f"whole image: {s.steps} steps, {s.width}x{s.height}")
            self.e2e(main)
