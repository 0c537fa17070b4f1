"""Affine quantization of the UNet: layers, sizes, accuracy, save/load, pipeline."""

import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sdxl.errors import ConfigError
from mlx_sdxl.models.unet import UNet2DConditionModel, UNetConfig, unet_from_weights
from mlx_sdxl.quantize import (BITS, QConv2d, QLinear, prepare_quantized, quantization_info, quantize_model,
                               quantize_unet, quantized_nbytes)


def rel_l2(a, b):
    return (mx.linalg.norm((a - b).astype(mx.float32)) / mx.linalg.norm(b.astype(mx.float32))).item()


class Small(nn.Module):
    """A bit of everything: quantizable and non-quantizable linears and convs, an embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.conv_in = nn.Conv2d(4, 64, 3, padding=1)         # fan-in 36: stays dense
        self.conv = nn.Conv2d(64, 64, 3, stride=2, padding=1)  # fan-in 576
        self.shortcut = nn.Conv2d(64, 32, 1, bias=False)      # fan-in 64
        self.proj = nn.Linear(32, 128)                         # fan-in 32: quantized only at group 32
        self.odd = nn.Linear(48, 16)                           # fan-in 48: always dense
        self.out = [nn.Linear(128, 48, bias=False)]

    def __call__(self, x):
        h = self.shortcut(nn.silu(self.conv(self.conv_in(x))))
        h = self.out[0](nn.silu(self.proj(h)))
        return self.odd(h)


def small_model(seed=0):
    mx.random.seed(seed)
    return Small()


def layer_types(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if name}


# ------------------------------------------------------------------ bad settings
@pytest.mark.parametrize("bits", [7, 1, 0, 16, 4.0, True, "4", None])
def test_bad_bits_refused(bits):
    with pytest.raises(ConfigError, match=r"bits=.*accepted: 2, 3, 4, 5, 6, 8"):
        quantize_model(small_model(), bits=bits)
    with pytest.raises(ConfigError, match="accepted: 2, 3, 4, 5, 6, 8"):
        quantize_unet(small_model(), bits=bits)
    with pytest.raises(ConfigError, match="accepted: 2, 3, 4, 5, 6, 8"):
        prepare_quantized(small_model(), bits=bits)


@pytest.mark.parametrize("group_size", [48, 16, 256, 0, 64.0])
def test_bad_group_size_refused(group_size):
    with pytest.raises(ConfigError, match=r"group_size=.*accepted: 32, 64, 128"):
        quantize_model(small_model(), bits=4, group_size=group_size)
    with pytest.raises(ConfigError, match="accepted: 32, 64, 128"):
        QLinear(192, 8, group_size=group_size)


def test_indivisible_layer_refused_by_constructors():
    with pytest.raises(ConfigError, match="input size 48, not a multiple of the group size 32"):
        QLinear(48, 8, group_size=32)
    with pytest.raises(ConfigError, match="input size 36"):
        QConv2d(4, 32, 3, group_size=32)


# ------------------------------------------------------------------ layers
@pytest.mark.parametrize("bits", BITS)
def test_qlinear_both_paths_match_dequantized_dense(bits):
    mx.random.seed(1)
    lin = nn.Linear(128, 96)
    lin.bias = mx.random.normal((96,))
    q = QLinear.from_linear(lin, bits, 64)
    w = mx.dequantize(q.weight, q.scales, q.biases, 64, bits)
    for shape in [(1, 128), (2, 3, 128), (2, 300, 128)]:
        x = mx.random.normal(shape)
        ref = x @ w.T + lin.bias
        q.dense_tokens = 10**9   # always quantized_matmul
        assert rel_l2(q(x), ref) < 1e-5
        q.dense_tokens = 0       # always dequantize-then-matmul
        assert rel_l2(q(x), ref) < 1e-5
        q.dense_tokens = None    # device default
        assert rel_l2(q(x), ref) < 1e-5
    # quantization noise itself: about 2^-bits of the weight range
    assert rel_l2(w, lin.weight) < {2: 0.5, 3: 0.25, 4: 0.12, 5: 0.06, 6: 0.03, 8: 0.008}[bits]


def test_qlinear_names_and_shapes_match_nn_quantized_linear():
    ours = QLinear.from_linear(nn.Linear(128, 96), 4, 64)
    theirs = nn.QuantizedLinear(128, 96, bias=True, group_size=64, bits=4)
    ours_p, theirs_p = dict(tree_flatten(ours.parameters())), dict(tree_flatten(theirs.parameters()))
    assert {k: v.shape for k, v in ours_p.items()} == {k: v.shape for k, v in theirs_p.items()}
    assert set(ours_p) == {"weight", "scales", "biases", "bias"}
    # their weights load into ours and give their output
    ours.load_weights(list(theirs_p.items()))
    x = mx.random.normal((5, 128))
    assert rel_l2(ours(x), theirs(x)) < 1e-5
    assert "bits" not in ours_p and ours.bits == 4 and ours.group_size == 64


@pytest.mark.parametrize("kernel,stride,padding,bias", [(3, 1, 1, True), (3, 2, 1, True), (1, 1, 0, False)])
def test_qconv2d_matches_conv_with_dequantized_kernel(kernel, stride, padding, bias):
    mx.random.seed(2)
    conv = nn.Conv2d(64, 48, kernel, stride=stride, padding=padding, bias=bias)
    if bias:
        conv.bias = mx.random.normal((48,))
    x = mx.random.normal((2, 9, 10, 64))
    q8 = QConv2d.from_conv(conv, 8, 64)
    assert q8.dense_weight().shape == conv.weight.shape
    dense = nn.Conv2d(64, 48, kernel, stride=stride, padding=padding, bias=bias)
    dense.update(dict(conv.parameters()))
    dense.weight = q8.dense_weight()
    assert rel_l2(q8(x), dense(x)) < 1e-5
    assert rel_l2(q8(x), conv(x)) < 0.01      # 8-bit is close to the original conv
    q4 = QConv2d.from_conv(conv, 4, 32)
    assert 0.01 < rel_l2(q4(x), conv(x)) < 0.15
    assert set(dict(tree_flatten(q8.parameters()))) == {"weight", "scales", "biases"} | ({"bias"} if bias else set())


def test_quantize_model_picks_layers():
    m = quantize_model(small_model(), bits=4, group_size=64)
    types = layer_types(m)
    assert types["embed"] == "Embedding" and types["conv_in"] == "Conv2d" and types["odd"] == "Linear"
    assert types["proj"] == "Linear"                      # 32 inputs, group 64
    assert types["conv"] == types["shortcut"] == "QConv2d" and types["out.0"] == "QLinear"
    assert quantization_info(m) == {"bits": 4, "group_size": 64, "convs": True}

    m = quantize_model(small_model(), bits=3, group_size=32)
    assert layer_types(m)["proj"] == "QLinear"           # 32 inputs, group 32

    m = quantize_model(small_model(), bits=4, convs=False)
    types = layer_types(m)
    assert types["conv"] == types["shortcut"] == "Conv2d" and types["out.0"] == "QLinear"
    assert quantization_info(m) == {"bits": 4, "group_size": 64, "convs": False}
    assert quantization_info(small_model()) == {}
    x = mx.random.normal((1, 8, 8, 4))
    assert m(x).shape == small_model()(x).shape


def test_quantize_lazily_loaded_model_never_holds_all_dense_weights(tmp_path):
    """With weights mapped lazily from a file, quantizing keeps at most ~one dense layer alive."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(1024, 1024) for _ in range(8)]   # 4 MB each in fp32

    path = str(tmp_path / "stack.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(Stack().parameters())))
    model = Stack()
    model.load_weights(path)                                          # lazy: nothing read yet
    mx.eval(mx.zeros(1))
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    quantize_model(model, bits=4, group_size=64)
    dense_bytes, quant_bytes = 8 * 4 * 1024 * 1028, quantized_nbytes(model, None, dtype=mx.float32)
    assert all(isinstance(layer, QLinear) for layer in model.layers)
    assert mx.get_active_memory() - base < quant_bytes + 65536
    assert mx.get_peak_memory() - base < quant_bytes + 2 * 4 * 1024 * 1028 < dense_bytes / 2


def test_quantization_info_refuses_mixed_settings():
    m = quantize_model(small_model(), bits=4, group_size=64)
    m.proj = QLinear.from_linear(nn.Linear(32, 128), 8, 32)
    with pytest.raises(ConfigError, match="mixes quantization settings"):
        quantization_info(m)


# ------------------------------------------------------------------ sizes
def test_quantized_nbytes_full_refiner_without_allocating():
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    cfg = UNetConfig.sdxl_refiner()
    dense = quantized_nbytes(cfg, None)
    with_convs = quantized_nbytes(cfg, 4, 64, True)
    linear_only = quantized_nbytes(cfg, 4, 64, False)
    assert dense == 2 * 2_259_526_660                    # 4.52 GB fp16 (facts §1.1)
    assert 1.2e9 < with_convs <= 1.4e9
    assert 2.3e9 < linear_only < 2.5e9
    sizes = [quantized_nbytes(cfg, b, 64, True) for b in BITS]
    assert sizes == sorted(sizes) and sizes[-1] < linear_only
    assert quantized_nbytes(cfg, 4, 128) < with_convs < quantized_nbytes(cfg, 4, 32)
    # shapes only, nothing evaluated (the peak starts at what earlier tests keep alive)
    assert mx.get_peak_memory() - before < 1e6 and mx.get_active_memory() - before < 1e6


@pytest.mark.parametrize("bits,group_size,convs", [(4, 32, True), (3, 64, False), (8, 128, True)])
def test_quantized_nbytes_equals_real_arrays(bits, group_size, convs):
    model = quantize_model(small_model(), bits, group_size, convs)
    real = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert quantized_nbytes(small_model(), bits, group_size, convs, dtype=mx.float32) == real
    assert quantized_nbytes(model, None, dtype=mx.float32) == real


def test_prepare_full_refiner_is_lazy_and_sized(monkeypatch):
    """prepare_quantized never quantizes nor evaluates: the 9 GB fp32 model is never made."""
    monkeypatch.setattr(mx, "quantize", lambda *a, **k: pytest.fail("prepare_quantized called mx.quantize"))
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = prepare_quantized(UNet2DConditionModel(UNetConfig.sdxl_refiner()), 4, 64, True)
    params = dict(tree_flatten(model.parameters()))
    assert mx.get_peak_memory() - before < 1e6
    assert sum(v.nbytes for v in params.values()) == quantized_nbytes(model, None, dtype=mx.float32) \
        == quantized_nbytes(UNetConfig.sdxl_refiner(), 4, 64, True, dtype=mx.float32)
    q = model.down_blocks[1].attentions[0].transformer_blocks[0]
    assert isinstance(q.ff.net[0].proj, QLinear) and params["conv_out.weight"].dtype == mx.uint32
    assert isinstance(model.conv_in, nn.Conv2d)           # 4·3·3 = 36 inputs: dense


# ------------------------------------------------------------------ the tiny UNet
@pytest.fixture(scope="module")
def tiny_refiner():
    """Our UNet with the weights of tests/tiny.py's random diffusers refiner, and one set of inputs."""
    from tiny import POOLED, TE2_WIDTH, tiny_unet

    torch_unet = tiny_unet("refiner", 0)
    cfg = UNetConfig.from_dict({k: v for k, v in torch_unet.config.items() if not k.startswith("_use")})
    weights = {k: mx.array(v.numpy()) for k, v in torch_unet.state_dict().items()}
    mx.random.seed(0)
    inputs = (mx.random.normal((2, 16, 16, 4)), mx.array([500.0, 500.0]), mx.random.normal((2, 77, TE2_WIDTH)),
              mx.random.normal((2, POOLED)), mx.array([[1024.0, 1024.0, 0.0, 0.0, 6.0]] * 2))
    return (lambda: unet_from_weights(cfg, weights)), inputs


def _dequantized_copy(model, build):
    """A dense model holding the quantized model's dequantized weights."""
    weights = dict(tree_flatten(model.parameters()))
    for name, m in model.named_modules():
        if isinstance(m, (QLinear, QConv2d)):
            for key in ("weight", "scales", "biases"):
                del weights[f"{name}.{key}"]
            weights[f"{name}.weight"] = m.dense_weight()
    dense = build()
    dense.load_weights(list(weights.items()), strict=True)
    return dense


def test_tiny_unet_forward_is_the_dequantized_model(tiny_refiner):
    """QLinear/QConv2d compute exactly what the dense UNet with dequantized weights computes."""
    build, inputs = tiny_refiner
    q = quantize_unet(build(), bits=4, group_size=32)
    ours = q(*inputs)
    assert rel_l2(ours, _dequantized_copy(q, build)(*inputs)) < 1e-5
    n_q = sum(isinstance(m, (QLinear, QConv2d)) for _, m in q.named_modules())
    dense = sorted(name for name, m in q.named_modules() if type(m) in (nn.Linear, nn.Conv2d))
    assert dense == ["add_embedding.linear_1", "conv_in"] and n_q > 100  # 72 and 36 inputs: not ÷ 32


# Relative L2 error of the tiny refiner's output vs fp32, measured (group 32 / 64):
# convs+linear: 2b .434/.352, 3b .288/.211, 4b .171/.116, 5b .072/.060, 6b .039/.030, 8b .0099/.0069
# linear only:  2b .099/.103, 3b .042/.050, 4b .022/.026, 5b .010/.011, 6b .005/.006, 8b .0013/.0015
ERROR_BOUNDS = {2: 0.6, 3: 0.4, 4: 0.25, 5: 0.11, 6: 0.06, 8: 0.015}


def test_tiny_unet_error_per_bit_width(tiny_refiner):
    build, inputs = tiny_refiner
    ref = build()(*inputs)
    errors = {b: rel_l2(quantize_unet(build(), bits=b, group_size=32)(*inputs), ref) for b in BITS}
    print("rel L2 vs fp32, convs+linear, group 32:", {b: round(e, 4) for b, e in errors.items()})
    assert all(errors[b] <= ERROR_BOUNDS[b] for b in BITS), errors
    assert [errors[b] for b in BITS] == sorted(errors.values(), reverse=True)
    linear_only = rel_l2(quantize_unet(build(), bits=4, group_size=64, convs=False)(*inputs), ref)
    assert 0.005 < linear_only < 0.04


def test_tiny_unet_save_prepare_load_round_trip(tiny_refiner, tmp_path, monkeypatch):
    build, inputs = tiny_refiner
    q = quantize_unet(build(), bits=4, group_size=32)
    expected = q(*inputs)
    path = str(tmp_path / "unet.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(q.parameters())))
    info = json.loads(json.dumps(quantization_info(q)))   # as recorded in a JSON config
    assert info == {"bits": 4, "group_size": 32, "convs": True}

    monkeypatch.setattr(mx, "quantize", lambda *a, **k: pytest.fail("loading must not quantize"))
    fresh = prepare_quantized(UNet2DConditionModel(q.config), **info)
    fresh.load_weights(path, strict=True)
    assert layer_types(fresh) == layer_types(q)
    assert mx.array_equal(fresh(*inputs), expected).item()


# ------------------------------------------------------------------ the pipeline
# Tiny pipeline, 10 steps, hand-off at 0.5, 4-bit refiner (group 64) vs fp32 refiner, measured:
# final latents rel L2 8.1e-4 (the refiner's own effect, refined vs not: 7.6e-3),
# images mean |Δ| 5.4e-5 on [0, 1] (images vary with std ~0.1). Tiny random models change
# little per step, hence the small numbers; the bounds are ~3× the measurements.
PIPELINE_IMAGE_BOUND = 1.6e-4
PIPELINE_LATENT_BOUND = 2.5e-3


def test_pipeline_with_4bit_refiner(tiny_sdxl):
    from mlx_sdxl import SDXLPipeline

    base_dir, refiner_dir, _, _ = tiny_sdxl
    noise = mx.array(np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32))
    kw = dict(latents=noise, num_inference_steps=10, high_noise_frac=0.5, height=64, width=64,
              output_type="latent")
    dense_pipe = SDXLPipeline.from_pretrained(base_dir, refiner_dir, dtype=mx.float32)
    q_pipe = SDXLPipeline.from_pretrained(base_dir, refiner_dir, dtype=mx.float32, refiner_bits=4)
    dense, quant = dense_pipe("a photo of a cat", **kw), q_pipe("a photo of a cat", **kw)
    unrefined = dense_pipe("a photo of a cat", **{**kw, "high_noise_frac": 1.0})
    assert any(quantization_info(m) == {"bits": 4, "group_size": 64, "convs": True}
               for (name, _), m in q_pipe.models.items() if name == "unet")

    latent_err, refiner_effect = rel_l2(quant, dense), rel_l2(unrefined, dense)
    image_diff = np.abs(q_pipe.decode_latents(quant) - dense_pipe.decode_latents(dense)).mean()
    print(f"4-bit refiner: latents rel L2 {latent_err:.2e} (refiner effect {refiner_effect:.2e}), "
          f"images mean |Δ| {image_diff:.2e}")
    assert 0 < latent_err <= PIPELINE_LATENT_BOUND and latent_err < 0.25 * refiner_effect
    assert 0 < image_diff <= PIPELINE_IMAGE_BOUND


def test_pipeline_base_and_text_encoder_bits(tiny_sdxl):
    """base_bits / text_encoder_bits quantize those models too (8-bit: close to dense)."""
    from mlx_sdxl import SDXLPipeline

    base_dir, refiner_dir, _, _ = tiny_sdxl
    kw = dict(num_inference_steps=6, height=64, width=64, seed=2, output_type="latent")
    dense = SDXLPipeline.from_pretrained(base_dir, refiner_dir, dtype=mx.float32)("a photo of a cat", **kw)
    q_pipe = SDXLPipeline.from_pretrained(base_dir, refiner_dir, dtype=mx.float32, base_bits=8,
                                          text_encoder_bits=8, group_size=32)
    quant = q_pipe("a photo of a cat", **kw)
    quantized = {name for (name, _), m in q_pipe.models.items() if quantization_info(m)}
    assert quantized == {"unet", "text_encoder", "text_encoder_2"}  # the base UNet and both encoders
    assert 0 < rel_l2(quant, dense) < 0.02


# ------------------------------------------------------------------ full size (opt-in)
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MLX_SDXL_SLOW"), reason="full-size refiner (~10 GB); set MLX_SDXL_SLOW=1")
def test_full_size_refiner_4bit_error():
    """Full-size refiner (MLX random init, fp32, 16×16 latents): 4-bit error and step times."""
    import time

    mx.random.seed(0)
    model = UNet2DConditionModel(UNetConfig.sdxl_refiner())
    inputs = (mx.random.normal((1, 16, 16, 4)), mx.array([300.0]), mx.random.normal((1, 77, 1280)),
              mx.random.normal((1, 1280)), mx.array([[1024.0, 1024.0, 0.0, 0.0, 6.0]]))

    def step():
        t0 = time.perf_counter()
        y = model(*inputs)
        mx.eval(y)
        return y, time.perf_counter() - t0

    ref, _ = step()
    dense_s = min(step()[1] for _ in range(2))
    quantize_unet(model, bits=4, group_size=64)
    assert quantization_info(model) == {"bits": 4, "group_size": 64, "convs": True}
    out, _ = step()
    quant_s = min(step()[1] for _ in range(2))
    err = rel_l2(out, ref)
    print(f"full-size refiner 4-bit g64 convs: rel L2 {err:.4f}; step fp32 {dense_s:.2f} s, 4-bit {quant_s:.2f} s "
          f"({quant_s / dense_s:.2f}x) on {mx.default_device()}")
    assert err < 0.2
