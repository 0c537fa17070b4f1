"""PNG metadata (A1111 `parameters` + our JSON), atomic saves, file names, latent previews, progress output.
No models needed."""

import io
import json
import os

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_sdxl import __version__
from mlx_sdxl.errors import InputError
from mlx_sdxl.metadata import (A1111_SAMPLERS, JSON_KEY, attach_metadata, default_filename, format_parameters,
                               parse_parameters, pnginfo, read_metadata, save_png, slugify)
from mlx_sdxl.pipeline import StageTiming
from mlx_sdxl.preview import SDXL_LATENT_RGB_BIAS, SDXL_LATENT_RGB_FACTORS, latents_to_rgb
from mlx_sdxl.progress import Progress
from mlx_sdxl.schedulers import SCHEDULERS

SETTINGS = {
    "prompt": "a red fox in the snow",
    "negative_prompt": "blurry, low quality",
    "num_inference_steps": 40,
    "scheduler": "dpmpp_2m_karras",
    "guidance_scale": 5.0,
    "seed": 123,
    "width": 1024,
    "height": 768,
    "model": "/models/sd_xl_base_1.0.safetensors",
    "refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
    "high_noise_frac": 0.8,
    "mode": "generate",
}


def _image(seed=0, size=(16, 8)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _dir_listing(path):
    return sorted(os.listdir(path))


# ---------------------------------------------------------------- A1111 infotext
def test_parameters_text_follows_a1111_layout():
    text = format_parameters(SETTINGS)
    prompt, negative, fields = text.split("\n")
    assert prompt == SETTINGS["prompt"]
    assert negative == "Negative prompt: blurry, low quality"
    assert fields == ("Steps: 40, Sampler: DPM++ 2M Karras, CFG scale: 5.0, Seed: 123, Size: 1024x768, "
                      "Model: sd_xl_base_1.0, Refiner: stable-diffusion-xl-refiner-1.0, Refiner switch at: 0.8, "
                      f"Version: mlx-sdxl {__version__}")


def test_parameters_without_negative_or_refiner_and_for_img2img():
    s = dict(SETTINGS, negative_prompt=None, refiner=None, scheduler="euler_a")
    lines = format_parameters(s).split("\n")
    assert len(lines) == 2 and "Refiner" not in lines[1] and "Sampler: Euler a," in lines[1]
    r = dict(SETTINGS, mode="refine", strength=0.3)
    fields = format_parameters(r).split("\n")[-1]
    assert "Denoising strength: 0.3" in fields and "Refiner switch at" not in fields


def test_a1111_sampler_names_cover_every_scheduler():
    assert set(A1111_SAMPLERS) == set(SCHEDULERS)
    assert A1111_SAMPLERS["dpmpp_2m"] == "DPM++ 2M" and A1111_SAMPLERS["ddim"] == "DDIM"


def test_values_with_commas_or_colons_are_quoted_and_parse_back():
    s = dict(SETTINGS, model="/models/my, model: v2", prompt="line one\nline two: more",
             negative_prompt="a, b\nc")
    text = format_parameters(s)
    assert 'Model: "my, model: v2"' in text
    back = parse_parameters(text)
    assert back["prompt"] == "line one\nline two: more"
    assert back["negative_prompt"] == "a, b\nc"
    assert back["model"] == "my, model: v2"


def test_parse_parameters_round_trip():
    back = parse_parameters(format_parameters(SETTINGS))
    for key in ("prompt", "negative_prompt", "num_inference_steps", "scheduler", "guidance_scale", "seed",
                "width", "height", "high_noise_frac"):
        assert back[key] == SETTINGS[key], key
    assert back["extra"] == {"Version": f"mlx-sdxl {__version__}"}


def test_parse_parameters_from_a1111():
    text = ("masterpiece, a castle on a hill\nNegative prompt: lowres\n"
            "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 4242, Size: 832x1216, "
            "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.35, Version: v1.9.4")
    s = parse_parameters(text)
    assert s["prompt"] == "masterpiece, a castle on a hill" and s["negative_prompt"] == "lowres"
    assert s["scheduler"] == "dpmpp_2m_karras"
    assert (s["num_inference_steps"], s["guidance_scale"], s["seed"]) == (25, 7.0, 4242)
    assert (s["width"], s["height"]) == (832, 1216)
    assert s["strength"] == 0.35 and s["mode"] == "refine"
    assert s["extra"]["Model hash"] == "31e35c80fc"


# ---------------------------------------------------------------- PNG chunks and saving
def test_attach_metadata_and_save_png(tmp_path):
    image = _image()
    assert attach_metadata(image, SETTINGS) is image
    assert image.info["parameters"] == format_parameters(dict(SETTINGS, version=__version__))
    path = save_png(image, tmp_path / "fox.png")  # settings come from image.info
    assert path == tmp_path / "fox.png" and _dir_listing(tmp_path) == ["fox.png"]
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.text["parameters"] == image.info["parameters"]
        stored = json.loads(im.text[JSON_KEY])
        assert np.array_equal(np.asarray(im), np.asarray(image))
    assert stored == dict(SETTINGS, version=__version__)
    assert read_metadata(path) == stored


def test_unicode_prompt_and_numpy_values_survive(tmp_path):
    s = dict(SETTINGS, prompt="café au lait ☕, 東京", seed=np.int64(7), width=np.int32(64))
    save_png(_image(), tmp_path / "u.png", s)
    back = read_metadata(tmp_path / "u.png")
    assert back["prompt"] == s["prompt"] and back["seed"] == 7 and back["width"] == 64
    with Image.open(tmp_path / "u.png") as im:
        assert im.text["parameters"].startswith("café au lait ☕, 東京\n")


def test_pnginfo_for_plain_pil_save(tmp_path):
    _image().save(tmp_path / "p.png", pnginfo=pnginfo(SETTINGS))
    assert read_metadata(tmp_path / "p.png")["seed"] == 123


def test_save_png_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "x.png"
    save_png(_image(0), path, SETTINGS)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_png(_image(1), path, dict(SETTINGS, seed=5))
    assert path.read_bytes() == before and _dir_listing(tmp_path) == ["x.png"]
    save_png(_image(1), path, dict(SETTINGS, seed=5), overwrite=True)
    assert read_metadata(path)["seed"] == 5 and _dir_listing(tmp_path) == ["x.png"]


def test_failed_save_leaves_no_file(tmp_path):
    bad = Image.fromarray(np.zeros((4, 4, 2), dtype=np.uint8)[..., 0]).convert("CMYK")  # PNG cannot store CMYK
    with pytest.raises(OSError):
        save_png(bad, tmp_path / "bad.png", SETTINGS)
    assert _dir_listing(tmp_path) == []


def test_save_png_into_missing_directory_fails_cleanly(tmp_path):
    with pytest.raises(OSError):
        save_png(_image(), tmp_path / "missing" / "x.png", SETTINGS)
    assert _dir_listing(tmp_path) == []


def test_read_metadata_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    _image().save(tmp_path / "plain.png")
    with pytest.raises(InputError, match="not a readable image"):
        read_metadata(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="no generation settings"):
        read_metadata(tmp_path / "plain.png")
    with pytest.raises(InputError, match="not found"):
        read_metadata(tmp_path / "nope.png")


def test_read_metadata_falls_back_to_a1111_parameters(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 9, Size: 512x512")
    _image().save(tmp_path / "a1111.png", pnginfo=info)
    s = read_metadata(tmp_path / "a1111.png")
    assert (s["prompt"], s["scheduler"], s["seed"], s["width"]) == ("a cat", "euler_a", 9, 512)


# ---------------------------------------------------------------- file names
@pytest.mark.parametrize("prompt, slug", [
    ("A Red Fox, in the SNOW!", "a-red-fox-in-the-snow"),
    ("Crème brûlée — 2 ways", "creme-brulee-2-ways"),
    ("東京", "image"),
    ("", "image"),
    ("  ...  ", "image"),
])
def test_slugify(prompt, slug):
    assert slugify(prompt) == slug


def test_slug_is_cut_at_a_word_boundary():
    prompt = "an extremely detailed photograph of a majestic lighthouse standing on a rocky cliff at dusk"
    slug = slugify(prompt)
    assert len(slug) <= 60 and prompt.replace(" ", "-").startswith(slug)
    assert not slug.endswith("-") and prompt.split()[len(slug.split("-"))]  # stopped before a whole word
    assert slugify("x" * 100) == "x" * 60
    assert default_filename("A cat", 42) == "a-cat-42.png"


# ---------------------------------------------------------------- latent previews
def test_preview_is_the_linear_map_of_each_latent_pixel():
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, 5, 7, 4)).astype(np.float32) * 0.5
    img = latents_to_rgb(mx.array(lat), index=1)
    assert isinstance(img, Image.Image) and img.size == (7, 5) and img.mode == "RGB"
    arr = latents_to_rgb(lat, index=1, as_pil=False)
    assert arr.dtype == np.uint8 and arr.shape == (5, 7, 3)
    assert np.array_equal(np.asarray(img), arr)
    # one pixel by hand: sum over channels of latent * factor + bias, [-1, 1] -> [0, 255]
    y, x = 3, 4
    rgb = [sum(lat[1, y, x, c] * SDXL_LATENT_RGB_FACTORS[c, k] for c in range(4)) + SDXL_LATENT_RGB_BIAS[k]
           for k in range(3)]
    expected = np.clip(np.round((np.array(rgb) + 1) * 127.5), 0, 255)
    assert np.abs(arr[y, x].astype(int) - expected).max() <= 1


