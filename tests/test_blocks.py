"""Shared building blocks against PyTorch: GroupNorm (+ SiLU) over NHWC and token layouts."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sdxl.models import blocks, cpu_kernels


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("shape,groups", [((2, 9, 7, 64), 32), ((1, 5, 6, 48), 8), ((2, 77, 96), 32)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_matches_torch(shape, groups, silu):
    rng = np.random.default_rng(0)
    c = shape[-1]
    # an offset mean and uneven scales per channel, as activations have
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 4, c) + rng.uniform(-3, 3, c)).astype(np.float32)
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    ref = torch.nn.GroupNorm(groups, c, eps=1e-5)
    ref.weight.data, ref.bias.data = torch.from_numpy(w), torch.from_numpy(b)
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    want = ref(xt)
    want = np.moveaxis((torch.nn.functional.silu(want) if silu else want).detach().numpy(), 1, -1)
    norm = blocks.group_norm(c, 1e-5, groups)
    norm.weight, norm.bias = mx.array(w), mx.array(b)
    got = norm(mx.array(x), silu=silu)
    assert got.shape == x.shape and got.dtype == mx.float32
    assert rel_l2(got, want) <= 1e-5


def test_group_norm_float16_keeps_dtype_and_accuracy():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 16, 16, 64)) * 3 + 2).astype(np.float32)
    norm = blocks.group_norm(64, 1e-5)
    want = np.array(norm(mx.array(x), silu=True))
    norm.set_dtype(mx.float16)
    got = norm(mx.array(x).astype(mx.float16), silu=True)
    assert got.dtype == mx.float16
    assert rel_l2(got.astype(mx.float32), want) <= 2e-3


@pytest.mark.parametrize("compiler", [True, False])
def test_geglu_paths_equal_gelu_gate(monkeypatch, compiler):
    """Every GEGLU path (CPU arithmetic, fused kernel, plain ops without a C++ compiler) is h * gelu(gate)."""
    import mlx.nn as nn

    monkeypatch.setattr(cpu_kernels, "_can_compile_cpu", lambda: compiler)
    x = mx.random.normal((2, 7, 64), key=mx.random.key(3)) * 3
    h, g = mx.split(x, 2, axis=-1)
    for dtype, tol in ((mx.float32, 1e-6), (mx.float16, 2e-3)):
        hd, gd = h.astype(dtype), g.astype(dtype)
        got = cpu_kernels.geglu(hd, gd)
        assert got.dtype == dtype
        assert rel_l2(got.astype(mx.float32), (h * nn.gelu(g))) <= tol
