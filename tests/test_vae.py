"""The MLX AutoencoderKL against diffusers' on a tiny random SDXL-shaped VAE (fp32).

The tiny VAE has SDXL's structure (4 levels, 3 asymmetric-pad downsamples, 2 resnets
per encoder level, 3 per decoder level, single-head mid attention) at 8–32 channels.
"""

import copy
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_sdxl.errors import ConfigError, InputError, SDXLError, WeightsError
from mlx_sdxl.models.vae import AutoencoderKL, VAEConfig, load_vae, vae_from_weights
from mlx_sdxl.weights import load_safetensors

TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=8,
    block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.13025, force_upcast=True,
)
SDXL = dict(TINY, block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=1024)


def rel(ours, ref):
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model, its vae/ folder) with every parameter randomized."""
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # these models are tiny; threads only contend on a shared machine
    ref = TorchVAE(**TINY).eval()
    for p in ref.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("tiny_vae") / "vae"
    ref.save_pretrained(str(folder))
    return ref, folder


@pytest.fixture(scope="module")
def ours(tiny):
    return load_vae(tiny[1])


def random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- config

def test_config_from_dict():
    d = dict(SDXL, _class_name="AutoencoderKL", _diffusers_version="0.20.0", shift_factor=None,
             latents_mean=None, latents_std=None, mid_block_add_attention=True, use_quant_conv=True)
    assert VAEConfig.from_dict(d) == VAEConfig.sdxl()
    assert VAEConfig.sdxl().scale_factor == 8 and VAEConfig.sdxl().scaling_factor == 0.13025
    assert VAEConfig.from_dict({k: v for k, v in d.items() if k != "scaling_factor"}).scaling_factor == 0.13025
    assert VAEConfig.from_dict(dict(d, sample_size=[512, 512])).sample_size == 512
    bad = [
        dict(down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]),
        dict(up_block_types=["UpDecoderBlock2D"] * 3),
        dict(act_fn="gelu"),
        dict(norm_num_groups=48),
        dict(latents_mean=[0.0] * 4),
        dict(latents_std=[1.0] * 4),
        dict(shift_factor=0.1),
        dict(mid_block_add_attention=False),
        dict(use_post_quant_conv=False),
        dict(sample_size=[512, 768]),
    ]
    for change in bad:
        with pytest.raises(ConfigError) as e:
            VAEConfig.from_dict(dict(d, **change))
        assert str(e.value)


# ----------------------------------------------------------------------------- parity

def test_decode_matches_diffusers(tiny, ours):
    ref, _ = tiny
    z = random((2, 6, 4, 4), 1)  # latent 6×4 → image 48×32, batch 2
    want = nhwc(ref.decode(nchw(z)).sample)
    got = ours.decode(mx.array(z))
    assert got.shape == (2, 48, 32, 3) and got.dtype == mx.float32
    assert rel(got, want) <= 1e-4


def test_encode_matches_diffusers(tiny, ours):
    ref, _ = tiny
    x = np.tanh(random((2, 48, 32, 3), 2))
    post = ref.encode(nchw(x)).latent_dist
    got = ours.encode(mx.array(x))
    assert got.mean.shape == (2, 6, 4, 4)
    assert rel(got.mean, nhwc(post.mean)) <= 1e-4
    assert rel(got.logvar, nhwc(post.logvar)) <= 1e-4
    assert rel(got.std, nhwc(post.std)) <= 1e-4
    assert np.array_equal(np.array(got.mode()), np.array(got.mean))
    key = mx.random.key(7)
    drawn = got.sample(key=key)
    expected = got.mean + got.std * mx.random.normal(got.mean.shape, key=key)
    assert np.allclose(np.array(drawn), np.array(expected)) and not np.allclose(np.array(drawn), np.array(got.mean))


def test_logvar_is_clamped():
    from mlx_sdxl.models.vae import DiagonalGaussian

    moments = mx.concatenate([mx.zeros((1, 2, 2, 4)), mx.full((1, 2, 2, 4), 50.0)], axis=-1)
    post = DiagonalGaussian(moments)
    assert float(post.logvar.max()) == 20.0 and float(post.std.max()) == pytest.approx(np.exp(10.0), rel=1e-6)


@pytest.fixture
def tiled_ref(tiny):
    """diffusers' tiled path with 64 px / 8 latent tiles (stride 6 latents, blend 16 px)."""
    ref, _ = tiny
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 64, 8
    yield ref
    ref.disable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = TINY["sample_size"], 8