def test_preview_colours_follow_the_sdxl_factors():
    # latent channel 0 carries luminance: raising it brightens all three colours
    dark = latents_to_rgb(np.full((4, 4, 4), [-1.0, 0, 0, 0], np.float32), as_pil=False)
    bright = latents_to_rgb(np.full((4, 4, 4), [1.0, 0, 0, 0], np.float32), as_pil=False)
    assert (bright.astype(int) - dark.astype(int) > 80).all()
    # channel 1 shifts colour from red towards blue
    blue = latents_to_rgb(np.full((1, 1, 4), [0, 1.0, 0, 0], np.float32), as_pil=False)[0, 0]
    assert blue[2] > blue[0]


def test_preview_resize_and_bad_shape():
    lat = mx.zeros((1, 8, 8, 4), dtype=mx.float16)
    assert latents_to_rgb(lat, size=(64, 64)).size == (64, 64)
    with pytest.raises(InputError, match="4 channels"):
        latents_to_rgb(np.zeros((1, 8, 8, 3)))


# ---------------------------------------------------------------- progress
class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def _drive(progress):
    progress.begin()
    for stage, total in (("base", 4), ("refiner", 2), ("decode", 1)):
        for step in range(1, total + 1):
            assert progress(stage, step, total, None) is None  # never cancels
    timings = {"load_base_unet": 0.5, "encode": 0.1, "base": StageTiming(2.0, 4, 3 * 2**30),
               "refiner": StageTiming(1.0, 2, 2**30), "decode": StageTiming(0.5, 1, 512 * 2**20)}
    progress.summary(timings, 4.0)


