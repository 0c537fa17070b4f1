"""`pipe.generate` and the plan of stages: results as values, one seed per image, threads,
stage hooks, and the CLI's default models from an offline hub cache."""

import dataclasses
import json
import threading

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_sdxl import GenerationResult, SDXLPipeline
from mlx_sdxl.errors import InputError
from mlx_sdxl.pipeline import Request
from mlx_sdxl.pipeline.plan import make_plan
from mlx_sdxl.spec import BASE, DEFAULT_BASE_ID, DEFAULT_REFINER_ID, MAX_SEED, REFINER

PROMPT = "a photo of a cat"
SMALL = dict(num_inference_steps=5, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    return SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32)


def test_result_carries_images_seeds_settings_timings(pipe):
    result = pipe.generate([PROMPT, "a red car"], seed=11, num_images_per_prompt=2, num_inference_steps=5,
                           height=64, width=64)
    assert isinstance(result, GenerationResult) and not result.cancelled
    assert len(result.images) == 4 and all(isinstance(i, Image.Image) for i in result.images)
    assert result.seeds == [11, 12, 13, 14]
    assert [s["seed"] for s in result.settings] == result.seeds
    assert [s["prompt"] for s in result.settings] == [PROMPT, PROMPT, "a red car", "a red car"]
    for image, settings in zip(result.images, result.settings):  # each PNG records its own seed and prompt
        assert json.loads(image.info["mlx_sdxl"])["seed"] == settings["seed"]
        assert json.loads(image.info["mlx_sdxl"])["prompt"] == settings["prompt"]
    assert result.settings[0]["high_noise_frac"] == 0.8 and "refiner" in result.settings[0]
    t = result.timings
    assert (t["encode"].steps, t[BASE].steps, t[REFINER].steps, t["decode"].steps) == (0, 4, 1, 1)
    for k in ("encode", BASE, REFINER, "decode"):  # every stage: time, peak, resident weights
        assert t[k].seconds > 0 and t[k].peak_memory >= t[k].weights_memory > 0
    assert t["decode"].weights_memory == pipe.models.resident_bytes()
    assert result.peak_memory >= max(t[k].peak_memory for k in ("encode", BASE, REFINER, "decode"))
    assert not hasattr(pipe, "last_timings") and not hasattr(pipe, "last_seed")


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_each_image_is_its_seeds_image(pipe, scheduler):
    """Image i of a batch equals a one-image run with seeds[i], also with a sampler that adds noise."""
    batch = pipe.generate(PROMPT, seed=5, num_images_per_prompt=2, scheduler=scheduler, **SMALL)
    alone = [pipe.generate(PROMPT, seed=s, scheduler=scheduler, **SMALL).images[0] for s in (5, 6)]
    assert batch.seeds == [5, 6]
    np.testing.assert_allclose(batch.images[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(batch.images[1], alone[1], atol=1e-5)
    assert np.abs(alone[0] - alone[1]).mean() > 1e-2  # the seeds do change the image
    listed = pipe.generate(PROMPT, seed=[6, 5], num_images_per_prompt=2, scheduler=scheduler, **SMALL)
    np.testing.assert_allclose(listed.images[0], alone[1], atol=1e-5)


def test_call_and_refine_return_the_results_images(pipe):
    np.testing.assert_array_equal(pipe(PROMPT, seed=3, **SMALL), pipe.generate(PROMPT, seed=3, **SMALL).images)
    image = np.random.default_rng(0).uniform(0, 1, (64, 64, 3)).astype(np.float32)
    kw = dict(strength=0.5, num_inference_steps=6, seed=4, output_type="np")
    result = pipe.generate(PROMPT, image=image, high_noise_frac=0.0, **kw)  # the refiner alone
    np.testing.assert_array_equal(pipe.refine(image, PROMPT, **kw), result.images)
    assert result.settings[0]["mode"] == "refine" and result.settings[0]["strength"] == 0.5
    assert result.timings[REFINER].steps == 3 and BASE not in result.timings
    both = pipe.generate(PROMPT, image=image, high_noise_frac=0.8, **kw)  # the base from the img2img step
    assert (both.timings[BASE].steps, both.timings[REFINER].steps) == (1, 2)  # steps 3 | 4, 5 of 6
    assert both.settings[0]["mode"] == "img2img"


def test_cancelled_result(pipe):
    result = pipe.generate(PROMPT, seed=1, callback=lambda *a: False, **SMALL)
    assert result.cancelled and result.images is None and result.seeds == [1]
    assert pipe(PROMPT, seed=1, callback=lambda *a: False, **SMALL) is None


def test_two_threads_get_their_own_seeds_and_timings(pipe):
    results, errors = {}, []

    def work(name, seed, steps):
        try:
            results[name] = pipe.generate(PROMPT, seed=seed, num_inference_steps=steps, height=64, width=64,
                                          output_type="np")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:  # an MLX worker thread should end its streams (else the process may abort at exit)
            mx.synchronize()
            mx.clear_streams()

    threads = [threading.Thread(target=work, args=("a", 21, 5)), threading.Thread(target=work, args=("b", 22, 10))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results["a"].seeds == [21] and results["b"].seeds == [22]
    assert (results["a"].timings[BASE].steps, results["a"].timings[REFINER].steps) == (4, 1)
    assert (results["b"].timings[BASE].steps, results["b"].timings[REFINER].steps) == (8, 2)
    np.testing.assert_array_equal(results["a"].images, pipe.generate(PROMPT, seed=21, **SMALL).images)


@pytest.mark.parametrize("seed, match", [
    (MAX_SEED + 1, "seed must be an integer in"), (-1, "seed must be"), (True, "seed must be"),
    (1.5, "seed must be"), ([1, 2, 3], "got 3 seeds for 1 images"),
])
def test_bad_seeds(pipe, seed, match):
    with pytest.raises(InputError, match=match):
        pipe.generate(PROMPT, seed=seed, **SMALL)


def test_image_to_image_refuses_text_to_image_settings(pipe):
    image = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(InputError, match="latents does not apply"):
        pipe.generate(PROMPT, image=image, latents=np.zeros((1, 8, 8, 4), np.float32))
    with pytest.raises(InputError, match="give both width and height"):
        pipe.generate(PROMPT, image=image, width=64)


def test_stage_hooks_run_inside_each_step(pipe):
    """A stage input (here an after-step hook on the latents) plugs into the plan, not the signature."""
    req = Request(PROMPT, seed=9, num_inference_steps=5, width=64, height=64, output_type="np")
    plan = make_plan(req, pipe.base, pipe.refiner, pipe.vae_scale_factor)
    plain = pipe._run(plan, None).images
    identity = dataclasses.replace(plan, stages=tuple(
        dataclasses.replace(s, after_step=(lambda x, i: x,)) for s in plan.stages))
    np.testing.assert_array_equal(pipe._run(identity, None).images, plain)
    seen = []

    def keep_left_half_at_zero(x, i):
        seen.append(i)
        return mx.concatenate([mx.zeros_like(x[:, :, : x.shape[2] // 2]), x[:, :, x.shape[2] // 2:]], axis=2)

    masked = dataclasses.replace(plan, stages=(dataclasses.replace(plan.stages[0],
                                                                   after_step=(keep_left_half_at_zero,)),
                                               plan.stages[1]))
    out = pipe._run(masked, None).images
    assert seen == [0, 1, 2, 3]
    assert np.abs(out - plain).mean() > 2e-2  # well over the 2e-3 image tolerance


def test_cli_defaults_to_the_official_hub_models(tiny_sdxl, monkeypatch, tmp_path):
    """`mlx-sdxl generate "a cat"` with no --model resolves the official ids (offline, from the cache)."""
    from test_cli import run
    from test_sources import _populate_cache

    from mlx_sdxl.metadata import read_metadata

    cache = tmp_path / "hub"
    _populate_cache(cache, DEFAULT_BASE_ID, tiny_sdxl[0])
    _populate_cache(cache, DEFAULT_REFINER_ID, tiny_sdxl[1])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = ["--width", "64", "--height", "64", "--dtype", "float32", "--steps", "6", "--seed", "3", "-q",
             "--high-noise-frac", "0.5"]
    rc, out, err = run("generate", "a cat", *small, "-o", tmp_path / "both.png")
    assert rc == 0, err
    both = read_metadata(tmp_path / "both.png")
    assert both["model"] == DEFAULT_BASE_ID and both["refiner"] == DEFAULT_REFINER_ID
    rc, out, err = run("generate", "a cat", *small, "--refiner", "none", "-o", tmp_path / "base.png")
    assert rc == 0, err
    base_only = read_metadata(tmp_path / "base.png")
    assert base_only["model"] == DEFAULT_BASE_ID and base_only.get("refiner") is None
    pipes = {"both.png": SDXLPipeline.from_pretrained(DEFAULT_BASE_ID, DEFAULT_REFINER_ID, dtype=mx.float32),
             "base.png": SDXLPipeline.from_pretrained(DEFAULT_BASE_ID, dtype=mx.float32)}
    made = {}
    for name, hub_pipe in pipes.items():  # the CLI's images are the hub pipelines' images
        [expected] = hub_pipe("a cat", num_inference_steps=6, high_noise_frac=0.5, width=64, height=64, seed=3)
        with Image.open(tmp_path / name) as im:
            made[name] = np.asarray(im, np.float32)
        np.testing.assert_array_equal(made[name], np.asarray(expected, np.float32))
    assert np.abs(made["both.png"] - made["base.png"]).mean() > 0.1  # the refiner ran (pixel values 0-255)
    rc, out, err = run("generate", "a cat", *small, "--model", tiny_sdxl[0], "-o", tmp_path / "custom.png")
    assert rc == 0, err
    assert read_metadata(tmp_path / "custom.png").get("refiner") is None  # a named base runs alone
