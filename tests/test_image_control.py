"""Starting from a picture, against diffusers: img2img on the base (with and without the
refiner hand-off), inpainting with 9- and 4-channel UNets, and padding_mask_crop."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.errors import InputError, WeightsError

torch.set_grad_enabled(False)
PROMPT = "a photo of a cat"
TOL = 2e-3
LATENT_TOL = 1e-4  # relative L2, as the other parity tests


def rel_l2(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def ours(tiny_sdxl):
    return SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32)


@pytest.fixture(scope="module")
def inpaint9(tiny_sdxl, tmp_path_factory):
    """The tiny base with a 9-channel (inpainting) UNet, saved in diffusers layout."""
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from tiny import _randomize

    base = tiny_sdxl[2]
    config = dict(base.unet.config)
    config["in_channels"] = 9
    unet = _randomize(UNet2DConditionModel.from_config(config).eval(), 41, 0.05)
    pipe = StableDiffusionXLInpaintPipeline(**{**base.components, "unet": unet}, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("inpaint9") / "base"
    pipe.save_pretrained(str(folder))
    return folder, pipe


def _picture(seed, w=64, h=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mask(w=64, h=64):
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse((14, 10, 50, 44), fill=255)  # not a rectangle
    return mask


def _noise(seed, w=64, h=64):
    return np.random.default_rng(seed).standard_normal((1, h // 8, w // 8, 4)).astype(np.float32)


@pytest.fixture()
def same_noise(monkeypatch):
    """diffusers draws the added noise with randn_tensor and samples the posterior; give both
    sides the same noise and the posterior mean."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_mod
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as inpaint_mod
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    holder = {}

    def use(noise):
        holder["noise"] = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()

    fake = lambda *a, **k: holder["noise"].clone()  # noqa: E731
    monkeypatch.setattr(img2img_mod, "randn_tensor", fake)
    monkeypatch.setattr(inpaint_mod, "randn_tensor", fake)
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    return use


def _img2img_pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(tiny_sdxl[2])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("strength", [0.3, 0.8])
@pytest.mark.parametrize("handoff", [False, True])
def test_base_img2img_matches_diffusers(ours, tiny_sdxl, same_noise, strength, handoff):
    picture, noise = _picture(1), _noise(2)
    same_noise(noise)
    common = dict(num_inference_steps=10, strength=strength, output_type="np")
    if handoff:
        latents = _img2img_pipe(tiny_sdxl)(PROMPT, image=picture, denoising_end=0.8, **{**common,
                                                                                       "output_type": "latent"}).images
        ref = tiny_sdxl[3](PROMPT, image=latents, denoising_start=0.8, num_inference_steps=10, output_type="np").images
    else:
        ref = _img2img_pipe(tiny_sdxl)(PROMPT, image=picture, **common).images
    got = ours.generate(PROMPT, image=picture, noise=noise, sample_posterior=False,
                        high_noise_frac=0.8 if handoff else 1.0, **common)
    assert np.abs(got.images - ref).mean() <= TOL
    latent = dict(common, output_type="latent", noise=noise, sample_posterior=False)
    plain = ours.refine(picture, PROMPT, **latent)
    ours_latents = ours.generate(PROMPT, image=picture, high_noise_frac=0.8 if handoff else 1.0, **latent).images
    assert rel_l2(ours_latents, plain) > 10 * LATENT_TOL  # the base's img2img is not the refiner's
    assert ("refiner" in got.timings) == handoff


def test_inpainting_with_a_4_channel_unet(ours, tiny_sdxl, same_noise):
    from diffusers import StableDiffusionXLInpaintPipeline

    picture, mask, noise = _picture(3), _mask(), _noise(4)
    same_noise(noise)
    pipe = StableDiffusionXLInpaintPipeline.from_pipe(tiny_sdxl[2])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=10, strength=0.99, guidance_scale=5.0, output_type="np")
    ref = pipe(PROMPT, image=picture, mask_image=mask, **kw).images
    got = ours.generate(PROMPT, image=picture, mask_image=mask, noise=noise, sample_posterior=False,
                        high_noise_frac=1.0, **kw).images
    assert np.abs(got - ref).mean() <= TOL
    plain = ours.generate(PROMPT, image=picture, noise=noise, sample_posterior=False, high_noise_frac=1.0,
                          **kw).images
    assert np.abs(got - plain).mean() > 10 * TOL  # the blend keeps the known region


