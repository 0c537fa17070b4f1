"""The samplers of issue 17 (lcm, tcd, dpmpp_2m_sde(_karras), unipc, euler_karras), every sampler's
prediction types, timestep spacings and zero-SNR rescaling, against diffusers 0.42.1 (fp32).

Schedules: timesteps identical, sigmas within 2 ulp. Loops: a fixed fake model, the same explicit
noise for the stochastic samplers, 1e-5 relative.
"""

import contextlib

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sdxl.errors import ConfigError, InputError
from mlx_sdxl.schedulers import (SCHEDULERS, STOCHASTIC, default_scheduler, make_scheduler, scheduler_name,
                                 split_for_handoff)
from sampler_refs import DISTILLED, NoiseFeed, pair, randn, ref_sigmas, reference, rel_err, run_ours, run_ref

torch.set_grad_enabled(False)

SDXL = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
NEW = ("lcm", "tcd", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "unipc", "euler_karras")
SPACINGS = ("leading", "linspace", "trailing")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
STEPS = (1, 2, 4, 8, 25, 50)
SHAPE = (2, 8, 8, 4)  # NHWC, as the pipeline's latents
VP_ALPHA_BAR = ("ddim", "lcm", "tcd")  # alpha_bar(T-1) = 0 under zero SNR: no epsilon inversion there


def supports(name, prediction):
    return not (name == "euler_a" and prediction == "sample")


def config(spacing, prediction, zero_snr=False, **extra):
    return {**SDXL, "timestep_spacing": spacing, "prediction_type": prediction,
            "rescale_betas_zero_snr": zero_snr, **extra}


def noise_list(n, seed=5):
    return [randn(seed * 1000 + i, SHAPE) for i in range(n)]


@contextlib.contextmanager
def torch_sqrt_correctly_rounded():
    """torch.sqrt / Tensor.sqrt of float32 tensors rounded correctly (numpy's), for a while."""
    plain_fn, plain_method = torch.sqrt, torch.Tensor.sqrt

    def exact(t):
        return torch.from_numpy(np.sqrt(t.numpy())) if t.dtype == torch.float32 else plain_fn(t)

    torch.sqrt, torch.Tensor.sqrt = exact, exact
    try:
        yield
    finally:
        torch.sqrt, torch.Tensor.sqrt = plain_fn, plain_method


def assert_timesteps(ours, ref):
    ref_t = ref.timesteps.numpy().astype(np.float32)
    if np.array_equal(ref_t, ref_t.round()):
        np.testing.assert_array_equal(ours.timesteps, ref_t)
    else:  # Euler-Karras: fractional timesteps from log-sigma interpolation (1 ulp of the sigmas)
        np.testing.assert_allclose(ours.timesteps, ref_t, rtol=1e-6, atol=0)


def assert_schedule(ours, ref, name):
    assert_timesteps(ours, ref)
    np.testing.assert_array_max_ulp(ours.sigmas, ref_sigmas(name, ref).astype(np.float32), maxulp=2)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", NEW)
def test_schedule_matches_diffusers(name, spacing, prediction, zero_snr):
    cfg = config(spacing, prediction, zero_snr)
    for n in STEPS:
        if name in DISTILLED and zero_snr and prediction == "epsilon":
            with pytest.raises(ConfigError, match="v_prediction"):  # diffusers would divide by alpha_bar = 0
                make_scheduler(name, cfg).set_timesteps(n)
            continue
        ours, ref = pair(name, n, cfg)
        assert len(ours.timesteps) == n and len(ours.sigmas) == n + 1
        if not zero_snr:
            assert_schedule(ours, ref, name)
            np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
            continue
        # Zero-SNR rescaling subtracts sqrt(alpha_bar[T-1]) from every sqrt(alpha_bar): near t = T-1 that
        # cancellation turns torch's 1-ulp sqrt errors (its CPU sqrt is not correctly rounded, numpy's
        # is) into ~40 ulp of sigma. With torch's sqrt correctly rounded, diffusers gives our values.
        with torch_sqrt_correctly_rounded():
            exact = reference(name, cfg)
            exact.set_timesteps(n)
        assert_schedule(ours, exact, name)
        np.testing.assert_array_equal(ours.alphas_cumprod, exact.alphas_cumprod.numpy())
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-5)  # Karras: from the sigmas
        np.testing.assert_allclose(ours.sigmas, ref_sigmas(name, ref), rtol=5e-6)


