"""Affine weight quantization (MLX `mx.quantize`) for the UNets and text encoders.

Weights are stored in `bits` bits with one scale and one bias per `group_size`
consecutive input weights, and are used through two modules of ours:

- `QLinear`: for many tokens (≥ `DENSE_TOKENS` rows: on GPU every image-token
  layer of a UNet) it dequantizes the weight and runs the fp16 layer's dense
  GEMM, so the dequantization is the only extra work; for few rows (time
  embeddings, text-context projections) it uses `mx.quantized_matmul`, which
  reads 4× fewer bytes (at 4 bits).
- `QConv2d`: the kernel (MLX layout O, kh, kw, I) is quantized as the matrix
  (O, kh·kw·I) and dequantized just before `mx.conv2d`. About a third of the
  refiner's parameters are conv kernels, which `nn.quantize` would leave dense.

Parameter names are those of `nn.QuantizedLinear` (weight, scales, biases,
bias); bits and group size are plain attributes, so saved files hold only the
arrays and `quantization_info` gives the settings to record beside them.

Both take an optional `side`: a callable side(x, y) of the layer's input and
output that returns y plus its own output (None by default). LoRA adapters use
it to run beside the packed weight, y = W_q x + s·B(A x), without a dense copy
of W (mlx_sdxl.lora.apply.SidePath). It is a plain attribute, not a parameter:
saved files never hold it.

A layer whose input size (kh·kw·I for convs) is not a multiple of the group
size stays dense, as do grouped convs, norms and embeddings. Embeddings are
left dense on purpose: a lookup reads only a few rows (no speed to gain), and
for CLIP the token embedding is under 10% of the encoder.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import ConfigError
from .spec import BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES

# Rows (product of the leading dims of x) from which QLinear dequantizes its
# weight and runs a dense matmul instead of `mx.quantized_matmul`, per device.
# GPU: dequantizing costs one pass over the weight, a GEMM 2·M·O·I flops, so
# for M in the hundreds the extra pass is small next to the GEMM, while MLX's
# quantized GEMM is slower than its dense one for many rows. Below 256 rows the
# layer is memory bound and reading packed weights wins. With this, every
# image-token layer of the UNet at ≥ 16×16 latents takes the dense path; the
# time embeddings and 77-token text projections the quantized one.
# CPU: MLX's quantized_matmul is slow per row next to a BLAS dense GEMM, so
# from a few rows on the dequantized GEMM is faster.
# (Measurements behind both thresholds: docs/performance.md, `python -m bench.quantized_layer`.)
DENSE_TOKENS = {"gpu": 256, "cpu": 4}


def dense_tokens_default() -> int:
    """DENSE_TOKENS for the current default device."""
    return DENSE_TOKENS["gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"]


def check_settings(bits, group_size) -> None:
    """Raise ConfigError unless bits and group_size are ones MLX's affine mode supports."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in BITS:
        raise ConfigError(f"quantization bits={bits!r} is not supported; accepted: "
                          + ", ".join(map(str, BITS)))
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size not in GROUP_SIZES:
        raise ConfigError(f"quantization group_size={group_size!r} is not supported; accepted: "
                          + ", ".join(map(str, GROUP_SIZES)))


