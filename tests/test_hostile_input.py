"""Careless and hostile input (issue: no silent wrong images, no tracebacks, no leaked paths).

Each CLI case checks the exit status, a one-line message, no traceback, and that nothing
is left in the output folder or its parent."""

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.numpy import load_file, save_file

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.errors import InputError, SDXLError, WeightsError
from mlx_sdxl.metadata import JSON_KEY, normalize_settings
from mlx_sdxl.pipeline.health import cause
from mlx_sdxl.pipeline.images import rgb_pixels

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a cat"
SMALL = ["--width", "64", "--height", "64", "--dtype", "float32", "--steps", "3", "--seed", "1"]


def run(*argv, env=None, timeout=120):
    """The CLI in a subprocess: (exit code, stdout, stderr, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mlx_sdxl.cli", *map(str, argv)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


def assert_refused(rc, out, err, *expected, folder=None):
    assert rc == 2, err
    lines = err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("mlx-sdxl: error: "), err
    assert "Traceback" not in err and out == ""
    for text in expected:
        assert text in lines[0], lines[0]
    if folder is not None:
        assert os.listdir(folder) == [], os.listdir(folder)


@pytest.fixture()
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def poisoned_copy(src: Path, dst: Path, part: str, file: str, prefix: str = "") -> str:
    """A copy of a tiny model folder whose `part` has NaN in one tensor; returns that tensor's name."""
    shutil.copytree(src, dst)
    path = dst / part / file
    weights = load_file(str(path))
    name = sorted(k for k in weights if k.startswith(prefix) and k.endswith("weight") and weights[k].ndim > 1)[-1]
    weights[name] = np.full_like(weights[name], np.nan)
    save_file(weights, str(path))
    return name


# ---------------------------------------------------------------- silent wrong results
def test_nan_vae_decoder_gives_no_png_and_names_the_tensor(tiny_sdxl, tmp_path, out):
    name = poisoned_copy(tiny_sdxl[0], tmp_path / "nanvae", "vae", "diffusion_pytorch_model.safetensors",
                         prefix="decoder.")
    rc, stdout, err, _ = run("generate", PROMPT, "--model", tmp_path / "nanvae", "--refiner", "none", *SMALL,
                             "-q", "-o", out)
    assert_refused(rc, stdout, err, "decoded image holds NaN/inf", "vae", "weights hold NaN/inf", folder=out)
    assert f"tensor vae.{name}" in err


def test_nan_text_encoder_is_blamed_on_the_text_encoder(tiny_sdxl, tmp_path):
    poisoned_copy(tiny_sdxl[0], tmp_path / "nante", "text_encoder", "model.safetensors",
                  prefix="embeddings.token")
    pipe = SDXLPipeline.from_pretrained(tmp_path / "nante", dtype=mx.float32)
    with pytest.raises(SDXLError, match=r"base's prompt embeddings hold NaN/inf in the text_encoder; its weights"):
        pipe(PROMPT, num_inference_steps=2, width=64, height=64, seed=0)


def test_hints_fit_the_precision():
    layer = nn.Linear(4, 4)
    assert "inputs were not" in cause(layer, "unet")  # fp32, finite weights
    layer.set_dtype(mx.float16)
    assert "float16" in cause(layer, "unet")
    layer.weight = mx.full((4, 4), float("nan"), dtype=mx.float16)
    assert "tensor unet.weight" in cause(layer, "unet")  # the weights come first, whatever the precision


@pytest.mark.parametrize("kw, match", [
    (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(guidance_scale=True), "guidance_scale"), (dict(guidance_rescale="a"), "guidance_rescale"),
    (dict(guidance_rescale=float("nan")), "guidance_rescale"), (dict(high_noise_frac=float("inf")), "high_noise_frac"),
    (dict(aesthetic_score=float("nan")), "aesthetic_score"), (dict(seed=2**64), "seed"),
    (dict(width=100000, height=100000), "megapixels"), (dict(num_images_per_prompt=65), "at most 64"),
    (dict(width=63), "got 63"), (dict(max_megapixels=float("nan")), "max_megapixels"),
])
def test_bad_settings_through_the_api(tiny_sdxl, kw, match):
    pipe = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32)
    args = dict(num_inference_steps=2, width=64, height=64)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=match):
        pipe.generate(PROMPT, **{**args, **kw})
    assert time.perf_counter() - t0 < 2


