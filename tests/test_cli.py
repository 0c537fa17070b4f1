"""The `mlx-sdxl` command and the examples, end to end on the tiny SDXL folders (64x64, float32)."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_sdxl import SDXLPipeline, __version__
from mlx_sdxl.cli import default_dtype, main
from mlx_sdxl.metadata import read_metadata

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a red cat"
NEG = "blurry"
SMALL = ["--width", "64", "--height", "64", "--dtype", "float32"]


class _TTY(io.StringIO):
    def isatty(self):
        return True


def run(*argv, stderr=None):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), stderr or io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    base_dir, refiner_dir, _, _ = tiny_sdxl
    return str(base_dir), str(refiner_dir)


@pytest.fixture(scope="module")
def first(models, tmp_path_factory):
    """One base + refiner image made by the CLI, reused by several tests."""
    base, refiner = models
    out = tmp_path_factory.mktemp("first") / "first.png"
    argv = ["generate", PROMPT, "--negative-prompt", NEG, "--model", base, "--refiner", refiner, *SMALL,
            "--steps", "4", "--seed", "7", "--output", out]
    rc, stdout, stderr = run(*argv)
    assert rc == 0, stderr
    return out, argv, stdout, stderr


def test_generate_writes_png_with_metadata(first, models):
    path, _, stdout, stderr = first
    assert stdout.strip() == str(path)
    assert os.listdir(path.parent) == ["first.png"]  # no temp files left behind
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (64, 64)
        params = im.text["parameters"].split("\n")
    assert params[:2] == [PROMPT, f"Negative prompt: {NEG}"]
    assert params[2].startswith("Steps: 4, Sampler: Euler, CFG scale: 5.0, Seed: 7, Size: 64x64, Model: ")
    assert "Refiner switch at: 0.8" in params[2] and params[2].endswith(f"Version: mlx-sdxl {__version__}")
    s = read_metadata(path)
    assert (s["prompt"], s["negative_prompt"], s["seed"], s["num_inference_steps"]) == (PROMPT, NEG, 7, 4)
    assert (s["model"], s["refiner"]) == ("base", "refiner")  # names, not paths (--metadata minimal)
    assert all(len(s[k]) == 10 and int(s[k], 16) >= 0 for k in ("model_hash", "refiner_hash"))
    assert (s["scheduler"], s["dtype"], s["mode"], s["version"]) == ("euler", "float32", "generate", __version__)
    # not a terminal: plain log lines with per-stage times and a summary
    assert "\r" not in stderr
    for stage in ("base: 3/3", "refiner: 1/1", "decode: 1/1", "loaded base unet", "peak"):
        assert stage in stderr


def test_same_seed_same_pixels_and_overwrite(first, tmp_path):
    path, argv, _, _ = first
    copy = tmp_path / "copy.png"
    shutil.copy(path, copy)
    argv = argv[:-1] + [copy]
    copy.write_bytes(b"old")
    rc, _, stderr = run(*argv)  # the same command onto an existing file
    assert rc == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert copy.read_bytes() == b"old"
    rc, _, stderr = run(*argv, "--overwrite")
    assert rc == 0, stderr
    assert np.array_equal(pixels(copy), pixels(path))
    assert os.listdir(tmp_path) == ["copy.png"]


def test_from_reproduces_an_image(first, models, tmp_path):
    path = first[0]
    out = tmp_path / "again.png"
    rc, _, stderr = run("generate", "--from", path, "--output", out, "--quiet", "--models-dir", Path(models[0]).parent)
    assert rc == 0 and stderr == ""
    assert np.array_equal(pixels(out), pixels(path))
    a, b = read_metadata(path), read_metadata(out)
    assert a == b


def test_metadata_full_records_paths_and_replays_without_a_models_dir(models, tmp_path):
    out = tmp_path / "full.png"
    argv = ["generate", PROMPT, "--model", models[0], "--refiner", models[1], *SMALL, "--steps", "4", "--seed", "7"]
    assert run(*argv, "--metadata", "full", "--output", out, "-q")[0] == 0
    s = read_metadata(out)
    assert (s["model"], s["refiner"]) == (str(Path(models[0]).resolve()), str(Path(models[1]).resolve()))
    again = tmp_path / "again.png"
    assert run("generate", "--from", out, "--output", again, "-q")[0] == 0
    assert np.array_equal(pixels(again), pixels(out))
    bare = tmp_path / "bare.png"
    assert run(*argv, "--metadata", "none", "--output", bare, "-q")[0] == 0
    with Image.open(bare) as im:
        assert not im.text  # no chunk at all
    assert np.array_equal(pixels(bare), pixels(out))


def test_from_with_overrides_and_seed_list(first, models, tmp_path):
    path = first[0]
    rc, stdout, stderr = run("generate", "--from", path, "--models-dir", Path(models[0]).parent,
                             "--refiner", "none", "--steps", "2", "--seed", "8",
                             "--n-images", "2", "--output", tmp_path, "--quiet")
    assert rc == 0, stderr
    names = [Path(p).name for p in stdout.split()]
    assert names == ["a-photo-of-a-red-cat-8.png", "a-photo-of-a-red-cat-9.png"]
    s8, s9 = (read_metadata(tmp_path / n) for n in names)
    assert (s8["seed"], s9["seed"]) == (8, 9)
    assert s8["refiner"] is None and s8["num_inference_steps"] == 2
    assert (s8["prompt"], s8["negative_prompt"]) == (PROMPT, NEG)  # kept from the source image
    with Image.open(tmp_path / names[0]) as im:
        assert "Refiner" not in im.text["parameters"]
    assert not np.array_equal(pixels(tmp_path / names[0]), pixels(tmp_path / names[1]))


def test_random_seed_is_recorded_and_terminal_gets_bars(models, tmp_path):
    rc, stdout, stderr = run("generate", "a dog", "--model", models[0], *SMALL, "--steps", "3",
                             "--output", tmp_path, stderr=_TTY())
    assert rc == 0, stderr
    [name] = os.listdir(tmp_path)
    seed = read_metadata(tmp_path / name)["seed"]
    assert name == f"a-dog-{seed}.png" and stdout.strip() == str(tmp_path / name)
    assert "\r" in stderr and "base     [" in stderr and "it/s" in stderr and "decode   [" in stderr


def test_refine_existing_image_and_reproduce_it(first, models, tmp_path):
    source = first[0]
    out = tmp_path / "refined.png"
    rc, _, stderr = run("generate", "a photo of a dog", "--model", models[0], "--refiner", models[1],
                        "--image", source, "--strength", "0.5", "--steps", "4", "--seed", "3", "--dtype",
                        "float32", "--high-noise-frac", "0", "--output", out)
    assert rc == 0, stderr
    s = read_metadata(out)
    assert (s["mode"], s["strength"], s["image"], s["width"]) == ("refine", 0.5, source.name, 64)
    with Image.open(out) as im:
        assert "Denoising strength: 0.5" in im.text["parameters"]
    assert "refiner: 2/2" in stderr and "base:" not in stderr
    assert not np.array_equal(pixels(out), pixels(source))
    again = tmp_path / "again.png"
    rc, _, stderr = run("generate", "--from", out, "--output", again, "-q")
    assert rc == 2 and "made from the image 'first.png'" in stderr and "--image" in stderr  # names only: where is it?
    rc, _, stderr = run("generate", "--from", out, "--output", again, "-q", "--image", source)
    assert rc == 2 and "--models-dir" in stderr and "'base'" in stderr
    rc, _, stderr = run("generate", "--from", out, "--output", again, "-q", "--models-dir", Path(models[0]).parent,
                        "--image", source)
    assert rc == 0, stderr
    assert np.array_equal(pixels(again), pixels(out))


def test_cancel_returns_none_and_pipeline_keeps_working(first, models):
    pipe = SDXLPipeline.from_pretrained(*models, dtype=mx.float32)
    calls = []

    def cancel_at_second_step(stage, step, total, latents):
        calls.append((stage, step))
        return not (stage == "base" and step == 2)

    kw = dict(num_inference_steps=4, width=64, height=64, seed=7)
    assert pipe(PROMPT, NEG, callback=cancel_at_second_step, **kw) is None
    assert calls == [("base", 1), ("base", 2)]
    [image] = pipe(PROMPT, NEG, **kw)  # the same pipeline still works, and matches the CLI's image
    assert np.array_equal(np.asarray(image), pixels(first[0]))


@pytest.fixture()
def bad_env(tmp_path, models, first):
    (tmp_path / "somefile.txt").write_text("not a directory")
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    out.mkdir()
    return dict(base=models[0], refiner=models[1], tmp=tmp_path, out=out, image=first[0])


BAD = {
    "missing model path": (["--model", "{tmp}/no-such-model"], "no-such-model"),
    "default model not downloaded (offline)": ([], "stable-diffusion-xl-base-1.0' from the Hugging Face Hub: it is not in the local cache"),
    "size not divisible by 8": (["--model", "{base}", "--width", "65"], "--width must be a multiple of 8"),
    "steps 0": (["--model", "{base}", "--steps", "0"], "--steps must be an integer >= 1"),
    "unknown scheduler": (["--model", "{base}", "--scheduler", "plms"], "invalid choice"),
    "not a number": (["--model", "{base}", "--guidance", "lots"], "invalid float value"),
    "output under a file": (["--model", "{base}", "--output", "{tmp}/somefile.txt/x.png"], "not a directory"),
    "output dir missing": (["--model", "{base}", "--output", "{tmp}/nowhere/x.png"], "does not exist"),
    "output not png": (["--model", "{base}", "--output", "{out}/x.jpg"], ".png file or a directory"),
    "non-image --image": (["--model", "{base}", "--image", "{tmp}/notes.txt"], "not a readable image"),
    "missing --image": (["--model", "{base}", "--image", "{tmp}/nope.png"], "file not found"),
    "n-images with one output file": (["--model", "{base}", "--n-images", "2", "--output", "{out}/x.png"],
                                      "one file but 2 images"),
    "seeds and n-images disagree": (["--model", "{base}", "--seed", "1", "2", "--n-images", "3"], "conflicts"),
    "negative seed": (["--model", "{base}", "--seed", "-1"], "seeds must be integers"),
    "strength without image": (["--model", "{base}", "--strength", "0.5"], "--strength needs --image"),
    "one side with image": (["--model", "{base}", "--image", "{image}", "--width", "64"], "give both --width"),
    "strength out of range": (["--model", "{base}", "--image", "{image}", "--strength", "1.5"], "(0, 1]"),
    "refiner bits without refiner": (["--model", "{base}", "--refiner-bits", "4"], "needs a refiner"),
    "refiner given as base": (["--model", "{refiner}"], "refiner"),
    "from a non-image": (["--from", "{tmp}/notes.txt"], "not a readable image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case, bad_env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))  # the default model is not there
    flags, expected = BAD[case]
    flags = [f.format(**bad_env) for f in flags]
    if "--output" not in flags:
        flags += ["--output", str(bad_env["out"])]
    if "--steps" not in flags:
        flags += ["--steps", "2"]
    if "--image" not in flags and "--width" not in flags:
        flags += ["--width", "64", "--height", "64"]
    rc, stdout, stderr = run("generate", "a cat", *flags)
    lines = stderr.strip().split("\n")
    assert rc == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("mlx-sdxl") and "error: " in lines[0], stderr
    assert expected in lines[0]
    assert "Traceback" not in stderr and stdout == ""
    assert os.listdir(bad_env["out"]) == []
    assert sorted(os.listdir(bad_env["tmp"])) == ["notes.txt", "out", "somefile.txt"]


def test_no_prompt_and_info_errors(tmp_path):
    rc, _, stderr = run("generate", "--model", "x")
    assert rc == 2 and "give a prompt" in stderr
    (tmp_path / "plain.png").write_bytes(b"")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    rc, _, stderr = run("info", tmp_path / "plain.png")
    assert rc == 2 and stderr.startswith("mlx-sdxl: error:") and "no generation settings" in stderr


def test_info(first):
    path = first[0]
    rc, stdout, _ = run("info", path)
    assert rc == 0
    assert "prompt" in stdout and PROMPT in stdout and "seed" in stdout
    rc, stdout, _ = run("info", path, "--json")
    assert rc == 0 and json.loads(stdout) == read_metadata(path)


def test_convert_and_bench_are_delegated(monkeypatch):
    seen = []
    fake = types.ModuleType("bench.cli")
    fake.main = lambda argv, prog=None: seen.append((argv, prog)) or 3
    monkeypatch.setitem(sys.modules, "bench.cli", fake)
    assert run("bench", "--steps", "2")[0] == 3 and seen == [(["--steps", "2"], "mlx-sdxl bench")]
    monkeypatch.setitem(sys.modules, "convert.cli", None)  # as if convert/ were not installed
    rc, _, stderr = run("convert", "x")
    assert rc == 2 and "not available" in stderr


def test_default_dtype_follows_the_backend():
    gpu = mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())
    assert default_dtype() == ("float16" if gpu else "float32")


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_module_entry_point_in_a_subprocess(models, tmp_path):
    ok = subprocess.Popen(
        [sys.executable, "-m", "mlx_sdxl.cli", "generate", "a cat", "--model", models[0], *SMALL, "--steps", "2",
         "--seed", "1", "--output", tmp_path / "sub.png"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    bad = subprocess.run(
        [sys.executable, "-m", "mlx_sdxl.cli", "generate", "a cat", "--model", tmp_path / "missing", "--steps", "0"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    stdout, stderr = ok.communicate(timeout=300)
    assert ok.returncode == 0, stderr
    assert stdout.strip() == str(tmp_path / "sub.png") and read_metadata(tmp_path / "sub.png")["seed"] == 1
    assert "\r" not in stderr and "Traceback" not in stderr
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--steps must be" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_examples_run_on_tiny_models(models, tmp_path):
    base, refiner = models
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    common = ["--model", base, "--refiner", refiner, "--steps", "4", "--dtype", "float32"]
    commands = {
        "generate": ["generate.py", "a cat", *common, "--width", "64", "--height", "64", "--seed", "5",
                     "--output", tmp_path / "gen.png"],
        "refine": ["refine_existing.py", tmp_path / "photo.png", "a dog", *common, "--strength", "0.5",
                   "--output", tmp_path / "ref.png"],
        "app": ["app_callback.py", "a cat", *common, "--width", "64", "--height", "64", "--cancel-after", "1",
                "--out-dir", tmp_path / "app"],
    }
    procs = {k: subprocess.Popen([sys.executable, ROOT / "examples" / c[0], *map(str, c[1:])],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
             for k, c in commands.items()}
    results = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
    for name, ((stdout, stderr), rc) in results.items():
        assert rc == 0, f"{name}: {stderr}"
    assert read_metadata(tmp_path / "gen.png")["seed"] == 5
    ref = read_metadata(tmp_path / "ref.png")
    assert ref["mode"] == "refine" and ref["strength"] == 0.5
    with Image.open(tmp_path / "ref.png") as im:
        assert im.size == (64, 64)  # height 70 cut down to a multiple of 8
    app_out = results["app"][0][0]
    assert "job 1 returned None" in app_out and "job 2 finished" in app_out
    with Image.open(tmp_path / "app" / "app_preview.png") as im:
        assert im.size == (8, 8)
    assert read_metadata(tmp_path / "app" / "app_result.png")["seed"] == 0


def test_compile_flag(first, tmp_path):
    path, argv, _, _ = first
    out = tmp_path / "compiled.png"
    rc, _, stderr = run(*argv[:-1], out, "--compile")
    assert rc == 0, stderr
    assert np.abs(pixels(out).astype(int) - pixels(path).astype(int)).max() <= 1  # the same image, maybe ±1 LSB