def test_inpainting_with_a_9_channel_unet(inpaint9, same_noise):
    folder, pipe = inpaint9
    ours9 = SDXLPipeline.from_pretrained(folder, dtype=mx.float32)
    picture, mask, noise = _picture(5), _mask(), _noise(6)
    same_noise(noise)
    kw = dict(num_inference_steps=8, strength=0.99, guidance_scale=5.0, output_type="np")
    ref = pipe(PROMPT, image=picture, mask_image=mask, **kw).images
    got = ours9.generate(PROMPT, image=picture, mask_image=mask, noise=noise, sample_posterior=False, **kw).images
    assert np.abs(got - ref).mean() <= TOL
    latent = dict(kw, output_type="latent", noise=noise, sample_posterior=False)
    a = ours9.generate(PROMPT, image=picture, mask_image=mask, **latent).images
    b = ours9.generate(PROMPT, image=picture, mask_image=_mask().rotate(90), **latent).images
    assert rel_l2(a, b) > 10 * LATENT_TOL  # the UNet reads the mask
    with pytest.raises(InputError, match="inpainting model"):
        ours9(PROMPT, num_inference_steps=2, width=64, height=64)


def test_padding_mask_crop_matches_diffusers(ours, tiny_sdxl, same_noise):
    from diffusers import StableDiffusionXLInpaintPipeline

    picture = _picture(7, 128, 96)
    mask = Image.new("L", (128, 96), 0)
    ImageDraw.Draw(mask).polygon([(70, 20), (110, 30), (90, 60)], fill=255)
    noise = _noise(8)
    same_noise(noise)
    pipe = StableDiffusionXLInpaintPipeline.from_pipe(tiny_sdxl[2])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=8, strength=0.99, guidance_scale=5.0, width=64, height=64)
    ref = np.asarray(pipe(PROMPT, image=picture, mask_image=mask, padding_mask_crop=4, **kw).images[0])
    got = ours.generate(PROMPT, image=picture, mask_image=mask, padding_mask_crop=4, noise=noise,
                        sample_posterior=False, high_noise_frac=1.0, **kw).images[0]
    assert got.size == picture.size
    assert np.abs(np.asarray(got, np.float32) - ref).mean() / 255 <= TOL
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(np.asarray(got)[outside], np.asarray(picture)[outside])  # pasted back


def test_refiner_keeps_the_blend_after_an_inpainting_base(ours):
    """After the last (refiner) step the known region is the image's own latents."""
    from mlx_sdxl.pipeline.images import encode_images, image_batch

    picture, mask, noise = _picture(9), _mask(), _noise(10)
    kw = dict(num_inference_steps=10, strength=0.99, noise=noise, sample_posterior=False)
    both = ours.generate(PROMPT, image=picture, mask_image=mask, high_noise_frac=0.8, output_type="latent", **kw)
    assert (both.timings["base"].steps, both.timings["refiner"].steps) == (7, 2)
    x0 = np.array(encode_images(ours.vae, image_batch(picture, 8, 4.2), ours.scaling_factor, None, 1))
    keep = (np.asarray(mask)[::8, ::8] < 128)[None, :, :, None].repeat(4, axis=-1)
    latents = np.array(both.images)
    np.testing.assert_allclose(latents[keep], x0[keep], rtol=1e-6, atol=1e-6)
    unmasked = np.array(ours.generate(PROMPT, image=picture, high_noise_frac=0.8, output_type="latent", **kw).images)
    assert np.abs(unmasked[keep] - x0[keep]).mean() > 1e-2  # without the mask it would have changed


