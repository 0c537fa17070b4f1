"""diffusers' counterpart of each of our samplers, and the same noise fed to both.

`reference(name, config)` builds the diffusers scheduler the way a diffusers user switches
samplers: load the model's (Euler) scheduler, then `X.from_config(euler.config, **settings)`, the
settings being what our sampler's name fixes (Karras sigmas, DPM-Solver's algorithm).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, TCDScheduler, UniPCMultistepScheduler)
from diffusers.schedulers import (scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete,
                                  scheduling_lcm, scheduling_tcd)

from mlx_sdxl.schedulers import make_scheduler

# name -> (diffusers class, settings the name fixes)
REFERENCES = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                      "use_karras_sigmas": True}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                                                          "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}
NOISE_MODULES = (scheduling_euler_ancestral_discrete, scheduling_lcm, scheduling_tcd, scheduling_dpmsolver_multistep)
DISTILLED = ("lcm", "tcd")  # their own timestep grid, at most original_inference_steps (50) steps


def reference(name, config, **options):
    """diffusers' scheduler for our `name`; `options` as make_scheduler takes them (eta excepted)."""
    cls, fixed = REFERENCES[name]
    euler = EulerDiscreteScheduler.from_config(config)
    return cls.from_config(euler.config, **fixed, **{k: v for k, v in options.items() if k != "eta"})


def pair(name, n, config, **options):
    ours, ref = make_scheduler(name, config, **options), reference(name, config, **options)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    return ours, ref


def ref_sigmas(name, ref):
    """The VE sigma of each step of a diffusers scheduler (+ final), for comparison with ours."""
    if name not in ("ddim", "lcm", "tcd"):
        return ref.sigmas.numpy()
    ac = ref.alphas_cumprod
    train = ((1 - ac) / ac) ** 0.5
    if name == "ddim":
        fa = ref.final_alpha_cumprod
        final = (((1 - fa) / fa) ** 0.5).item()
    else:
        final = 0.0  # the last step returns the x0 estimate
    return np.concatenate([train[ref.timesteps].numpy(), [final]])


class NoiseFeed:
    """Stands in for diffusers' randn_tensor: call k returns noise[k] (one per step, in order)."""

    def __init__(self, noise):
        self.noise = [torch.from_numpy(np.asarray(z)) for z in noise]
        self.calls = 0

    def __call__(self, shape, **kw):
        z = self.noise[self.calls]
        self.calls += 1
        assert tuple(z.shape) == tuple(shape)
        return z

    def install(self, monkeypatch):
        for module in NOISE_MODULES:
            monkeypatch.setattr(module, "randn_tensor", self)
        return self


def key_noise(keys, shape):
    """The noise each key draws, as a stochastic sampler of ours draws it with step(..., key=)."""
    return [np.array(mx.random.normal(shape, key=k)) for k in keys]


def model_np(x, t):
    """A deterministic stand-in for the UNet: eps(x, t)."""
    return np.tanh(0.3 * x) + 1e-3 * t


def ours_model(x, t):
    return mx.tanh(0.3 * x) + 1e-3 * float(t)


def ref_model(x, t):
    return torch.tanh(0.3 * x) + 1e-3 * float(t)


def run_ours(s, x, start, stop, keys=None, noise=None):
    """Our loop from step `start` to `stop`; stochastic noise by key[i] or given noise[i]."""
    x = mx.array(x)
    for i in range(start, stop):
        eps = ours_model(s.scale_model_input(x, i), s.timesteps[i])
        x = s.step(eps, i, x, key=None if keys is None else keys[i],
                   noise=None if noise is None else mx.array(noise[i]))
    return np.array(x)


def run_ref(ref, x, start, stop, **step_kwargs):
    x = torch.from_numpy(x)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    for i in range(start, stop):
        t = ref.timesteps[i]
        eps = ref_model(ref.scale_model_input(x, t), t)
        x = ref.step(eps, t, x, **step_kwargs).prev_sample
    return x.numpy()


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def randn(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
