"""Schedulers against diffusers 0.42.1, each built from the SDXL Euler config as the pipelines do."""

import types

import mlx.core as mx
import numpy as np
import pytest
import torch

from diffusers import StableDiffusionXLImg2ImgPipeline

from mlx_sdxl.errors import ConfigError, InputError
from mlx_sdxl.schedulers import SCHEDULERS, img2img_start, make_scheduler, split_for_handoff
from sampler_refs import DISTILLED, NoiseFeed, key_noise, randn as _randn, ref_sigmas, reference as _reference
from sampler_refs import rel_err, run_ours, run_ref

torch.set_grad_enabled(False)

# scheduler/scheduler_config.json of SDXL base 1.0 (fact sheet section 1.5)
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SHAPE = (2, 4, 8, 8)


def reference(name, config=SDXL):
    """diffusers' way: load the model's Euler scheduler, then X.from_config(euler.config)."""
    return _reference(name, config)


def pair(name, n, config=SDXL):
    ours, ref = make_scheduler(name, config), reference(name, config)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    return ours, ref


def randn(seed, shape=SHAPE):
    return _randn(seed, shape)


def assert_same_timesteps(ours, ref):
    """Integer timesteps bit-equal; Euler-Karras' fractional ones (log-sigma interpolation) to 1e-6,
    as they inherit the 1-ulp differences of the sigmas."""
    if np.array_equal(ref, ref.round()):
        np.testing.assert_array_equal(ours, ref)
    else:
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


def feed(monkeypatch, keys):
    """diffusers' stochastic samplers get the noise our keys draw."""
    return NoiseFeed(key_noise(keys, SHAPE)).install(monkeypatch)


# ----------------------------------------------------------------------------------------------
# schedules


def test_alphas_cumprod_bit_equal_to_diffusers():
    for name in SCHEDULERS:
        assert np.array_equal(make_scheduler(name, SDXL).alphas_cumprod, reference(name).alphas_cumprod.numpy())


@pytest.mark.parametrize("n", [1, 2, 5, 20, 40, 50])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedule_matches_diffusers(name, n):
    ours, ref = pair(name, n)
    assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
    assert len(ours.timesteps) == n and len(ours.sigmas) == n + 1
    assert_same_timesteps(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
    # torch's float32 x ** 0.5 on CPU is not always correctly rounded; numpy's sqrt is: allow 2 ulp
    np.testing.assert_array_max_ulp(ours.sigmas, ref_sigmas(name, ref).astype(np.float32), maxulp=2)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert isinstance(ours.init_noise_sigma, float)


def test_schedule_figures_from_fact_sheet():
    s = make_scheduler("euler", None)
    s.set_timesteps(40)
    assert s.init_noise_sigma == pytest.approx(12.778570, abs=2e-6)
    assert s.sigmas[0] == pytest.approx(12.739382, abs=2e-6)
    np.testing.assert_allclose(s.sigmas[-9:], [0.515391, 0.458333, 0.402218, 0.346187, 0.288948, 0.228147,
                                               0.157971, 0.041314, 0.0], atol=1e-6)
    d = make_scheduler("dpmpp_2m_karras", None)
    d.set_timesteps(40)
    assert d.timesteps[:3].tolist() == [999, 981, 963] and d.timesteps[-3:].tolist() == [2, 1, 0]
    assert d.init_noise_sigma == 1.0 and not d.is_ve and s.is_ve


VARIANTS = [
    {"timestep_spacing": "linspace"},
    {"timestep_spacing": "trailing"},
    {"use_karras_sigmas": True},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_config_variants_schedule(name, variant):
    cfg = {**SDXL, **variant}
    for n in (7, 30, 61):
        if name in DISTILLED and n > 50:  # at most original_inference_steps
            continue
        ours, ref = pair(name, n, cfg)
        overshoots = cfg.get("timestep_spacing") == "trailing" and len(np.arange(1000, 0, -1000 / n)) > n
        if overshoots and name == "euler_karras":
            continue  # diffusers' overshooting trailing grid (n=61) moves Euler's Karras sigma_min to t=-1
        ref_t = ref.timesteps.numpy().astype(np.float32)[:n]  # diffusers' "trailing" overshoots at n=61
        assert_same_timesteps(ours.timesteps, ref_t)
        np.testing.assert_array_max_ulp(ours.sigmas[:n], ref_sigmas(name, ref)[:n].astype(np.float32), maxulp=2)
        assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


def test_missing_keys_take_diffusers_defaults(monkeypatch):
    # an empty config: Euler's class defaults (linspace, linear betas); DDIM's own clip/alpha_to_one
    keys = list(mx.random.split(mx.random.key(0), 12))
    for name in SCHEDULERS:
        feed(monkeypatch, keys)
        ours, ref = pair(name, 12, {})
        assert_same_timesteps(ours.timesteps, ref.timesteps.numpy().astype(np.float32))
        x = randn(3) * np.float32(ours.init_noise_sigma)
        assert rel_err(run_ours(ours, x, 0, 12, keys), run_ref(ref, x, 0, 12)) < 1e-5, name
    assert make_scheduler("ddim", {}).config.clip_sample is True


# ----------------------------------------------------------------------------------------------
# steps


@pytest.mark.parametrize("name", SCHEDULERS)
def test_single_step_matches_diffusers(name, monkeypatch):
    n = 20
    for i in (0, 9, n - 1):
        ours, ref = pair(name, n)
        x, eps = randn(i) * 3, randn(100 + i)
        key = mx.random.key(i)
        feed(monkeypatch, [key])
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(i)
        t = ref.timesteps[i]
        xin_ref = ref.scale_model_input(torch.from_numpy(x), t)
        xin = ours.scale_model_input(mx.array(x), i)
        assert rel_err(np.array(xin), xin_ref.numpy()) < 1e-6
        out_ref = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x)).prev_sample.numpy()
        out = ours.step(mx.array(eps), i, mx.array(x), key=key)
        assert isinstance(out, mx.array) and out.dtype == mx.float32
        assert rel_err(np.array(out), out_ref) < 1e-5, (name, i)