@pytest.mark.parametrize("mode", ["crop", "fit", "stretch"])
def test_resize_modes_match_diffusers_geometry(mode):
    from diffusers.image_processor import VaeImageProcessor

    from mlx_sdxl.pipeline.images import image_batch

    picture = _picture(11, 120, 72)
    ref = VaeImageProcessor(vae_scale_factor=8).resize(picture, 64, 96, resize_mode={
        "crop": "crop", "fit": "fill", "stretch": "default"}[mode])
    got = image_batch(picture, 8, 4.2, size=(96, 64), resize=mode)[0]
    np.testing.assert_allclose(got, np.asarray(ref, np.float32) / 255, atol=1e-6)


def test_bad_masks_and_sizes(ours):
    picture = _picture(12)
    with pytest.raises(InputError, match="all black"):
        ours.generate(PROMPT, image=picture, mask_image=Image.new("L", (64, 64)), num_inference_steps=4)
    with pytest.raises(InputError, match="strength"):
        ours.generate(PROMPT, image=picture, strength=0, num_inference_steps=4)
    with pytest.raises(InputError, match="resize must be one of"):
        ours.generate(PROMPT, image=picture, width=64, height=64, resize="zoom", num_inference_steps=4)
    big_mask = _mask(128, 128)  # another size: resized to the image, with a note
    with pytest.warns(UserWarning, match="mask is 128x128 but the image 64x64"):
        result = ours.generate(PROMPT, image=picture, mask_image=big_mask, num_inference_steps=4, strength=0.5,
                               output_type="np")
    assert result.images.shape == (1, 64, 64, 3)


def test_inpainting_unet_is_accepted_only_with_its_channels(tiny_sdxl, inpaint9):
    from mlx_sdxl.sources import diffusers_folder

    source = diffusers_folder(inpaint9[0])
    source.configs["unet"] = dict(source.configs["unet"], in_channels=7)
    with pytest.raises(WeightsError, match="input channels"):
        SDXLPipeline(source, dtype=mx.float32)


def test_cli_img2img_and_inpainting_replay_from_their_png(tiny_sdxl, tmp_path):
    from test_cli import run

    from mlx_sdxl.metadata import read_metadata

    picture, mask = _picture(13), _mask()
    picture.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    common = ["--model", tiny_sdxl[0], "--refiner", tiny_sdxl[1], "--dtype", "float32", "--steps", "6", "--seed",
              "4", "-q", "--metadata", "full"]
    rc, _, err = run("generate", "a cat", *common, "--image", tmp_path / "in.png", "--strength", "0.6",
                     "-o", tmp_path / "img2img.png")
    assert rc == 0, err
    s = read_metadata(tmp_path / "img2img.png")
    assert (s["mode"], s["strength"], s["high_noise_frac"]) == ("img2img", 0.6, 0.8)
    rc, _, err = run("generate", "a cat", *common, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                     "--strength", "0.99", "--mask-blur", "2", "--width", "64", "--height", "64",
                     "-o", tmp_path / "inpaint.png")
    assert rc == 0, err
    with Image.open(tmp_path / "inpaint.png") as im:
        assert "Mask blur: 2.0" in im.text["parameters"] and "Denoising strength: 0.99" in im.text["parameters"]
        made = np.asarray(im).copy()
    outside = np.asarray(mask) == 0
    assert np.abs(made[outside].astype(int) - np.asarray(picture)[outside]).mean() < 2  # pasted over the original
    rc, _, err = run("generate", "--from", tmp_path / "inpaint.png", "-q", "-o", tmp_path / "again.png")
    assert rc == 0, err
    with Image.open(tmp_path / "again.png") as im:
        np.testing.assert_array_equal(np.asarray(im), made)
    rc, _, err = run("generate", "a cat", *common, "--mask", tmp_path / "mask.png", "-o", tmp_path / "x.png")
    assert rc == 2 and "--mask needs --image" in err


