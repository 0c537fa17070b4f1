"""Memory a machine can plan on: estimate_memory, the warning and --dry-run, per-stage and
whole-call peaks, the release of what a stage no longer needs, paced (segmented) UNet steps, and
the wired limit on Metal."""

import contextlib
import io
import os
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.errors import InputError, SDXLError
from mlx_sdxl.memory import device_memory, wired_limit
from mlx_sdxl.models import pacing
from mlx_sdxl.pipeline import memory_estimate
from mlx_sdxl.pipeline.memory_estimate import MemoryWarning
from mlx_sdxl.spec import BASE, DECODE, ENCODE, REFINER

SMALL = dict(num_inference_steps=4, height=64, width=64, output_type="np", seed=1)
STAGES = (ENCODE, BASE, REFINER, DECODE)


def fresh(tiny_sdxl, **kwargs):
    return SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32, **kwargs)


def run_cli(*argv):
    from mlx_sdxl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- the estimate


@pytest.mark.parametrize("bits", [None, 4])
def test_estimated_weights_are_the_loaded_ones(tiny_sdxl, bits):
    """Low memory holds one stage's models at a time: the estimate's weights per stage are exactly
    the bytes the pipeline held (dense and 4-bit), known before anything loaded."""
    pipe = fresh(tiny_sdxl, low_memory=True, refiner_bits=bits, base_bits=bits)
    guess = pipe.estimate_memory(64, 64, num_images_per_prompt=2)
    assert pipe.models.loaded() == []  # estimating loads nothing
    result = pipe.generate("a cat", num_images_per_prompt=2, **SMALL)
    for stage in STAGES:
        assert guess.stage(stage).weights == result.timings[stage].weights_memory, stage
        assert result.timings[stage].peak_memory >= result.timings[stage].weights_memory
    assert result.peak_memory >= max(result.timings[s].peak_memory for s in STAGES)


def test_default_mode_counts_every_model_in_every_stage(tiny_sdxl):
    pipe = fresh(tiny_sdxl)
    guess = pipe.estimate_memory(64, 64)
    pipe.generate("a cat", **SMALL)
    total = pipe.models.resident_bytes()
    assert {s.stage for s in guess.stages} == set(STAGES)
    assert all(s.weights == total for s in guess.stages)
    again = pipe.generate("a cat", **SMALL)  # repeated calls: everything stays loaded
    assert all(again.timings[s].weights_memory == total for s in STAGES)


def test_modes_and_sizes_move_the_estimate(tiny_sdxl):
    pipe = fresh(tiny_sdxl)
    plain = pipe.estimate_memory(64, 64)
    low = pipe.estimate_memory(64, 64, low_memory=True)
    q4 = pipe.estimate_memory(64, 64, low_memory=True, base_bits=4, refiner_bits=4)
    assert q4.peak <= low.peak < plain.peak  # (the tiny models' peak is the decode's)
    assert q4.stage(BASE).peak < low.stage(BASE).peak < plain.stage(BASE).peak
    big = pipe.estimate_memory(256, 256)
    assert big.stage(BASE).working > 4 * plain.stage(BASE).working  # ≥ 16× the pixels, same weights
    guided = pipe.estimate_memory(64, 64, guidance_scale=5.0).stage(BASE).working
    unguided = pipe.estimate_memory(64, 64, guidance_scale=1.0).stage(BASE).working
    assert unguided < guided  # no unconditional batch
    base_only = pipe.estimate_memory(64, 64, high_noise_frac=1.0)
    assert REFINER not in {s.stage for s in base_only.stages}
    assert DECODE not in {s.stage for s in pipe.estimate_memory(64, 64, output_type="latent").stages}
    assert "fits" in plain.table() and "decode" in plain.table()


def test_whole_image_decodes_on_request_and_the_estimate_follows(tiny_sdxl):
    """`pipe.vae.tile_size = None`: the default decode takes the whole image at once (bit-equal to
    tiled=False), and the estimate counts the whole-image decode's larger working memory."""
    pipe = fresh(tiny_sdxl)
    tiled = pipe.estimate_memory(512, 512).stage(DECODE).working
    vae = pipe.vae
    z = mx.random.normal((1, 24, 24, vae.config.latent_channels), key=mx.random.key(1))
    assert not np.array_equal(np.array(vae.decode(z)), np.array(vae.decode(z, tiled=False)))  # tiled: rounding
    vae.tile_size = None
    np.testing.assert_array_equal(np.array(vae.decode(z)), np.array(vae.decode(z, tiled=False)))
    assert pipe.estimate_memory(512, 512).stage(DECODE).working > tiled
    assert pipe.estimate_memory(512, 512, low_memory=True).stage(DECODE).working == tiled  # low memory tiles


