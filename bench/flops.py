"""FLOP counts of the models' forward passes, from the shapes alone.

The model is called on lazy inputs while matmul-like layers record their sizes;
nothing is evaluated, so a full-size count costs milliseconds and no memory
(the parameters of a freshly built model are lazy too). Like torch's
FlopCounterMode, it counts linear layers, convolutions and the two attention
matmuls at 2 FLOPs per multiply-add and leaves out elementwise work, norms and
softmax (a few percent).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from mlx_sdxl.models import blocks, cpu_kernels


@contextmanager
def _counting():
    total = [0]
    inside_attention = [False]
    linear_call, conv_call = nn.Linear.__call__, nn.Conv2d.__call__
    attention, sdpa = blocks.attention, mx.fast.scaled_dot_product_attention

    def linear(self, x):
        out = linear_call(self, x)
        total[0] += 2 * (x.size // x.shape[-1]) * x.shape[-1] * out.shape[-1]
        return out

    def conv(self, x):
        out = conv_call(self, x)
        total[0] += 2 * out.size * (self.weight.size // self.weight.shape[0])  # kh·kw·cin per output
        return out

    def count_attention(q, k, v):
        b, h, n, d = q.shape
        total[0] += 2 * b * h * n * k.shape[2] * (d + v.shape[-1])  # q kᵀ, then scores · v

    def attention_counted(q, k, v, *args, **kwargs):
        count_attention(q, k, v)
        inside_attention[0] = True
        try:
            return attention(q, k, v, *args, **kwargs)
        finally:
            inside_attention[0] = False

    def sdpa_counted(q, k, v, *args, **kwargs):  # CLIP calls it directly
        if not inside_attention[0]:
            count_attention(q, k, v)
        return sdpa(q, k, v, *args, **kwargs)

    # the plain path of every layer (the CPU kernels split some matmuls)
    can_compile = cpu_kernels._can_compile_cpu
    cpu_kernels._can_compile_cpu = lambda: False
    nn.Linear.__call__, nn.Conv2d.__call__ = linear, conv
    blocks.attention, mx.fast.scaled_dot_product_attention = attention_counted, sdpa_counted
    try:
        yield total
    finally:
        nn.Linear.__call__, nn.Conv2d.__call__ = linear_call, conv_call
        blocks.attention, mx.fast.scaled_dot_product_attention = attention, sdpa
        cpu_kernels._can_compile_cpu = can_compile


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of `fn(*args, **kwargs)` (matmuls and convolutions, 2 per multiply-add); nothing is evaluated."""
    with _counting() as total:
        fn(*args, **kwargs)
    return total[0]


def unet_flops(config, height: int, width: int, batch: int = 1, n_ids: int = 6, tokens: int = 77,
               cross_kv_made: bool = True) -> int:
    """One UNet forward at latents height × width (pixels / 8); n_ids: 6 time ids (base) or 5 (refiner).
    `cross_kv_made=False`: a sampler's step, whose cross-attention keys and values were made beforehand
    (once per stage) and are not counted."""
    from mlx_sdxl.models.unet import UNet2DConditionModel

    model = UNet2DConditionModel(config)
    pooled = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
    context = mx.zeros((batch, tokens, config.cross_attention_dim))
    cross_kv = None if cross_kv_made else model.cross_attention_kv(context)
    return count_flops(model, mx.zeros((batch, height, width, config.in_channels)), 500.0, context,
                       text_embeds=mx.zeros((batch, pooled)), time_ids=mx.zeros((batch, n_ids)), cross_kv=cross_kv)


def vae_decode_flops(config, height: int, width: int, batch: int = 1) -> int:
    """One VAE decode of latents height × width (whole: the exact tiling's halos add a little)."""
    from mlx_sdxl.models.vae import AutoencoderKL

    vae = AutoencoderKL(config, upcast=False)
    return count_flops(vae.decode, mx.zeros((batch, height, width, config.latent_channels)), tiled=False)


def text_encoder_flops(config, batch: int = 1, tokens: int = 77) -> int:
    from mlx_sdxl.models.clip import CLIPTextModel

    model = CLIPTextModel(config)
    ids = mx.zeros((batch, tokens), dtype=mx.int32)
    return count_flops(model, ids)