def test_single_file_inpainting_checkpoint_is_detected(tmp_path):
    """A single SGM file whose first conv takes 9 channels loads as an inpainting base."""
    import diffusers

    from sgm_inverse import write_sgm_checkpoint
    from test_single_file import BASE, HEAD_DIM, state_dicts, tiny_models

    from mlx_sdxl.single_file import load_single_file

    models = tiny_models(BASE)
    config = {k: v for k, v in models["unet"].config.items() if k != "_use_default_values"}
    config["in_channels"] = 9
    models["unet"] = diffusers.UNet2DConditionModel.from_config(config)
    sds = state_dicts(models)
    path = tmp_path / "sd_xl_inpaint.safetensors"
    write_sgm_checkpoint(path, sds["unet"], sds["vae"], sds["text_encoder"], sds["text_encoder_2"], {})
    ckpt = load_single_file(path, head_dim=HEAD_DIM)
    assert ckpt.role == "base" and ckpt.components["unet"][0]["in_channels"] == 9


# ---------------------------------------------------------------- ControlNet
@pytest.fixture(scope="module")
def controlnets(tiny_sdxl, tmp_path_factory):
    """Two tiny SDXL ControlNets made from the tiny base UNet, saved in diffusers layout."""
    from diffusers import ControlNetModel

    from test_controlnet import randomize

    root = tmp_path_factory.mktemp("controlnets")
    nets = []
    for i in range(2):
        net = ControlNetModel.from_unet(tiny_sdxl[2].unet, conditioning_embedding_out_channels=(8, 16, 16, 32),
                                        load_weights_from_unet=False)
        randomize(net, 30 + i)
        net.save_pretrained(str(root / f"cn{i}"))
        nets.append(net)
    return nets, [root / f"cn{i}" for i in range(2)]


def _edges(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 64)) > 0.8).astype(np.uint8) * 255).convert("RGB")


@pytest.mark.parametrize("case", ["one", "two", "window", "guess"])
def test_controlnet_matches_diffusers(ours, tiny_sdxl, controlnets, case):
    from diffusers import StableDiffusionXLControlNetPipeline

    from mlx_sdxl import Control

    nets, dirs = controlnets
    for i, d in enumerate(dirs):
        ours.load_controlnet(d, name=f"cn{i}")
    images, noise = [_edges(20), _edges(21)], _noise(22)
    spec = {"one": [(0, 1.0, 0.0, 1.0)], "two": [(0, 0.7, 0.0, 1.0), (1, 0.4, 0.0, 1.0)],
            "window": [(0, 1.0, 0.2, 0.7)], "guess": [(0, 1.0, 0.0, 1.0)]}[case]
    guess = case == "guess"
    used = [nets[i] for i, *_ in spec]
    ref_pipe = StableDiffusionXLControlNetPipeline(**{k: v for k, v in tiny_sdxl[2].components.items()
                                                      if k not in ("image_encoder", "feature_extractor")},
                                                   controlnet=used if len(used) > 1 else used[0])
    ref_pipe.set_progress_bar_config(disable=True)
    one = len(spec) == 1
    ref = ref_pipe(PROMPT, image=[images[i] for i, *_ in spec] if not one else images[spec[0][0]],
                   controlnet_conditioning_scale=[s for _, s, _, _ in spec] if not one else spec[0][1],
                   control_guidance_start=[a for *_, a, _ in spec] if not one else spec[0][2],
                   control_guidance_end=[b for *_, b in spec] if not one else spec[0][3], guess_mode=guess,
                   latents=torch.from_numpy(noise).permute(0, 3, 1, 2), num_inference_steps=10, height=64, width=64,
                   output_type="np").images
    control = [Control(f"cn{i}", images[i], s, a, b) for i, s, a, b in spec]
    got = ours.generate(PROMPT, latents=noise, control=control, guess_mode=guess, num_inference_steps=10, width=64,
                        height=64, high_noise_frac=1.0, output_type="np")
    assert np.abs(got.images - ref).mean() <= TOL
    assert got.settings[0]["controls"][0]["model"] == f"cn{spec[0][0]}"
    latent = dict(latents=noise, num_inference_steps=10, width=64, height=64, high_noise_frac=1.0,
                  output_type="latent")
    plain = ours.generate(PROMPT, **latent).images
    assert rel_l2(ours.generate(PROMPT, control=control, guess_mode=guess, **latent).images, plain) > 10 * LATENT_TOL