@pytest.mark.parametrize("n", [10, 40])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_full_loop_matches_diffusers(name, n, monkeypatch):
    ours, ref = pair(name, n)
    keys = list(mx.random.split(mx.random.key(7), n))
    feed(monkeypatch, keys)
    x = randn(1) * np.float32(ours.init_noise_sigma)
    got, want = run_ours(ours, x, 0, n, keys), run_ref(ref, x, 0, n)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", SCHEDULERS)
def test_v_prediction_loop(name, monkeypatch):
    cfg = {**SDXL, "prediction_type": "v_prediction"}
    ours, ref = pair(name, 10, cfg)
    keys = list(mx.random.split(mx.random.key(3), 10))
    feed(monkeypatch, keys)
    x = randn(2) * np.float32(ours.init_noise_sigma)
    assert rel_err(run_ours(ours, x, 0, 10, keys), run_ref(ref, x, 0, 10)) < 1e-5


def test_dpm_history_is_per_instance():
    # a continued instance takes a 2nd-order step at index k; a fresh one a 1st-order step
    n, k = 20, 8
    x, eps = mx.array(randn(4)), mx.array(randn(5))
    cont = make_scheduler("dpmpp_2m")
    cont.set_timesteps(n)
    cont.step(eps, k - 1, x)
    fresh = make_scheduler("dpmpp_2m")
    fresh.set_timesteps(n)
    assert rel_err(np.array(cont.step(eps * 0.5, k, x)), np.array(fresh.step(eps * 0.5, k, x))) > 1e-4
    fresh.set_timesteps(n)  # set_timesteps clears the history
    cont.set_timesteps(n)
    assert np.array_equal(np.array(cont.step(eps, k, x)), np.array(fresh.step(eps, k, x)))