def test_strength_nan_and_small_images_through_the_api(tiny_sdxl):
    pipe = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32)
    with pytest.raises(InputError, match="strength"):
        pipe.refine(np.zeros((64, 64, 3), np.float32), PROMPT, strength=float("nan"))
    with pytest.raises(InputError, match="at least 64x64, got 63x63"):
        pipe.refine(Image.new("RGB", (63, 63)), PROMPT)


def test_metadata_is_always_valid_json():
    text = json.dumps(normalize_settings({"guidance_scale": float("nan"), "x": np.float32("inf")}), allow_nan=False)
    assert json.loads(text)["guidance_scale"] is None


@pytest.mark.parametrize("flags, expected", [
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--high-noise-frac", "nan"], "--high-noise-frac"),
    (["--width", "100000", "--height", "64"], "megapixels"),
    (["--width", "63"], "got 63"),
    (["--n-images", "65"], "at most 64"),
])
def test_bad_settings_through_the_cli(tiny_sdxl, out, flags, expected):
    args = ["--width", "64", "--height", "64", "--steps", "2"]
    rc, stdout, err, seconds = run("generate", PROMPT, "--model", tiny_sdxl[0], *args, *flags, "-o", out)
    assert_refused(rc, stdout, err, expected, folder=out)
    assert seconds < 10  # refused before any model loads (most of this is the interpreter starting)


def _png_with_json(path: Path, payload: str, size=(64, 64)):
    info = PngInfo()
    info.add_text(JSON_KEY, payload)
    Image.new("RGB", size).save(path, pnginfo=info)


def test_from_images_that_lie(tiny_sdxl, tmp_path, out):
    listed = tmp_path / "list.png"
    _png_with_json(listed, "[1, 2, 3]")
    for cmd in (["generate", "--from", listed, "-o", out], ["info", listed]):
        rc, stdout, err, _ = run(*cmd)
        assert_refused(rc, stdout, err, "holds a JSON list", folder=out)
    huge = tmp_path / "huge.png"
    _png_with_json(huge, json.dumps({"prompt": "x", "width": 10**9, "height": 1024, "version": "0.1.0",
                                     "model": str(tiny_sdxl[0])}))
    rc, stdout, err, seconds = run("generate", "--from", huge, "-o", out)
    assert_refused(rc, stdout, err, "megapixels", folder=out)
    nan = tmp_path / "nan.png"
    _png_with_json(nan, '{"prompt": "x", "guidance_scale": NaN, "version": "0.1.0"}')
    rc, stdout, err, _ = run("generate", "--from", nan, "-o", out)
    assert_refused(rc, stdout, err, "--guidance must be a finite number", folder=out)


def test_info_escapes_control_characters(tmp_path):
    crafted = tmp_path / "crafted.png"
    _png_with_json(crafted, json.dumps({"prompt": "cat\x1b[2J\x1b]0;owned\x07", "version": "0.1.0"}))
    rc, stdout, err, _ = run("info", crafted)
    assert rc == 0, err
    assert "\x1b" not in stdout and "\x07" not in stdout and "\\x1b[2J" in stdout


# ---------------------------------------------------------------- input images
def _png_16bit_rgb(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_every_pil_mode_converts_at_its_own_scale(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    expected = np.repeat((grey8 / 255.0)[..., None], 3, axis=-1).astype(np.float32)
    sixteen = Image.fromarray((grey8.astype(np.uint16) * 257))
    assert sixteen.mode == "I;16"
    np.testing.assert_allclose(rgb_pixels(sixteen), expected, atol=1e-6)
    np.testing.assert_allclose(rgb_pixels(sixteen.convert("I")), expected, atol=1e-6)  # 32-bit integer
    np.testing.assert_allclose(rgb_pixels(Image.fromarray(grey8 / 255.0, "F") if False else
                                          Image.fromarray((grey8 / 255.0).astype(np.float32))), expected, atol=1e-6)
    np.testing.assert_allclose(rgb_pixels(Image.fromarray(grey8).convert("F")), expected, atol=1e-6)  # 0-255 floats
    rgb8 = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    _png_16bit_rgb(tmp_path / "rgb16.png", rgb8.astype(np.uint16) * 257)
    with Image.open(tmp_path / "rgb16.png") as im:
        np.testing.assert_allclose(rgb_pixels(im), rgb8 / 255.0, atol=1e-6)
    rgba = Image.fromarray(np.dstack([rgb8, np.zeros((64, 64), np.uint8)]), "RGBA")  # fully transparent
    np.testing.assert_allclose(rgb_pixels(rgba), np.ones((64, 64, 3)), atol=1e-6)  # → the white background
    half = Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), np.full((64, 64), 255, np.uint8)]), "RGBA")
    np.testing.assert_allclose(rgb_pixels(half), np.zeros((64, 64, 3)), atol=1e-6)  # opaque black stays black
    palette = Image.fromarray(rgb8).convert("P")
    palette.info["transparency"] = 0
    assert rgb_pixels(palette).shape == (64, 64, 3)
    cmyk = Image.fromarray(rgb8).convert("CMYK")
    np.testing.assert_allclose(rgb_pixels(cmyk), np.asarray(cmyk.convert("RGB")) / 255.0, atol=1e-6)
    la = Image.fromarray(grey8).convert("LA")
    np.testing.assert_allclose(rgb_pixels(la), expected, atol=1e-6)