def test_zero_snr_schedules_reach_pure_noise():
    # trailing spacing starts at t = 999, where rescaled alpha_bar is 0 (VP) or 2^-24 (diffusers' VE floor)
    for name in ("euler", "euler_a", "dpmpp_2m", "unipc"):
        s = make_scheduler(name, config("trailing", "v_prediction", True))
        s.set_timesteps(4)
        assert s.timesteps[0] == 999 and s.alphas_cumprod[-1] == np.float32(2.0**-24)
        assert s.sigmas[0] == pytest.approx(4096.0, rel=1e-6)
    for name in VP_ALPHA_BAR:
        s = make_scheduler(name, config("trailing", "v_prediction", True))
        s.set_timesteps(4)
        assert s.timesteps[0] == 999 and s.alphas_cumprod[-1] == 0
    plain = make_scheduler("euler", config("trailing", "v_prediction"))
    plain.set_timesteps(4)
    assert plain.sigmas[0] == pytest.approx(14.6146, rel=1e-4)  # without rescaling
    e = make_scheduler("euler", config("trailing", "v_prediction", True))
    e.set_timesteps(4)
    assert e.init_noise_sigma == pytest.approx(4096.0, rel=1e-6)  # trailing: sigma_max, not sqrt(sigma_max^2+1)


def test_distilled_grid_figures():
    s = make_scheduler("lcm", SDXL)
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 759, 499, 259]
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [999]
    t = make_scheduler("tcd", SDXL)
    t.set_timesteps(8)
    assert t.timesteps.tolist() == [999, 879, 759, 639, 499, 379, 259, 139]


def test_spacing_option_equals_the_config_setting():
    for name in ("euler", "unipc", "dpmpp_2m_sde", "ddim"):
        a = make_scheduler(name, SDXL, timestep_spacing="trailing")
        b = make_scheduler(name, {**SDXL, "timestep_spacing": "trailing"})
        a.set_timesteps(6)
        b.set_timesteps(6)
        assert np.array_equal(a.timesteps, b.timesteps) and np.array_equal(a.sigmas, b.sigmas)
        assert a.settings["timestep_spacing"] == "trailing"
        c = make_scheduler(name, SDXL)
        c.set_timesteps(6)
        assert not np.array_equal(a.timesteps, c.timesteps)  # leading differs
    assert make_scheduler("lcm", SDXL).settings == {"scheduler": "lcm", "timestep_spacing": None}


# ----------------------------------------------------------------------------------------------
# loops


def _loop_case(name, cfg, n, monkeypatch, eta=None):
    ours, ref = pair(name, n, cfg, **({} if eta is None else {"eta": eta}))
    noise = noise_list(n)
    NoiseFeed([z.transpose(0, 3, 1, 2) for z in noise]).install(monkeypatch)  # diffusers: NCHW
    x = randn(1, SHAPE) * np.float32(ours.init_noise_sigma)
    got = run_ours(ours, x, 0, n, noise=noise)
    want = run_ref(ref, np.ascontiguousarray(x.transpose(0, 3, 1, 2)), 0, n,
                   **({"eta": ours.eta} if name == "tcd" else {}))
    return got, want.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_loop_matches_diffusers(name, prediction, zero_snr, monkeypatch):
    """Every sampler x prediction type, trailing spacing (zero SNR: starts at alpha_bar ~ 0)."""
    if not supports(name, prediction) or (zero_snr and prediction == "epsilon" and name in VP_ALPHA_BAR):
        pytest.skip("refused: see test_bad_prediction_types")
    cfg = config("trailing", prediction, zero_snr)
    for n in (4, 9):
        got, want = _loop_case(name, cfg, n, monkeypatch)
        assert np.isfinite(got).all() and rel_err(got, want) < 1e-5, (name, n)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("name", NEW)