@pytest.mark.parametrize("batch,size", [(2, (20, 14)), (1, (9, 16))])  # 4×3 tiles, short edge tiles; 2×3
def test_tiled_decode_matches_diffusers(tiled_ref, ours, batch, size):
    z = random((batch, *size, 4), 3)
    want = nhwc(tiled_ref.decode(nchw(z)).sample)
    got = ours.decode(mx.array(z), tiled="blend")  # diffusers' blended tiling (exact tiling: test_vae_tiling)
    assert got.shape == want.shape == (batch, size[0] * 8, size[1] * 8, 3)
    assert rel(got, want) <= 1e-4


def test_tiled_encode_matches_diffusers(tiled_ref, ours):
    x = np.tanh(random((1, 160, 112, 3), 4))
    post = tiled_ref.encode(nchw(x)).latent_dist
    got = ours.encode(mx.array(x), tiled="blend")
    assert got.mean.shape == (1, 20, 14, 4)
    assert rel(got.mean, nhwc(post.mean)) <= 1e-4
    assert rel(got.logvar, nhwc(post.logvar)) <= 1e-4


def test_tiled_vs_untiled(ours):
    z = mx.array(random((1, 20, 14, 4), 5))
    ours.enable_tiling(tile_sample_size=64)  # blend settings: 8-latent tiles, stride 6, blend 16 px, keep 48 px
    try:
        tiled = ours.decode(z, tiled="blend")
        first = ours.decode(z[:, :8, :8], tiled="blend")  # fits in one tile: tiling does not trigger
        assert np.array_equal(np.array(first), np.array(ours.decode(z[:, :8, :8], tiled=False)))
        assert np.array_equal(np.array(ours.decode(z, tiled="blend", tile_size=64)), np.array(tiled))
    finally:
        ours.disable_tiling()
    # The first tile's kept part is never blended: it is that tile decoded alone.
    assert np.array_equal(np.array(tiled[:, :48, :48]), np.array(first[:, :48, :48]))
    untiled = ours.decode(z)
    # Each tile is normalized (GroupNorm) and attended over by itself, with zero padding at
    # its own borders. In this random, untrained decoder that changes the whole output:
    # even one 8×8-latent tile decoded alone differs from the same crop of the full decode
    # by ~1.2 relative L2. Measured tiled-vs-untiled relative L2 here: 0.897 (the tiling
    # itself is pinned to diffusers' tiled_decode above, to 1e-4). Bound: < 1.0.
    # (20×14 latents = 160×112 px fit in one 256 px default tile: decode(z) ran untiled.)
    diff = rel(tiled, untiled)
    assert 1e-3 < diff < 1.0
    assert np.isfinite(np.array(tiled)).all()


def test_tiled_decode_bounds_peak_memory(ours):
    z = mx.array(random((1, 16, 16, 4), 6))  # twice the 8-latent (64 px) tile along each side
    mx.eval(ours.parameters())
    ours.enable_tiling(tile_sample_size=64)
    try:
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(ours.decode(z, tiled=False))
        untiled = mx.get_peak_memory()
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(ours.decode(z, tiled="blend"))
        tiled = mx.get_peak_memory()
    finally:
        ours.disable_tiling()
    print(f"peak memory: untiled {untiled / 2**20:.1f} MiB, tiled {tiled / 2**20:.1f} MiB")
    assert tiled < 0.6 * untiled


# ----------------------------------------------------------------------------- precision

def _overflowing(tiny, z):
    """The tiny VAE's weights with post_quant_conv and decoder.conv_in's kernel each scaled
    by f, so that conv_in's output for `z` grows ~f²-fold to about 1e6 > 65504, while
    every weight still fits in fp16."""
    weights = dict(load_safetensors(tiny[1] / "diffusion_pytorch_model.safetensors"))
    vae = vae_from_weights(TINY, weights)
    f = (1e6 / float(mx.abs(vae.decoder.conv_in(vae.post_quant_conv(z))).max())) ** 0.5
    for k in ("post_quant_conv.weight", "post_quant_conv.bias", "decoder.conv_in.weight"):
        weights[k] = weights[k] * f
    assert all(np.isfinite(np.array(v.astype(mx.float16))).all() for v in weights.values())
    return weights