def test_16bit_png_refines_like_its_8bit_twin(tiny_sdxl, tmp_path, out):
    grey8 = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(grey8).save(tmp_path / "eight.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    made = {}
    for name in ("eight", "sixteen"):
        rc, _, err, _ = run("generate", PROMPT, "--model", tiny_sdxl[0], "--image", tmp_path / f"{name}.png",
                            "--strength", "0.5", "--steps", "4", "--seed", "2", "--dtype", "float32", "-q",
                            "-o", out / f"{name}.png")
        assert rc == 0, err
        with Image.open(out / f"{name}.png") as im:
            made[name] = np.asarray(im)
    np.testing.assert_array_equal(made["sixteen"], made["eight"])
    assert made["eight"].mean() < 200  # not the near-white image a clipped conversion gives


def test_tiny_and_bomb_images_are_refused_quickly(tiny_sdxl, tmp_path, out):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    rc, stdout, err, _ = run("generate", PROMPT, "--model", tiny_sdxl[0], "--image", tmp_path / "dot.png", "-o", out)
    assert_refused(rc, stdout, err, "is 1x1", "at least 64x64", folder=out)
    bomb = tmp_path / "bomb.png"  # a 30000x30000 header over almost no data

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 30001)) + chunk(b"IEND", b""))
    rc, stdout, err, seconds = run("generate", PROMPT, "--model", tiny_sdxl[0], "--image", bomb, "-o", out)
    assert_refused(rc, stdout, err, "--image", folder=out)
    assert "megapixels" in err or "too many pixels" in err


# ---------------------------------------------------------------- responsiveness
def test_sigint_during_decode_ends_within_two_seconds(tiny_sdxl, tmp_path, out):
    """The decode runs block by block, so Ctrl-C is seen between blocks; nothing is written."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys
import mlx_sdxl.pipeline.images as images
real = images.decode_latents
def announced(*a, **k):
    print("decoding", flush=True)
    return real(*a, **k)
images.decode_latents = announced
from mlx_sdxl.cli import main
sys.exit(main(["generate", "a cat", "--model", {str(tiny_sdxl[0])!r}, "--refiner", "none", "--width", "256",
               "--height", "256", "--steps", "2", "--dtype", "float32", "-q", "-o", {str(out)!r}]))
""")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.stdout.readline().strip() == "decoding"
    t0 = time.perf_counter()
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=30)
    assert time.perf_counter() - t0 < 2
    assert rc == 130 and "Traceback" not in p.stderr.read()
    assert os.listdir(out) == []


def test_decode_returns_to_python_between_blocks(tiny_sdxl):
    pipe = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32)
    vae = pipe.vae
    calls = []
    z = mx.random.normal((1, 8, 8, 4), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(vae.decode(z, between_blocks=calls.append)), np.array(vae.decode(z)),
                               atol=1e-6)
    assert len(calls) == len(vae.decoder.up_blocks)