def test_loop_other_spacings(name, spacing, monkeypatch):
    for n in (1, 2, 8, 25):
        got, want = _loop_case(name, config(spacing, "epsilon"), n, monkeypatch)
        assert rel_err(got, want) < 1e-5, (name, n)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_eta(eta, monkeypatch):
    got, want = _loop_case("tcd", SDXL, 6, monkeypatch, eta=eta)
    assert rel_err(got, want) < 1e-5
    s = make_scheduler("tcd", SDXL, eta=eta)
    assert s.stochastic == (eta > 0) and s.settings["eta"] == eta
    s.set_timesteps(6)
    x, eps = mx.array(randn(2, SHAPE)), mx.array(randn(3, SHAPE))
    a = np.array(s.step(eps, 2, x, noise=mx.array(randn(4, SHAPE))))
    b = np.array(s.step(eps, 2, x, noise=mx.array(randn(5, SHAPE))))
    assert np.array_equal(a, b) == (eta == 0)  # eta 0: the noise plays no part
    assert make_scheduler("tcd", SDXL).eta == 0.3  # TCDScheduler's default gamma


def test_lcm_noise_enters_every_step_but_the_last():
    s = make_scheduler("lcm", SDXL)
    s.set_timesteps(4)
    x, eps = mx.array(randn(2, SHAPE)), mx.array(randn(3, SHAPE))
    z1, z2 = mx.array(randn(4, SHAPE)), mx.array(randn(5, SHAPE))
    assert rel_err(np.array(s.step(eps, 1, x, noise=z1)), np.array(s.step(eps, 1, x, noise=z2))) > 0.1
    assert np.array_equal(np.array(s.step(eps, 3, x, noise=z1)), np.array(s.step(eps, 3, x, noise=z2)))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_noise_given_or_drawn_from_key(name):
    s = make_scheduler(name, SDXL)
    assert s.stochastic
    s.set_timesteps(8)
    x, eps = mx.array(randn(2, SHAPE)), mx.array(randn(3, SHAPE))
    key = mx.random.key(4)
    drawn = np.array(s.step(eps, 3, x, key=key))
    s.set_timesteps(8)
    given = np.array(s.step(eps, 3, x, noise=mx.random.normal(SHAPE, key=key)))
    assert np.array_equal(drawn, given)
    s.set_timesteps(8)
    other = np.array(s.step(eps, 3, x, key=mx.random.key(5)))
    assert rel_err(other, drawn) > 1e-3
    with pytest.raises(InputError, match="shape"):
        s.step(eps, 3, x, noise=mx.zeros((1, 8, 8, 4)))


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - set(STOCHASTIC)))
def test_deterministic_samplers_ignore_noise(name):
    s = make_scheduler(name, SDXL)
    assert not s.stochastic
    s.set_timesteps(8)
    x, eps = mx.array(randn(2, SHAPE)), mx.array(randn(3, SHAPE))
    a = np.array(s.step(eps, 3, x, noise=mx.array(randn(9, SHAPE))))
    s.set_timesteps(8)  # the multistep samplers' history starts again
    assert np.array_equal(a, np.array(s.step(eps, 3, x)))


# ----------------------------------------------------------------------------------------------
# base -> refiner hand-off for every sampler, at diffusers' discrete cut


@pytest.mark.parametrize("name", SCHEDULERS)
def test_handoff_rule_for_every_sampler(name, monkeypatch):
    import types

    from diffusers import StableDiffusionXLImg2ImgPipeline

    for n, frac, spacing in ((12, 0.8, "leading"), (10, 0.8, "linspace"), (8, 0.7, "trailing")):
        cfg = config(spacing, "epsilon")
        base = make_scheduler(name, cfg)
        base.set_timesteps(n)
        k = split_for_handoff(base.timesteps, frac)
        ref = reference(name, cfg)
        ref.set_timesteps(n)
        ts, count = StableDiffusionXLImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=ref), n, 0.3,
                                                                    "cpu", denoising_start=frac)
        assert n - count == k and ref.order == 1
        noise = noise_list(n, seed=8)
        NoiseFeed([z.transpose(0, 3, 1, 2) for z in noise]).install(monkeypatch)
        x = randn(6, SHAPE) * np.float32(base.init_noise_sigma)
        mid = run_ours(base, x, 0, k, noise=noise)
        ref_base = reference(name, cfg)
        ref_base.set_timesteps(n)
        nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731
        mid_ref = run_ref(ref_base, nchw(x), 0, k)
        refiner = make_scheduler(name, cfg)  # a fresh instance, as the refiner pipeline has its own
        refiner.set_timesteps(n)
        got = run_ours(refiner, mid, k, n, noise=noise)
        want = run_ref(ref, mid_ref, k, n).transpose(0, 2, 3, 1)
        assert rel_err(got, want) < 1e-5, (name, n)


