"""End-to-end parity with diffusers: base (denoising_end) → refiner (denoising_start)."""

import numpy as np
import pytest
import torch

import mlx.core as mx

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.errors import InputError, SDXLError, WeightsError

torch.set_grad_enabled(False)
PROMPT = "a photo of a cat"
H, W = 64, 64


@pytest.fixture(scope="module")
def pipes(tiny_sdxl):
    base_dir, refiner_dir, base, refiner = tiny_sdxl
    ours = SDXLPipeline.from_pretrained(base_dir, refiner_dir, dtype=mx.float32)
    return ours, base, refiner


def _use_scheduler(pipe, name):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from tiny import SCHEDULER_CONFIG as cfg  # fresh each time: from_config would carry e.g. karras over
    pipe.scheduler = {
        "euler": lambda: EulerDiscreteScheduler.from_config(cfg),
        "ddim": lambda: DDIMScheduler.from_config(cfg),
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(cfg),
        "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True),
    }[name]()


def _noise(batch, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, h // 8, w // 8, 4)).astype(np.float32)


def reference(base, refiner, noise, *, steps=10, frac=0.8, scheduler="euler", base_only=False, **kw):
    _use_scheduler(base, scheduler)
    _use_scheduler(refiner, scheduler)
    lat = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
    h, w = noise.shape[1] * 8, noise.shape[2] * 8
    common = dict(num_inference_steps=steps, height=h, width=w, **kw)
    if base_only:
        return None, base(latents=lat, output_type="np", **common).images
    handoff = base(latents=lat, denoising_end=frac, output_type="latent", **common).images
    refiner_kw = {k: v for k, v in common.items() if k not in ("height", "width", "prompt_2", "negative_prompt_2")}
    final = {}

    def grab(pipe, i, t, tensors):
        final["latents"] = tensors["latents"].permute(0, 2, 3, 1).numpy()
        return tensors

    images = refiner(image=handoff, denoising_start=frac, output_type="np", callback_on_step_end=grab,
                     **refiner_kw).images
    reference.final_latents = final["latents"]
    return handoff.permute(0, 2, 3, 1).numpy(), images


def ours_run(pipe, noise, *, steps=10, frac=0.8, **kw):
    captured = {}

    def grab(stage, step, total, latents):
        if stage in ("base", "refiner") and step == total:
            captured[stage] = np.array(latents)

    h, w = noise.shape[1] * 8, noise.shape[2] * 8
    images = pipe(latents=mx.array(noise), num_inference_steps=steps, high_noise_frac=frac, height=h, width=w,
                  output_type="np", callback=grab, **kw)
    ours_run.final_latents = captured.get("refiner")
    return captured.get("base"), images


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CASES = {
    "euler": dict(scheduler="euler"),
    "dpmpp_2m_karras": dict(scheduler="dpmpp_2m_karras"),
    "ddim": dict(scheduler="ddim"),
    "rescale": dict(guidance_rescale=0.7),
    "negative": dict(negative_prompt="blurry ugly"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_stage_matches_diffusers(pipes, case):
    ours, base, refiner = pipes
    kw = CASES[case]
    noise = _noise(1, H, W, seed=1)
    ref_h, ref_img = reference(base, refiner, noise, prompt=PROMPT, **kw)
    got_h, got_img = ours_run(ours, noise, prompt=PROMPT, **kw)
    assert rel_l2(got_h, ref_h) <= 1e-4
    assert rel_l2(ours_run.final_latents, reference.final_latents) <= 1e-4
    assert np.abs(got_img - ref_img).mean() <= 2e-3
    assert got_img.shape == ref_img.shape and got_img.dtype == np.float32
    assert ref_img.std() > 0.05  # the tiny VAE's images vary enough for the comparison to mean something


def test_non_square(pipes):
    ours, base, refiner = pipes
    noise = _noise(1, 64, 96, seed=2)
    ref_h, ref_img = reference(base, refiner, noise, prompt=PROMPT)
    got_h, got_img = ours_run(ours, noise, prompt=PROMPT)
    assert got_img.shape == (1, 64, 96, 3)
    assert rel_l2(got_h, ref_h) <= 1e-4
    assert np.abs(got_img - ref_img).mean() <= 2e-3


def test_batch_two_images_per_prompt(pipes):
    ours, base, refiner = pipes
    noise = _noise(2, H, W, seed=3)
    ref_h, ref_img = reference(base, refiner, noise, prompt=PROMPT, num_images_per_prompt=2)
    got_h, got_img = ours_run(ours, noise, prompt=PROMPT, num_images_per_prompt=2)
    assert got_img.shape == (2, H, W, 3)
    assert rel_l2(got_h, ref_h) <= 1e-4
    assert np.abs(got_img - ref_img).mean() <= 2e-3
    assert np.abs(got_img[0] - got_img[1]).mean() > 1e-3  # different noise, different images


def test_base_only(pipes, tiny_sdxl):
    ours, base, refiner = pipes
    noise = _noise(1, H, W, seed=4)
    _, ref_img = reference(base, refiner, noise, prompt=PROMPT, base_only=True)
    base_only = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32)
    _, got = ours_run(base_only, noise, prompt=PROMPT)
    assert np.abs(got - ref_img).mean() <= 2e-3
    _, got_frac1 = ours_run(ours, noise, prompt=PROMPT, frac=1.0)  # high_noise_frac=1 skips the refiner
    assert np.abs(got_frac1 - ref_img).mean() <= 2e-3


def test_refine_matches_diffusers_img2img(pipes, monkeypatch):
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_mod
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    ours, base, refiner = pipes
    _use_scheduler(refiner, "euler")
    rng = np.random.default_rng(5)
    image = rng.uniform(0, 1, (1, 64, 96, 3)).astype(np.float32)
    noise = rng.standard_normal((1, 8, 12, 4)).astype(np.float32)
    # diffusers draws the img2img noise with randn_tensor and samples the posterior;
    # use our noise and the posterior mean on both sides
    monkeypatch.setattr(img2img_mod, "randn_tensor", lambda *a, **k: torch.from_numpy(noise).permute(0, 3, 1, 2))
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    ref = refiner(prompt=PROMPT, image=torch.from_numpy(image).permute(0, 3, 1, 2), strength=0.3,
                  num_inference_steps=20, output_type="np").images
    got = ours.refine(image, PROMPT, strength=0.3, num_inference_steps=20, noise=noise, sample_posterior=False,
                      output_type="np")
    assert got.shape == ref.shape
    assert np.abs(got - ref).mean() <= 2e-3


def test_encode_prompt_negative_rules(pipes):
    ours, _, _ = pipes
    pe, npe, pp, npp = ours.encode_prompt(PROMPT, stage="base")
    assert pe.shape == (1, 77, 128) and pp.shape == (1, 64)
    assert float(mx.abs(npe).max()) == 0 and float(mx.abs(npp).max()) == 0  # force_zeros_for_empty_prompt
    pe_r, npe_r, pp_r, npp_r = ours.encode_prompt(PROMPT, stage="refiner")
    assert pe_r.shape == (1, 77, 64)
    assert float(mx.abs(npe_r).max()) > 0  # the refiner encodes ""
    _, npe_empty, _, _ = ours.encode_prompt(PROMPT, "", stage="base")
    assert float(mx.abs(npe_empty).max()) > 0  # an explicit "" is encoded, not zeroed
    pe2, *_ = ours.encode_prompt([PROMPT, "a red car"], stage="base", num_images_per_prompt=2)
    assert pe2.shape[0] == 4
    np.testing.assert_array_equal(np.array(pe2[0]), np.array(pe2[1]))


def test_euler_ancestral_seeded(pipes):
    ours, _, _ = pipes
    kw = dict(num_inference_steps=6, height=64, width=64, scheduler="euler_a", output_type="np")
    a = ours(PROMPT, seed=7, **kw)
    b = ours(PROMPT, seed=7, **kw)
    c = ours(PROMPT, seed=8, **kw)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3


def test_cancel_returns_none(pipes):
    ours, _, _ = pipes
    seen = []

    def cb(stage, step, total, latents):
        seen.append((stage, step))
        return step < 2

    assert ours(PROMPT, num_inference_steps=6, height=64, width=64, seed=1, callback=cb) is None
    assert seen == [("base", 1), ("base", 2)]


@pytest.mark.parametrize("kw, match", [
    (dict(width=100), "multiple of 8"),
    (dict(height=32), "at least 64"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(high_noise_frac=0.0), "high_noise_frac"),
    (dict(high_noise_frac=1.5), "high_noise_frac"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(scheduler="nope"), "euler"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents must have shape"),
])
def test_bad_inputs(pipes, kw, match):
    ours, _, _ = pipes
    args = dict(num_inference_steps=4, height=64, width=64)
    args.update(kw)
    with pytest.raises(SDXLError, match=match):
        ours(PROMPT, **args)


def test_refiner_as_base_refused(tiny_sdxl):
    with pytest.raises(WeightsError, match="refiner"):
        SDXLPipeline.from_pretrained(tiny_sdxl[1])
    with pytest.raises(WeightsError, match="base model"):
        SDXLPipeline.from_pretrained(tiny_sdxl[0], refiner=tiny_sdxl[0])


def test_shared_parts_loaded_once(pipes):
    ours, _, _ = pipes
    ours(PROMPT, num_inference_steps=4, height=64, width=64, seed=0, output_type="latent")
    assert ours.models.get(ours.refiner, "text_encoder_2") is ours.models.get(ours.base, "text_encoder_2")
    assert ours.models.get(ours.refiner, "vae") is ours.models.get(ours.base, "vae")


def test_low_memory_mode_releases_and_matches(pipes, tiny_sdxl):
    ours, _, _ = pipes
    kw = dict(num_inference_steps=5, height=64, width=64, seed=11, output_type="np")
    ref = ours(PROMPT, **kw)
    previous_limit = mx.set_cache_limit(1 << 40)
    mx.set_cache_limit(previous_limit)
    lean = SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32, low_memory=True)
    try:
        result = lean.generate(PROMPT, **kw)
        np.testing.assert_array_equal(result.images, ref)
        loaded = {name for name, _ in lean.models.loaded()}
        assert loaded == {"vae"}, loaded  # text encoders and both UNets were released after their stage
        assert {"base", "refiner", "decode"} <= set(result.timings)
        assert result.timings["base"].peak_memory > 0
    finally:
        assert mx.set_cache_limit(previous_limit) == 256 * 1024 * 1024  # low_memory had capped MLX's cache


def test_nan_latents_name_the_stage_and_step(pipes, monkeypatch):
    ours, _, _ = pipes
    unet = ours.models.get(ours.refiner, "unet")
    real_call = type(unet).__call__

    def poisoned(self, sample, *args, **kwargs):
        out = real_call(self, sample, *args, **kwargs)
        return out * mx.array(float("nan")) if self is unet else out

    monkeypatch.setattr(type(unet), "__call__", poisoned)
    with pytest.raises(SDXLError, match=r"refiner produced NaN/inf latents at step 1/"):
        ours(PROMPT, num_inference_steps=10, height=64, width=64, seed=0)


def test_mismatched_base_and_refiner_refused(tiny_sdxl):
    from mlx_sdxl.sources import diffusers_folder

    base = diffusers_folder(tiny_sdxl[0])
    refiner = diffusers_folder(tiny_sdxl[1])
    refiner.configs["text_encoder_2"] = dict(refiner.configs["text_encoder_2"], hidden_size=96)
    with pytest.raises(WeightsError, match="text_encoder_2 differ in hidden_size"):
        SDXLPipeline(base, refiner, dtype=mx.float32)
    refiner = diffusers_folder(tiny_sdxl[1])
    refiner.configs["vae"] = dict(refiner.configs["vae"], latent_channels=16)
    with pytest.raises(WeightsError, match="latent channels"):
        SDXLPipeline(base, refiner, dtype=mx.float32)


def test_compiled_steps_match_eager(pipes, tiny_sdxl):
    ours, _, _ = pipes
    assert ours.compile is False and ours.models.forward(ours.models.get(ours.base, "unet")) is \
        ours.models.get(ours.base, "unet")  # op by op unless asked
    kw = dict(num_inference_steps=6, height=64, width=80, seed=5, output_type="np")
    ref = ours(PROMPT, **kw)
    compiled = SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32, compile=True)
    np.testing.assert_allclose(compiled(PROMPT, **kw), ref, atol=2e-6)
    unet = compiled.models.get(compiled.base, "unet")
    assert compiled.models.forward(unet) is compiled.models.forward(unet)  # made once per model
    assert id(unet) in compiled.models._compiled
    compiled.models.release(compiled.base, "unet")
    assert id(unet) not in compiled.models._compiled  # dropped with its model
    with pytest.raises(InputError, match="compile"):
        SDXLPipeline.from_pretrained(tiny_sdxl[0], compile="yes")



def test_cross_attention_keys_and_values_made_once_per_stage(pipes, monkeypatch):
    """The text context's keys and values are projected once per stage, not in every step."""
    from mlx_sdxl.models.blocks import Attention

    ours, _, _ = pipes
    calls = []
    real_kv = Attention.kv

    def counted(self, context):
        calls.append(id(self))
        return real_kv(self, context)

    monkeypatch.setattr(Attention, "kv", counted)
    ours(PROMPT, num_inference_steps=10, height=64, width=64, seed=0, output_type="np")
    for source, steps in ((ours.base, 8), (ours.refiner, 2)):
        blocks = ours.models.get(source, "unet").transformer_blocks()
        assert blocks and all(calls.count(id(b.attn2)) == 1 for b in blocks)  # cross-attention: once
        assert all(calls.count(id(b.attn1)) == steps for b in blocks)  # self-attention: every step