def test_euler_a_noise_follows_key():
    s = make_scheduler("euler_a")
    s.set_timesteps(10)
    x, eps = mx.array(randn(1)), mx.array(randn(2))
    a = np.array(s.step(eps, 3, x, key=mx.random.key(1)))
    b = np.array(s.step(eps, 3, x, key=mx.random.key(1)))
    c = np.array(s.step(eps, 3, x, key=mx.random.key(2)))
    assert np.array_equal(a, b) and not np.allclose(a, c)
    mx.random.seed(5)
    d = np.array(s.step(eps, 3, x))
    mx.random.seed(5)
    assert np.array_equal(d, np.array(s.step(eps, 3, x)))
    # the last step (sigma_to = 0) adds no noise: it is the x0 prediction
    last = np.array(s.step(eps, 9, x, key=mx.random.key(9)))
    np.testing.assert_allclose(last, np.array(x - float(s.sigmas[9]) * eps), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_half_precision_keeps_dtype(name):
    s = make_scheduler(name)
    s.set_timesteps(10)
    x, eps = mx.array(randn(1)).astype(mx.float16), mx.array(randn(2)).astype(mx.float16)
    assert s.scale_model_input(x, 2).dtype == mx.float16
    out = s.step(eps, 2, x, key=mx.random.key(0))
    out32 = make_scheduler(name)
    out32.set_timesteps(10)
    want = np.array(out32.step(eps.astype(mx.float32), 2, x.astype(mx.float32), key=mx.random.key(0)))
    assert out.dtype == mx.float16 and rel_err(np.array(out.astype(mx.float32)), want) < 2e-3


# ----------------------------------------------------------------------------------------------
# base -> refiner handoff and img2img


def refiner_start(ref, n, frac):
    """diffusers' own StableDiffusionXLImg2ImgPipeline.get_timesteps with denoising_start=frac."""
    ref.set_timesteps(n)
    pipe = types.SimpleNamespace(scheduler=ref)
    ts, count = StableDiffusionXLImg2ImgPipeline.get_timesteps(pipe, n, 0.3, "cpu", denoising_start=frac)
    assert len(ts) == count and ref.order == 1  # no 2nd-order (Heun-style) adjustment
    return n - count


def test_handoff_worked_example():
    s = make_scheduler("euler", SDXL)
    s.set_timesteps(40)
    k = split_for_handoff(s.timesteps, 0.8)
    assert k == 32
    assert s.timesteps[:k].tolist() == list(range(976, 200, -25))
    assert s.timesteps[k:].tolist() == list(range(176, 0, -25))
    assert s.sigmas[k] == pytest.approx(0.515391, abs=1e-6)
    assert s.sigmas[k - 1] == pytest.approx(0.574051, abs=1e-6)


@pytest.mark.parametrize(
    "n,frac,base,first,last_base,first_ref",
    [(20, 0.8, 16, 951, 201, 151), (25, 0.8, 20, 961, 201, 161), (30, 0.8, 23, 958, 232, 199),
     (50, 0.8, 40, 981, 201, 181), (40, 0.7, 28, 976, 301, 276)],
)
def test_handoff_table(n, frac, base, first, last_base, first_ref):
    for name in ("euler", "euler_a", "ddim"):
        s = make_scheduler(name, SDXL)
        s.set_timesteps(n)
        k = split_for_handoff(s.timesteps, frac)
        assert k == base
        assert (s.timesteps[0], s.timesteps[k - 1], s.timesteps[k], s.timesteps[-1]) == (first, last_base, first_ref, 1)
        assert k == refiner_start(reference(name), n, frac)


def test_handoff_dpm():
    s = make_scheduler("dpmpp_2m", SDXL)
    s.set_timesteps(40)
    k = split_for_handoff(s.timesteps, 0.8)
    assert k == 32 and (s.timesteps[0], s.timesteps[k - 1], s.timesteps[k], s.timesteps[-1]) == (961, 217, 193, 25)
    assert k == refiner_start(reference("dpmpp_2m"), 40, 0.8)
    s = make_scheduler("dpmpp_2m_karras", SDXL)
    s.set_timesteps(40)
    k = split_for_handoff(s.timesteps, 0.8)
    assert k == 25 and len(s.timesteps) - k == 15 and (s.timesteps[k], s.timesteps[-1]) == (183, 0)
    assert k == refiner_start(reference("dpmpp_2m_karras"), 40, 0.8)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_two_stage_loop_matches_diffusers(name, monkeypatch):
    """Base runs [0:k] on one instance; the refiner a FRESH instance from k, as the two pipelines do."""
    n, frac = 40, 0.8
    keys = list(mx.random.split(mx.random.key(11), n))
    feed(monkeypatch, keys)
    base, ref_base = pair(name, n)
    k = split_for_handoff(base.timesteps, frac)
    x = randn(6) * np.float32(base.init_noise_sigma)
    mid, mid_ref = run_ours(base, x, 0, k, keys), run_ref(ref_base, x, 0, k)
    assert rel_err(mid, mid_ref) < 1e-5
    refiner, ref_refiner = make_scheduler(name, SDXL), reference(name)
    refiner.set_timesteps(n)
    t_start = refiner_start(ref_refiner, n, frac)  # calls set_begin_index(t_start)
    assert t_start == k
    got = run_ours(refiner, mid, k, n, keys)
    want = run_ref(ref_refiner, mid_ref, k, n)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_matches_diffusers(name):
    n = 50
    ours, ref = pair(name, n)
    i = img2img_start(n, 0.3)
    assert i == 35
    x0, noise = randn(8), randn(9)
    if hasattr(ref, "set_begin_index"):
        pipe = types.SimpleNamespace(scheduler=ref)
        ts, count = StableDiffusionXLImg2ImgPipeline.get_timesteps(pipe, n, 0.3, "cpu")
        assert count == n - i and ref.begin_index == i
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref.timesteps[i : i + 1]).numpy()
    got = np.array(ours.add_noise(mx.array(x0), mx.array(noise), i))
    assert rel_err(got, want) < 1e-6