def test_estimate_refuses_bad_settings(tiny_sdxl):
    pipe = fresh(tiny_sdxl)
    with pytest.raises(InputError, match="unexpected keyword|low_memory"):
        pipe.estimate_memory(64, 64, lowmemory=True)
    with pytest.raises(SDXLError, match="bits=7 is not supported; accepted: 2, 3, 4"):
        pipe.estimate_memory(64, 64, refiner_bits=7)
    with pytest.raises(InputError, match="width"):
        pipe.estimate_memory(60, 64)


def test_device_memory_is_the_machines():
    size, what = device_memory()
    assert size > 2 ** 30 and what


# ----------------------------------------------------------------------------- warning and --dry-run


def between(pipe, **kwargs) -> int:
    """A machine size that the low-memory mode fits and the default mode does not."""
    low, plain = (pipe.estimate_memory(64, 64, low_memory=m, **kwargs).peak for m in (True, False))
    assert low < plain
    return (low + plain) // 2


def test_generate_warns_and_names_the_mode_that_fits(tiny_sdxl, monkeypatch):
    pipe = fresh(tiny_sdxl)
    size = between(pipe)
    monkeypatch.setattr(memory_estimate, "device_memory", lambda: (size, "test memory"))
    with pytest.warns(MemoryWarning, match=r"more than the .* test memory.*Try --low-memory"):
        pipe.generate("a cat", **SMALL)
    monkeypatch.setattr(memory_estimate, "device_memory", lambda: (1000, "test memory"))
    with pytest.warns(MemoryWarning, match="No mode fits"):
        pipe.generate("a cat", **SMALL)
    monkeypatch.setattr(memory_estimate, "device_memory", lambda: (1 << 50, "test memory"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryWarning)
        pipe.generate("a cat", **SMALL)  # fits: no warning


def test_cli_dry_run_prints_the_estimate_and_makes_nothing(tiny_sdxl, tmp_path):
    out = tmp_path / "x.png"
    rc, stdout, stderr = run_cli("generate", "a cat", "--model", tiny_sdxl[0], "--refiner", tiny_sdxl[1],
                                 "--width", 64, "--height", 64, "--dtype", "float32", "--low-memory",
                                 "--refiner-bits", 4, "--dry-run", "--output", out)
    assert rc == 0, stderr
    assert not out.exists()
    lines = stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[1:5]] == list(STAGES)
    assert "expected peak" in lines[-1] and "--low-memory --refiner-bits 4" in lines[-1] and "fits" in lines[-1]


def test_cli_warns_once_with_the_fitting_mode(tiny_sdxl, tmp_path, monkeypatch):
    pipe = fresh(tiny_sdxl)
    size = between(pipe)
    monkeypatch.setattr(memory_estimate, "device_memory", lambda: (size, "test memory"))
    rc, _, stderr = run_cli("generate", "a cat", "--model", tiny_sdxl[0], "--refiner", tiny_sdxl[1], "--width",
                            64, "--height", 64, "--dtype", "float32", "--steps", 2, "--quiet", "--output",
                            tmp_path / "a.png")
    assert rc == 0, stderr
    warned = [line for line in stderr.splitlines() if "warning:" in line]
    assert len(warned) == 1 and "Try --low-memory" in warned[0] and "MemoryWarning" not in stderr


def test_base_bits_from_the_cli_are_used_and_recorded(tiny_sdxl, tmp_path):
    from mlx_sdxl.metadata import read_metadata

    out = tmp_path / "q.png"
    rc, _, stderr = run_cli("generate", "a cat", "--model", tiny_sdxl[0], "--width", 64, "--height", 64,
                            "--dtype", "float32", "--steps", 2, "--base-bits", 4, "--quiet", "--output", out)
    assert rc == 0, stderr
    assert read_metadata(out)["base_bits"] == 4


# ----------------------------------------------------------------------------- stages and steps