def _placeholders(rows: int, cols: int, bits: int, group_size: int, dtype):
    """Correctly shaped, never evaluated arrays for a quantized (rows, cols) matrix."""
    return (mx.zeros((rows, cols * bits // 32), dtype=mx.uint32),
            mx.zeros((rows, cols // group_size), dtype=dtype),
            mx.zeros((rows, cols // group_size), dtype=dtype))


def _check_divisible(what: str, cols: int, group_size: int) -> None:
    if cols % group_size:
        raise ConfigError(f"{what} has input size {cols}, not a multiple of the group size {group_size}; "
                          "such layers must stay dense")


def _dequantize(layer, after: Optional[mx.array] = None) -> mx.array:
    """The layer's dense weight matrix. With `after` (the layer's input), the
    dequantization is ordered after that input is computed, so in a long lazy or
    compiled graph each dense weight exists only around its own use, not ahead."""
    w = layer.weight if after is None else mx.depends(layer.weight, after)
    return mx.dequantize(w, layer.scales, layer.biases, layer.group_size, layer.bits)


class QLinear(nn.Module):
    """A Linear layer with an affine-quantized weight (see the module docstring)."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, bits: int = 4,
                 group_size: int = DEFAULT_GROUP_SIZE, dtype=mx.float16):
        super().__init__()
        check_settings(bits, group_size)
        _check_divisible("QLinear", input_dims, group_size)
        self.bits, self.group_size = int(bits), int(group_size)
        self.dense_tokens: Optional[int] = None  # None: dense_tokens_default()
        self.side: Optional[Callable[[mx.array, mx.array], mx.array]] = None  # adapters beside the weight
        self.weight, self.scales, self.biases = _placeholders(output_dims, input_dims, bits, group_size, dtype)
        if bias:
            self.bias = mx.zeros((output_dims,), dtype=dtype)
        self.freeze()

    @classmethod
    def from_linear(cls, layer: nn.Linear, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE) -> "QLinear":
        out_dims, in_dims = layer.weight.shape
        q = cls(in_dims, out_dims, "bias" in layer, bits, group_size, layer.weight.dtype)
        q.weight, q.scales, q.biases = mx.quantize(layer.weight, group_size, bits)
        if "bias" in layer:
            q.bias = layer.bias
        return q

    def _extra_repr(self) -> str:
        out_dims, packed = self.weight.shape
        return (f"input_dims={packed * 32 // self.bits}, output_dims={out_dims}, bias={'bias' in self}, "
                f"bits={self.bits}, group_size={self.group_size}")

    def dense_weight(self, after: Optional[mx.array] = None) -> mx.array:
        """The dequantized (output_dims, input_dims) weight (`after`: see _dequantize)."""
        return _dequantize(self, after)

    def __call__(self, x: mx.array) -> mx.array:
        threshold = self.dense_tokens if self.dense_tokens is not None else dense_tokens_default()
        if x.size // x.shape[-1] >= threshold:
            w = self.dense_weight(after=x).T
            y = mx.addmm(self.bias, x, w) if "bias" in self else x @ w
        else:
            y = mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                    group_size=self.group_size, bits=self.bits)
            y = y + self.bias if "bias" in self else y
        return y if self.side is None else self.side(x, y)


class QConv2d(nn.Module):
    """A Conv2d whose kernel is stored quantized as the (O, kh·kw·I) matrix."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE, dtype=mx.float16):
        super().__init__()
        check_settings(bits, group_size)
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        kh, kw = pair(kernel_size)
        _check_divisible("QConv2d", kh * kw * in_channels, group_size)
        self.bits, self.group_size = int(bits), int(group_size)
        self.kernel_shape = (out_channels, kh, kw, in_channels)
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        self.side: Optional[Callable[[mx.array, mx.array], mx.array]] = None  # adapters beside the kernel
        self.weight, self.scales, self.biases = _placeholders(out_channels, kh * kw * in_channels, bits,
                                                              group_size, dtype)
        if bias:
            self.bias = mx.zeros((out_channels,), dtype=dtype)
        self.freeze()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE) -> "QConv2d":
        if conv.groups != 1:
            raise ConfigError("QConv2d: grouped convolutions are not supported; keep them dense")
        o, kh, kw, i = conv.weight.shape
        q = cls(i, o, (kh, kw), conv.stride, conv.padding, conv.dilation, "bias" in conv, bits, group_size,
                conv.weight.dtype)
        q.weight, q.scales, q.biases = mx.quantize(conv.weight.reshape(o, -1), group_size, bits)
        if "bias" in conv:
            q.bias = conv.bias
        return q

    def _extra_repr(self) -> str:
        o, kh, kw, i = self.kernel_shape
        return (f"{i}, {o}, kernel_size={(kh, kw)}, stride={self.stride}, padding={self.padding}, "
                f"bias={'bias' in self}, bits={self.bits}, group_size={self.group_size}")

    def dense_weight(self, after: Optional[mx.array] = None) -> mx.array:
        """The dequantized kernel in MLX layout (O, kh, kw, I) (`after`: see _dequantize)."""
        return _dequantize(self, after).reshape(self.kernel_shape)

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.conv2d(x, self.dense_weight(after=x), self.stride, self.padding, self.dilation)
        y = y + self.bias if "bias" in self else y
        return y if self.side is None else self.side(x, y)


def _fan_in(layer: nn.Module) -> int:
    return layer.weight.size // layer.weight.shape[0]


def _quantizable(layer: nn.Module, group_size: int, convs: bool) -> bool:
    """Whether quantize_model / prepare_quantized turn this layer into QLinear / QConv2d."""
    if isinstance(layer, nn.Linear):
        return _fan_in(layer) % group_size == 0
    if convs and isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and _fan_in(layer) % group_size == 0
    return False


def _swap_layers(model: nn.Module, make, bits: int, group_size: int, convs: bool) -> nn.Module:
    """Replace, one at a time, each layer that `_quantizable` accepts by `make(layer)`.

    Only names are collected up front, so a replaced dense layer loses its last
    reference as soon as its successor is in place and its memory is freed."""
    check_settings(bits, group_size)
    names = [name for name, m in model.named_modules() if name and _quantizable(m, group_size, convs)]
    for name in names:
        *path, last = name.split(".")
        parent = model
        for key in path:
            parent = parent[int(key)] if isinstance(parent, list) else parent[key]
        if isinstance(parent, list):
            parent[int(last)] = make(parent[int(last)])
        else:
            parent[last] = make(parent[last])
    return model


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                   convs: bool = True) -> nn.Module:
    """Quantize `model` in place: every nn.Linear (and, with `convs`, every nn.Conv2d)
    whose input size is a multiple of `group_size` is replaced by a QLinear / QConv2d.

    Each new layer is evaluated and put in place as it is made, so with lazily
    loaded weights the peak memory is the quantized model plus one dense layer.
    Returns `model`.
    """
    def make(layer):
        q = QLinear.from_linear(layer, bits, group_size) if isinstance(layer, nn.Linear) \
            else QConv2d.from_conv(layer, bits, group_size)
        mx.eval(q.parameters())
        return q

    return _swap_layers(model, make, bits, group_size, convs)


def quantize_unet(unet: nn.Module, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                  convs: bool = True) -> nn.Module:
    """Quantize a UNet2DConditionModel (linear layers and, by default, 3×3/1×1 convs)."""
    return quantize_model(unet, bits, group_size, convs)


def prepare_quantized(model: nn.Module, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
                      convs: bool = True) -> nn.Module:
    """Swap the layers `quantize_model` would quantize for empty QLinear / QConv2d
    layers (lazy placeholders, never evaluated), ready for `model.load_weights`
    of pre-quantized weights. The dense weights are never quantized or evaluated."""
    def make(layer):
        dtype = layer.weight.dtype
        if isinstance(layer, nn.Linear):
            o, i = layer.weight.shape
            return QLinear(i, o, "bias" in layer, bits, group_size, dtype)
        o, kh, kw, i = layer.weight.shape
        return QConv2d(i, o, (kh, kw), layer.stride, layer.padding, layer.dilation, "bias" in layer, bits,
                       group_size, dtype)

    return _swap_layers(model, make, bits, group_size, convs)


def quantization_info(model: nn.Module) -> dict:
    """{"bits", "group_size", "convs"} of a quantized model (the arguments that
    `prepare_quantized` needs to rebuild it); {} for a model without quantized layers."""
    layers = [m for _, m in model.named_modules() if isinstance(m, (QLinear, QConv2d))]
    if not layers:
        return {}
    settings = {(m.bits, m.group_size) for m in layers}
    if len(settings) > 1:
        raise ConfigError(f"the model mixes quantization settings {sorted(settings)} (bits, group_size); "
                          "one setting per model is supported")
    (bits, group_size), = settings
    return {"bits": bits, "group_size": group_size, "convs": any(isinstance(m, QConv2d) for m in layers)}


def quantized_nbytes(config_or_model, bits: Optional[int] = 4, group_size: int = DEFAULT_GROUP_SIZE, convs: bool = True,
                     dtype=mx.float16) -> int:
    """Bytes of the weights once quantized (bits=None: dense), from shapes only.

    Takes a model or a UNetConfig (a UNet is built lazily; MLX never evaluates
    its random init, so nothing is allocated). Packed weights take O·I·bits/8
    bytes, scales and biases 2·O·(I/group_size) values, everything else stays
    dense; floating tensors count at `dtype`'s size.
    """
    model = config_or_model
    if not isinstance(model, nn.Module):
        from .models.unet import UNet2DConditionModel, UNetConfig
        if not isinstance(model, UNetConfig):
            raise ConfigError(f"quantized_nbytes takes a model or a UNetConfig, got {type(model).__name__}")
        model = UNet2DConditionModel(model)
    if bits is not None:
        check_settings(bits, group_size)
    item = dtype.size

    def nbytes(v):
        return v.size * (item if mx.issubdtype(v.dtype, mx.floating) else v.itemsize)

    total = sum(nbytes(v) for _, v in tree_flatten(model.parameters()))
    if bits is not None:
        for _, layer in model.named_modules():
            if _quantizable(layer, group_size, convs):
                o, i = layer.weight.shape[0], _fan_in(layer)
                total += o * i * bits // 8 + 2 * o * (i // group_size) * item - nbytes(layer.weight)
    return total