def test_img2img_figures():
    s = make_scheduler("euler", SDXL)
    s.set_timesteps(50)
    i = img2img_start(50, 0.3)
    assert len(s.timesteps[i:]) == 15 and s.timesteps[i] == 281 and s.timesteps[-1] == 1
    assert s.sigmas[i] == pytest.approx(0.77892, abs=1e-5)
    assert img2img_start(50, 1.0) == 0 and img2img_start(10, 0.25) == 8


# ----------------------------------------------------------------------------------------------
# bad input


def test_unknown_name_lists_accepted():
    with pytest.raises(ConfigError) as e:
        make_scheduler("heun", SDXL)
    for name in SCHEDULERS:
        assert name in str(e.value)


def test_aliases():
    assert make_scheduler("euler_ancestral").name == "euler_a"
    assert make_scheduler("DPM++2M").name == "dpmpp_2m"
    assert make_scheduler("dpmpp_2m_k").name == "dpmpp_2m_karras"


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "10", 1001])
def test_bad_step_count(n):
    s = make_scheduler("euler")
    with pytest.raises(InputError):
        s.set_timesteps(n)


@pytest.mark.parametrize(
    "bad",
    [{"prediction_type": "x0"}, {"beta_schedule": "squaredcos_cap_v2"}, {"timestep_spacing": "even"},
     {"interpolation_type": "log_linear"}, {"use_exponential_sigmas": True}, {"thresholding": True},
     {"final_sigmas_type": "sigma_min"}, {"trained_betas": [0.01] * 10}],
)
def test_unsupported_config(bad):
    with pytest.raises(ConfigError) as e:
        make_scheduler("euler", {**SDXL, **bad})
    assert next(iter(bad)) in str(e.value)


def test_bad_split_and_strength():
    ts = np.array([976.0, 1.0], dtype=np.float32)
    for frac in (0, 1, 1.2, -0.1, True):
        with pytest.raises(InputError):
            split_for_handoff(ts, frac)
    for strength in (-0.1, 1.5):
        with pytest.raises(InputError):
            img2img_start(10, strength)
    with pytest.raises(InputError):  # int(10 * 0.05) = 0 steps left
        img2img_start(10, 0.05)


def test_step_index_checked():
    s = make_scheduler("euler")
    with pytest.raises(InputError):
        s.step(mx.zeros(SHAPE), 0, mx.zeros(SHAPE))
    s.set_timesteps(5)
    with pytest.raises(InputError):
        s.step(mx.zeros(SHAPE), 5, mx.zeros(SHAPE))