# ----------------------------------------------------------------------------------------------
# the model's own sampler


@pytest.mark.parametrize("cfg,name", [
    (SDXL, "euler"),
    (None, "euler"),
    ({**SDXL, "_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}, "euler_a"),
    ({**SDXL, "use_karras_sigmas": True}, "euler_karras"),
    ({**SDXL, "_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
    ({**SDXL, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpmpp_2m_karras"),
    ({**SDXL, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, "dpmpp_2m_sde"),
    ({**SDXL, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++",
      "use_karras_sigmas": True}, "dpmpp_2m_sde_karras"),
    ({**SDXL, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}, "euler"),
    ({**SDXL, "_class_name": "UniPCMultistepScheduler"}, "unipc"),
    ({**SDXL, "_class_name": "DDIMScheduler"}, "ddim"),
    ({**SDXL, "_class_name": "LCMScheduler"}, "lcm"),
    ({**SDXL, "_class_name": "TCDScheduler"}, "tcd"),
    ({**SDXL, "_class_name": "HeunDiscreteScheduler"}, "euler"),
])
def test_default_sampler_from_the_model_config(cfg, name):
    assert default_scheduler(cfg) == name


# ----------------------------------------------------------------------------------------------
# bad input: a clear error before any work, naming what is accepted


def test_unknown_sampler_and_spacing():
    with pytest.raises(ConfigError) as e:
        make_scheduler("dpmpp_3m", SDXL)
    assert all(name in str(e.value) for name in SCHEDULERS)
    with pytest.raises(InputError) as e:
        make_scheduler("euler", SDXL, timestep_spacing="sgm_uniform")
    assert all(s in str(e.value) for s in SPACINGS)
    with pytest.raises(ConfigError, match="timestep_spacing"):
        make_scheduler("euler", {**SDXL, "timestep_spacing": "even"})
    with pytest.raises(ConfigError, match="eta"):
        make_scheduler("euler", SDXL, gamma=0.3)


@pytest.mark.parametrize("name", DISTILLED)
def test_spacing_does_not_apply_to_distilled_samplers(name):
    with pytest.raises(InputError, match="original_inference_steps"):
        make_scheduler(name, SDXL, timestep_spacing="trailing")
    with pytest.raises(InputError, match="at most original_inference_steps=50"):
        make_scheduler(name, SDXL).set_timesteps(51)


def test_bad_prediction_types():
    with pytest.raises(ConfigError) as e:
        make_scheduler("euler_a", {**SDXL, "prediction_type": "sample"})
    assert "euler_a" in str(e.value) and "'epsilon'" not in str(e.value) and "epsilon, v_prediction" in str(e.value)
    with pytest.raises(InputError, match="epsilon, v_prediction, sample"):
        make_scheduler("euler", SDXL, prediction_type="flow_prediction")
    with pytest.raises(ConfigError, match="prediction_type"):
        make_scheduler("unipc", {**SDXL, "prediction_type": "flow_prediction"})
    # zero SNR + epsilon where alpha_bar reaches 0: refused when the schedule gets there
    with pytest.raises(ConfigError, match="v_prediction"):
        make_scheduler("ddim", config("trailing", "epsilon", True)).set_timesteps(4)
    make_scheduler("ddim", config("leading", "epsilon", True)).set_timesteps(4)  # starts at t = 751: fine
    make_scheduler("euler", config("trailing", "epsilon", True)).set_timesteps(4)  # 2^-24 floor: fine
    assert make_scheduler("euler", {**SDXL, "prediction_type": "original_sample"}).config.prediction_type == "sample"


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan"), "0.3", True])
def test_bad_eta(eta):
    with pytest.raises(InputError, match=r"eta must be a number in \[0, 1\]"):
        make_scheduler("tcd", SDXL, eta=eta)


def test_eta_only_for_tcd():
    with pytest.raises(InputError, match="tcd"):
        make_scheduler("lcm", SDXL, eta=0.5)


def test_names_and_aliases():
    assert scheduler_name("DPM++ 2M SDE Karras".replace(" ", "_").lower()) == "dpmpp_2m_sde_karras"
    assert scheduler_name("uni_pc") == "unipc" and scheduler_name("Euler_K") == "euler_karras"
    assert set(NEW) <= set(SCHEDULERS) and len(SCHEDULERS) == 11