def test_fp16_force_upcast_avoids_overflow(tiny):
    z = mx.array(random((1, 2, 2, 4), 8))
    weights = _overflowing(tiny, z)
    fp32 = vae_from_weights(TINY, weights)
    peak = float(mx.abs(fp32.decoder.conv_in(fp32.post_quant_conv(z))).max())
    assert peak > 65504  # the premise: intermediate activations leave fp16's range

    raw = vae_from_weights(TINY, weights, dtype="float16", upcast=False)
    assert raw.compute_dtype == mx.float16
    out = np.array(raw.decode(z).astype(mx.float32))
    assert not np.isfinite(out).all()

    safe = vae_from_weights(TINY, weights, dtype="float16")  # force_upcast true → fp32 compute
    assert safe.dtype == mx.float16 and safe.compute_dtype == mx.float32
    out = safe.decode(z)
    assert out.dtype == mx.float32 and np.isfinite(np.array(out)).all()
    assert safe.dtype == mx.float16  # stored weights are untouched
    # Same numbers as an fp32 VAE holding the fp16-rounded weights.
    rounded = vae_from_weights(TINY, {k: v.astype(mx.float16) for k, v in weights.items()}, dtype="float32")
    assert rel(out, rounded.decode(z)) <= 1e-6
    post = safe.encode(mx.array(np.tanh(random((1, 16, 16, 3), 9))))
    assert post.mean.dtype == mx.float32


def test_dtype_policy(tiny):
    weights = dict(load_safetensors(tiny[1] / "diffusion_pytorch_model.safetensors"))
    fix = dict(TINY, force_upcast=False)  # like madebyollin/sdxl-vae-fp16-fix
    z = mx.array(random((1, 2, 2, 4), 10))
    assert vae_from_weights(fix, weights, dtype="float16").decode(z).dtype == mx.float16
    assert vae_from_weights(TINY, weights, dtype="bfloat16").decode(z).dtype == mx.bfloat16
    assert vae_from_weights(TINY, weights, dtype="bfloat16", upcast=True).decode(z).dtype == mx.float32
    assert vae_from_weights(fix, weights, dtype="float16", upcast=True).compute_dtype == mx.float32


def test_load_fp16_variant(tiny, tmp_path):
    ref, _ = tiny
    folder = tmp_path / "vae"
    copy.deepcopy(ref).half().save_pretrained(str(folder), variant="fp16")
    assert [p.name for p in folder.glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    vae = load_vae(tmp_path)  # a model root holding vae/ works too
    assert vae.dtype == mx.float16 and vae.compute_dtype == mx.float32
    z = random((1, 3, 2, 4), 11)
    assert rel(vae.decode(mx.array(z)), nhwc(ref.decode(nchw(z)).sample)) <= 1e-2


def test_legacy_attention_names(tiny, ours):
    weights = dict(load_safetensors(tiny[1] / "diffusion_pytorch_model.safetensors"))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in weights.items():
        for new, legacy in old.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
                v = v.reshape(*v.shape, 1, 1) if v.ndim == 2 else v  # 1×1 conv form
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    z = mx.array(random((1, 2, 3, 4), 12))
    assert np.array_equal(np.array(vae_from_weights(TINY, renamed).decode(z)), np.array(ours.decode(z)))


# ----------------------------------------------------------------------------- full size

def test_full_size_names_and_shapes():
    from diffusers import AutoencoderKL as TorchVAE

    with torch.device("meta"):
        ref = TorchVAE(**SDXL)
    want = {k: tuple(v.shape[i] for i in (0, 2, 3, 1)) if v.ndim == 4 else tuple(v.shape)
            for k, v in ref.state_dict().items()}
    ours = AutoencoderKL(VAEConfig.sdxl())
    got = {k: tuple(v.shape) for k, v in tree_flatten(ours.parameters())}  # shapes only, nothing evaluated
    assert got == want
    assert sum(int(np.prod(s)) for s in got.values()) == 83_653_863


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs(ours, tiny, tmp_path):
    with pytest.raises(InputError, match="4 channels"):
        ours.decode(mx.zeros((1, 6, 4, 3)))
    with pytest.raises(SDXLError, match="channels-first"):
        ours.decode(mx.zeros((1, 4, 6, 5)))
    with pytest.raises(InputError):
        ours.decode(mx.zeros((6, 4, 4)))
    with pytest.raises(InputError, match="multiples of 8"):
        ours.encode(mx.zeros((1, 44, 32, 3)))
    with pytest.raises(InputError, match="floating"):
        ours.encode(mx.zeros((1, 48, 32, 3), dtype=mx.int32))
    with pytest.raises(InputError):
        ours.enable_tiling(tile_sample_size=60)
    with pytest.raises(WeightsError, match="not found"):
        load_vae(tmp_path / "nowhere")
    only_config = tmp_path / "vae"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny[1] / "config.json").read_text())
    with pytest.raises(WeightsError, match="no safetensors"):
        load_vae(only_config)
    weights = dict(load_safetensors(tiny[1] / "diffusion_pytorch_model.safetensors"))
    del weights["decoder.conv_out.bias"]
    with pytest.raises(WeightsError, match="missing"):
        vae_from_weights(json.loads((tiny[1] / "config.json").read_text()), weights)