def test_low_memory_releases_between_stages(tiny_sdxl, monkeypatch):
    """Low memory: the text encoders are gone before the base loads, the base before the refiner,
    MLX's cache is emptied at each boundary, and each stage (with its conditioning) is dropped
    as soon as it has run."""
    from mlx_sdxl.pipeline import runner

    pipe = fresh(tiny_sdxl, low_memory=True)
    loaded, lists, cleared = [], [], []
    real_stage, real_stages, real_clear = runner.run_stage, runner.run_stages, mx.clear_cache

    def stage_spy(p, stage, x, callback, timings):
        loaded.append([part for part, _ in p.models.loaded()])
        return real_stage(p, stage, x, callback, timings)

    def stages_spy(p, stages, x, callback, timings):
        lists.append(stages)
        return real_stages(p, stages, x, callback, timings)

    monkeypatch.setattr(runner, "run_stage", stage_spy)
    monkeypatch.setattr(runner, "run_stages", stages_spy)
    monkeypatch.setattr(mx, "clear_cache", lambda: (cleared.append(1), real_clear()))
    pipe.generate("a cat", **SMALL)
    assert loaded == [[], []]
    assert lists == [[]]  # emptied as the stages ran
    assert len(cleared) >= 4  # text encoders, base (released and after), refiner


def test_paced_steps_equal_unpaced_and_run_in_segments(tiny_sdxl):
    from mlx_sdxl.models.unet import load_unet

    unet = load_unet(Path(tiny_sdxl[0]) / "unet", dtype=mx.float32)
    key = mx.random.key(0)
    cfg = unet.config
    x = mx.random.normal((2, 8, 8, cfg.in_channels), key=key)
    ctx = mx.random.normal((2, 77, cfg.cross_attention_dim), key=key)
    pooled = mx.random.normal((2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim),
                              key=key)
    ids = mx.array([[64.0, 64, 0, 0, 64, 64]] * 2)
    plain = unet(x, 500.0, ctx, text_embeds=pooled, time_ids=ids)
    pacer = pacing.Pacer()
    with pacing.pacing(pacer):
        paced = unet(x, 500.0, ctx, text_embeds=pooled, time_ids=ids)
        compiled = unet.compiled()(x, 500.0, ctx, text_embeds=pooled, time_ids=ids)  # traced unpaced
    mx.eval(plain, paced, compiled)
    assert pacer.boundaries >= len(unet.transformer_blocks()) + 4  # every layer (compiled: none)
    assert pacer.segments == pacer.boundaries // pacing.STRIDE
    np.testing.assert_array_equal(np.array(plain), np.array(paced))
    np.testing.assert_allclose(np.array(compiled), np.array(plain), rtol=1e-4, atol=1e-5)


def test_pace_outside_a_pacing_context_does_nothing():
    a = mx.ones((4,)) * 2
    pacing.pace(a)  # no pacer: nothing scheduled, nothing raised
    pacer = pacing.Pacer(stride=2, depth=1)
    with pacing.pacing(pacer):
        for i in range(5):
            pacing.pace(a + i)
    assert (pacer.boundaries, pacer.segments) == (5, 2)


def test_wired_limit_is_raised_on_metal_and_restored(monkeypatch):
    import mlx_sdxl.memory as memory

    calls = []
    monkeypatch.setattr(memory, "metal_available", lambda: True)
    monkeypatch.setattr(memory, "_info", lambda: {"max_recommended_working_set_size": 123})
    monkeypatch.setattr(memory.mx, "set_wired_limit", lambda n: (calls.append(n), 7)[1])
    monkeypatch.setattr(memory.mx, "synchronize", lambda *a: None)
    with wired_limit():
        assert calls == [123]
    assert calls == [123, 7]
    monkeypatch.setattr(memory, "metal_available", lambda: False)
    with wired_limit():
        pass
    assert calls == [123, 7]


# ----------------------------------------------------------------------------- full size (slow)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MLX_SDXL_SLOW"), reason="full-size models (~11 GB); set MLX_SDXL_SLOW=1")
@pytest.mark.parametrize("size", [256, 512])
def test_full_size_estimate_within_a_quarter_of_the_measured_peaks(size):
    """Full-size random weights, fp32, low memory (all of it would not fit in 24 GB): every
    stage's measured peak is within 25% of the estimate, and its working memory within a factor 1.5."""
    from bench.models import random_source

    pipe = SDXLPipeline(random_source(BASE), random_source(REFINER), dtype=mx.float32, low_memory=True)
    guess = pipe.estimate_memory(size, size, high_noise_frac=0.5)
    result = pipe.generate("a cat", num_inference_steps=2, width=size, height=size, high_noise_frac=0.5,
                           seed=0, output_type="np")
    for stage in guess.stages:
        got = result.timings[stage.stage]
        assert abs(got.peak_memory / stage.peak - 1) <= 0.25, (stage, got)
        if stage.stage != ENCODE:  # the text encoders' few MB of activations are noise
            assert 1 / 1.5 <= got.working_memory / stage.working <= 1.5, (stage, got)