def test_controlnet_inputs_are_checked_first(ours, controlnets, tiny_sdxl):
    from mlx_sdxl import Control

    ours.load_controlnet(controlnets[1][0], name="cn0")
    with pytest.raises(InputError, match="no ControlNet loaded as 'nope'"):
        ours.generate(PROMPT, control=[Control("nope", _edges(1))], num_inference_steps=2, width=64, height=64)
    with pytest.raises(InputError, match="start"):
        Control("cn0", _edges(1), start=0.8, end=0.2)
    import json

    from mlx_sdxl.pipeline.controlnets import ControlNets

    refiner_unet = json.loads((tiny_sdxl[1] / "unet" / "config.json").read_text())
    with pytest.raises(WeightsError, match="does not fit"):  # an SDXL ControlNet drives the base, not the refiner
        ControlNets(mx.float32).load(controlnets[1][0], "r", refiner_unet)


def test_cli_controlnet_matches_the_api_and_replays(tiny_sdxl, controlnets, tmp_path):
    from test_cli import run

    from mlx_sdxl import Control
    from mlx_sdxl.metadata import read_metadata

    edges = _edges(23)
    edges.save(tmp_path / "edges.png")
    out = tmp_path / "cn.png"
    argv = ["generate", PROMPT, "--model", tiny_sdxl[0], "--refiner", "none", "--dtype", "float32", "--steps", "6",
            "--seed", "5", "--width", "64", "--height", "64", "-q", "--metadata", "full",
            "--controlnet", f"{controlnets[1][0]}:0.7:0.1:0.9", "--control-image", tmp_path / "edges.png"]
    rc, _, err = run(*argv, "-o", out)
    assert rc == 0, err
    with Image.open(out) as im:
        assert "ControlNet 0: " in im.text["parameters"] and "Weight: 0.7" in im.text["parameters"]
        made = np.asarray(im).copy()
    base_only = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32)
    base_only.load_controlnet(controlnets[1][0], name="cn0")
    [api] = base_only(PROMPT, num_inference_steps=6, seed=5, width=64, height=64,
                      control=[Control("cn0", edges, 0.7, 0.1, 0.9)])
    np.testing.assert_array_equal(made, np.asarray(api))
    assert read_metadata(out)["controls"][0]["weight"] == 0.7
    rc, _, err = run("generate", "--from", out, "-q", "-o", tmp_path / "again.png")
    assert rc == 0, err
    with Image.open(tmp_path / "again.png") as im:
        np.testing.assert_array_equal(np.asarray(im), made)
    rc, _, err = run(*argv[:-2], "-o", tmp_path / "x.png")
    assert rc == 2 and "one control image per ControlNet" in err


def test_controlnet_bits_quantize_the_controlnet(tiny_sdxl, controlnets):
    from mlx_sdxl import Control
    from mlx_sdxl.quantize import quantization_info

    latent = dict(latents=_noise(24), num_inference_steps=6, width=64, height=64, output_type="latent",
                  control=[Control("cn", _edges(25), 1.0)])
    outs = {}
    for bits in (None, 8):
        pipe = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32, controlnet_bits=bits, group_size=32)
        pipe.load_controlnet(controlnets[1][0], name="cn")
        assert bool(quantization_info(pipe.controlnets.nets["cn"])) == (bits is not None)
        outs[bits] = np.array(pipe.generate(PROMPT, **latent).images)
    assert 0 < rel_l2(outs[8], outs[None]) < 0.05  # 8 bits: close to dense, not equal