def test_progress_on_a_terminal_draws_bars():
    stream = _Stream(tty=True)
    _drive(Progress(stream, min_interval=0))
    out = stream.getvalue()
    assert "\r" in out
    for stage, total in (("base", 4), ("refiner", 2), ("decode", 1)):
        assert f"{stage}" in out and f"] {total}/{total}" in out
    assert "[" + "#" * 24 + "]" in out
    last = out.rstrip("\n").split("\n")[-1]
    assert "base 2.00 s (4 steps), peak 3.0 GB" in last and "decode 0.50 s, peak 512.0 MB" in last
    assert "total 4.00 s" in last
    assert "loaded base unet in 0.50 s" in out


def test_progress_in_logs_is_plain_lines():
    stream = _Stream(tty=False)
    _drive(Progress(stream))
    out = stream.getvalue()
    assert "\r" not in out and "\033" not in out
    lines = out.strip().split("\n")
    assert [line.split(":")[0] for line in lines[:3]] == ["base", "refiner", "decode"]
    assert lines[0].startswith("base: 4/4") and "it/s" in lines[0]
    assert lines[-1].startswith("loaded base unet") is False and "peak" in lines[-1]


def test_progress_quiet_writes_nothing():
    stream = _Stream(tty=True)
    _drive(Progress(stream, quiet=True))
    assert stream.getvalue() == ""