# ---------------------------------------------------------------- paths and names
def test_paths_are_decided_up_front(tiny_sdxl, tmp_path, out):
    rc, stdout, err, seconds = run("generate", PROMPT, "--model", "./no/such/model", *SMALL, "-o", out)
    assert_refused(rc, stdout, err, "no such file or folder", folder=out)
    assert seconds < 10  # not tried as a hub id (no retries)
    rc, stdout, err, _ = run("generate", PROMPT, "--model", "nobody/nothing", *SMALL, "-o", out)
    assert_refused(rc, stdout, err, "no such file or folder nobody/nothing, and could not get", "not in the local cache",
                   folder=out)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    rc, stdout, err, _ = run("generate", PROMPT, "--model", loop, *SMALL, "-o", out)
    assert_refused(rc, stdout, err, "symlink loop", folder=out)
    selfish = tmp_path / "selfish"
    shutil.copytree(tiny_sdxl[0], selfish)
    shutil.rmtree(selfish / "unet")
    (selfish / "unet").symlink_to(selfish / "unet")
    with pytest.raises(WeightsError, match="symlink loop"):
        SDXLPipeline.from_pretrained(selfish)


def test_no_chunk_names_the_user_or_home(tiny_sdxl, tmp_path, monkeypatch):
    user = tmp_path / "home" / "alice-liddell-7"
    models = user / "models"
    shutil.copytree(tiny_sdxl[0], models / "my-base")
    shutil.copytree(tiny_sdxl[1], models / "my-refiner")
    Image.new("RGB", (64, 64), (90, 120, 150)).save(user / "holiday.png")
    out = tmp_path / "out"
    out.mkdir()
    env = {"HOME": str(user)}
    common = ["--model", models / "my-base", "--refiner", models / "my-refiner", "--dtype", "float32", "--steps", "3",
              "--seed", "1", "-q"]
    rc, _, err, _ = run("generate", PROMPT, *common, "--width", "64", "--height", "64", "-o", out / "a.png", env=env)
    assert rc == 0, err
    rc, _, err, _ = run("generate", PROMPT, *common, "--image", user / "holiday.png", "--strength", "0.5",
                        "-o", out / "b.png", env=env)
    assert rc == 0, err
    monkeypatch.setenv("HOME", str(user))
    pipe = SDXLPipeline.from_pretrained(models / "my-base", models / "my-refiner", dtype=mx.float32)
    [api] = pipe(PROMPT, num_inference_steps=3, width=64, height=64, seed=1)
    api.save(out / "c.png", pnginfo=__import__("mlx_sdxl.metadata", fromlist=["pnginfo"]).pnginfo(
        json.loads(api.info[JSON_KEY])))
    for name in ("a.png", "b.png", "c.png"):
        data = (out / name).read_bytes()
        with Image.open(out / name) as im:
            text = " ".join(im.text.values())
        assert "my-base" in text  # the models are still named
        for secret in ("alice-liddell-7", str(user), str(tmp_path)):
            assert secret not in text and secret.encode() not in data, (name, secret)


def test_models_are_found_again_by_name(tiny_sdxl, tmp_path):
    """--from resolves recorded names through --models-dir (or $MLX_SDXL_MODELS)."""
    models = tmp_path / "models"
    shutil.copytree(tiny_sdxl[0], models / "my-base")
    out = tmp_path / "out"
    out.mkdir()
    rc, _, err, _ = run("generate", PROMPT, "--model", models / "my-base", *SMALL, "-q", "-o", out / "a.png")
    assert rc == 0, err
    rc, _, err, _ = run("generate", "--from", out / "a.png", "-q", "-o", out / "b.png",
                        env={"MLX_SDXL_MODELS": str(models)})
    assert rc == 0, err
    with Image.open(out / "a.png") as a, Image.open(out / "b.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rc, stdout, err, _ = run("generate", "--from", out / "a.png", "-o", out / "c.png")
    assert_refused(rc, stdout, err, "made with model 'my-base'", "--models-dir")
    assert not (out / "c.png").exists()


def test_config_with_a_missing_or_wrong_field(tiny_sdxl, tmp_path):
    for field, value in (("num_hidden_layers", "x"), ("projection_dim", "wide")):
        folder = tmp_path / f"bad-{field}"
        shutil.copytree(tiny_sdxl[0], folder)
        config = json.loads((folder / "text_encoder_2" / "config.json").read_text())
        config[field] = value
        (folder / "text_encoder_2" / "config.json").write_text(json.dumps(config))
        with pytest.raises(WeightsError, match="does not describe an SDXL"):
            SDXLPipeline.from_pretrained(folder, dtype=mx.float32)(PROMPT, num_inference_steps=1, width=64,
                                                                   height=64)
