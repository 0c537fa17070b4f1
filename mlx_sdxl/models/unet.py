"""The SDXL UNet (base and refiner) in MLX: NHWC activations, diffusers parameter names.

    emb  = time_embedding(sinusoid(t)) + add_embedding([text_embeds, sinusoid(time_ids)])
    h    = conv_in(x)
    down : per level, resnet (+ transformer) × layers_per_block, then a stride-2 conv
    mid  : resnet, transformer, resnet
    up   : per level, cat([h, skip]) → resnet (+ transformer), layers_per_block + 1 times, then 2× upsample
    out  = conv_out(silu(conv_norm_out(h)))

Each resnet, transformer layer and resampler ends with `pace(h)` (models/pacing.py): inside a
pipeline step that evaluates the step in segments, so the host never runs far ahead of the device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError, InputError, WeightsError
from ..weights import apply_weights, load_folder_weights, parse_dtype, read_config, torch_to_mlx
from .blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D, group_norm
from .cpu_kernels import by_row_chunks, geglu, geglu_halves, silu
from .pacing import pace, pacing

DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, as published on the hub.
_COMMON = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_type": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_BASE_CONFIG = {
    **_COMMON,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
SDXL_REFINER_CONFIG = {
    **_COMMON,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

# config.json keys that must hold one of the listed values (anything else is unsupported).
_FIXED = {
    "addition_embed_type": ("text_time",),
    "time_embedding_type": ("positional",),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu",),
    "resnet_time_scale_shift": ("default",),
    "use_linear_projection": (True,),
    "attention_type": ("default",),
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "class_embeddings_concat": (False,),
    "resnet_skip_time_act": (False,),
    "mid_block_scale_factor": (1,),
    "resnet_out_scale_factor": (1,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# diffusers' defaults for the keys above where the default is not supported.
_MISSING = {"addition_embed_type": None, "use_linear_projection": False}
# Keys without effect on inference here.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "dropout",
            "upcast_attention", "addition_embed_type_num_heads"}


def _per_level(name: str, value, n: int) -> Tuple[int, ...]:
    """An int (same for every level) or one int per level → a tuple of n ints."""
    if isinstance(value, bool):
        raise ConfigError(f"UNet config: {name}={value!r}; accepted: an int or a list of {n} ints")
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ConfigError(f"UNet config: {name}={value!r}; accepted: an int or a list of {n} ints "
                      f"(one per level; nested per-layer lists are not supported)")


@dataclass
class UNetConfig:
    """UNet2DConditionModel settings that mlx_sdxl supports (defaults are diffusers').

    Per-level fields accept an int (same for every level) and are stored as tuples.
    `num_attention_heads` holds head counts: in diffusers configs they live in
    `attention_head_dim` (the naming trap), which `from_dict` resolves.
    Use `UNetConfig.sdxl_base()` / `sdxl_refiner()` for the released models.
    """

    addition_time_embed_dim: int
    projection_class_embeddings_input_dim: int
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: Tuple[int, ...] = 2
    transformer_layers_per_block: Tuple[int, ...] = 1
    num_attention_heads: Tuple[int, ...] = 8
    cross_attention_dim: int = 1280
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    downsample_padding: int = 1
    time_cond_proj_dim: Optional[int] = None  # LCM-distilled UNets: width of the guidance-scale embedding

    def __post_init__(self):
        if not isinstance(self.block_out_channels, (list, tuple)) or not self.block_out_channels or any(
                not isinstance(c, int) or c <= 0 for c in self.block_out_channels):
            raise ConfigError(f"UNet config: block_out_channels={self.block_out_channels!r}; accepted: a list of "
                              "positive ints, one per level")
        n = len(self.block_out_channels)
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        for name, types, accepted in (("down_block_types", self.down_block_types, DOWN_TYPES),
                                      ("up_block_types", self.up_block_types, UP_TYPES)):
            if len(types) != n:
                raise ConfigError(f"UNet config: {name} has {len(types)} entries but block_out_channels has {n}")
            bad = [t for t in types if t not in accepted]
            if bad:
                raise ConfigError(f"UNet config: unsupported {name} {bad}; accepted: {', '.join(accepted)}")
        for name in ("layers_per_block", "transformer_layers_per_block", "num_attention_heads"):
            setattr(self, name, _per_level(name, getattr(self, name), n))
        if isinstance(self.cross_attention_dim, (list, tuple)) and len(set(self.cross_attention_dim)) == 1:
            self.cross_attention_dim = self.cross_attention_dim[0]  # the same context feeds every level
        if not isinstance(self.cross_attention_dim, int) or self.cross_attention_dim <= 0:
            raise ConfigError(f"UNet config: cross_attention_dim={self.cross_attention_dim!r}; accepted: "
                              "one positive int (the width of the text embeddings)")
        g = self.norm_num_groups
        if not isinstance(g, int) or g <= 0 or any(c % g for c in self.block_out_channels):
            raise ConfigError(f"UNet config: norm_num_groups={g!r} must be a positive int dividing every "
                              f"entry of block_out_channels {list(self.block_out_channels)}")
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            if h <= 0 or c % h:
                raise ConfigError(f"UNet config: {c} channels cannot be split into {h} attention heads "
                                  "(attention_head_dim / num_attention_heads hold head counts); the head "
                                  "count must divide the level's channel count")
        for k in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, k) % 2 != 1:
                raise ConfigError(f"UNet config: {k}={getattr(self, k)}; accepted: an odd kernel size")
        if self.downsample_padding not in (0, 1):
            raise ConfigError(f"UNet config: downsample_padding={self.downsample_padding}; accepted: 0 or 1")
        d = self.time_cond_proj_dim
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d <= 0):
            raise ConfigError(f"UNet config: time_cond_proj_dim={d!r}; accepted: null or a positive int (the "
                              "width of an LCM UNet's guidance-scale embedding)")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Read a diffusers unet/config.json dict; unsupported settings raise ConfigError."""
        if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise ConfigError(f"UNet config: _class_name={d['_class_name']!r}; accepted: UNet2DConditionModel")
        for key, accepted in _FIXED.items():
            value = d.get(key, _MISSING.get(key, accepted[0]))
            if value not in accepted:
                raise ConfigError(f"UNet config: unsupported {key}={value!r}; accepted: "
                                  + " or ".join(repr(a) for a in accepted))
        names = {f.name for f in dataclasses.fields(cls)} - {"num_attention_heads"}
        unknown = sorted(k for k in set(d) - names - set(_FIXED) - _IGNORED - {"attention_head_dim", "num_attention_heads"}
                         if not k.startswith("_"))  # "_..." keys are diffusers bookkeeping
        if unknown:
            raise ConfigError(f"UNet config: unknown keys {unknown}; this UNet2DConditionModel setting is not supported")
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if not isinstance(d.get(key), int) or isinstance(d.get(key), bool):
                raise ConfigError(f"UNet config: {key}={d.get(key)!r}; accepted: an int (SDXL 'text_time' conditioning)")
        kwargs = {k: d[k] for k in names if k in d}
        # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (both are head counts).
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        return cls(num_attention_heads=heads, **kwargs)

    @classmethod
    def sdxl_base(cls) -> "UNetConfig":
        return cls.from_dict(SDXL_BASE_CONFIG)

    @classmethod
    def sdxl_refiner(cls) -> "UNetConfig":
        return cls.from_dict(SDXL_REFINER_CONFIG)


def timestep_embedding(t: mx.array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0) -> mx.array:
    """Sinusoidal embedding of float32 values t (N,) → (N, dim), computed in float32."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000) * mx.arange(half, dtype=mx.float32) / (half - freq_shift))
    x = t.astype(mx.float32)[:, None] * freqs[None]
    parts = [mx.cos(x), mx.sin(x)] if flip_sin_to_cos else [mx.sin(x), mx.cos(x)]
    if dim % 2:
        parts.append(mx.zeros_like(x[:, :1]))
    return mx.concatenate(parts, axis=-1)


def guidance_scale_embedding(w: mx.array, dim: int) -> mx.array:
    """diffusers' get_guidance_scale_embedding: sin/cos features of 1000*w, (N,) -> (N, dim), float32.

    An LCM-distilled UNet (config `time_cond_proj_dim`) takes the guidance of the run this way,
    w = guidance_scale - 1, instead of a second, unconditional batch."""
    half = dim // 2
    scale = np.log(np.float32(10000.0)) / np.float32(half - 1)  # float32, as torch computes it
    freqs = mx.exp(mx.arange(half, dtype=mx.float32) * float(-scale))
    x = (w.astype(mx.float32) * 1000.0)[:, None] * freqs[None]
    parts = [mx.sin(x), mx.cos(x)] + ([mx.zeros_like(x[:, :1])] if dim % 2 else [])
    return mx.concatenate(parts, axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_2(silu(linear_1(x + cond_proj(condition)))); cond_proj only with a `cond_dim`."""

    def __init__(self, in_dim: int, dim: int, cond_dim: Optional[int] = None):
        super().__init__()
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, condition: Optional[mx.array] = None) -> mx.array:
        if condition is not None:
            x = x + self.cond_proj(condition.astype(x.dtype))
        return self.linear_2(silu(self.linear_1(x)))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        h, gate = geglu_halves(self.proj, x)
        return geglu(h, gate)


class FeedForward(nn.Module):
    """diffusers' FeedForward: net = [GEGLU, Dropout, Linear] (net.1 has no weights)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.hidden = mult * dim
        self.net = [GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        def ff(t: mx.array) -> mx.array:
            return self.net[2](self.net[0](t))

        dense = isinstance(self.net[0].proj, nn.Linear) and isinstance(self.net[2], nn.Linear)
        if not dense:  # quantized layers would dequantize once per chunk
            return ff(x)
        return by_row_chunks(ff, x, self.hidden)  # on the CPU, the hidden activations a chunk at a time


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim // heads, cross_attention_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)
        self.kv_slot = 0  # this block's entry in the UNet's cross_kv list (set by the UNet)

    def __call__(self, x: mx.array, cross_kv: Sequence[Tuple[mx.array, mx.array]]) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), kv=cross_kv[self.kv_slot])
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm → tokens → proj_in → transformer blocks → proj_out → back to NHWC, plus the input."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, 1e-6, groups)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array, cross_kv) -> mx.array:
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, cross_kv)
            pace(y)
        return x + self.proj_out(y).reshape(b, h, w, c)


class DownBlock(nn.Module):
    """DownBlock2D, or CrossAttnDownBlock2D when `heads` is given."""

    def __init__(self, cin: int, cout: int, temb: int, layers: int, add_downsample: bool, cfg: UNetConfig,
                 heads: Optional[int] = None, depth: int = 1, context_dim: int = 0):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, temb, g, eps) for i in range(layers)]
        if heads is not None:
            self.attentions = [Transformer2DModel(cout, heads, depth, context_dim, g) for _ in range(layers)]
        if add_downsample:
            self.downsamplers = [Downsample2D(cout, padding=cfg.downsample_padding)]

    def __call__(self, x, temb, cross_kv):
        skips = []
        attns = self.get("attentions") or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attns):
            x = resnet(x, temb)
            pace(x)
            if attn is not None:
                x = attn(x, cross_kv)
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            pace(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D, or CrossAttnUpBlock2D when `heads` is given. Skip widths are given innermost-last."""

    def __init__(self, cin: int, skip_channels: Sequence[int], cout: int, temb: int, add_upsample: bool,
                 cfg: UNetConfig, heads: Optional[int] = None, depth: int = 1, context_dim: int = 0):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = [ResnetBlock2D((cin if i == 0 else cout) + s, cout, temb, g, eps)
                        for i, s in enumerate(skip_channels)]
        if heads is not None:
            self.attentions = [Transformer2DModel(cout, heads, depth, context_dim, g) for _ in skip_channels]
        if add_upsample:
            self.upsamplers = [Upsample2D(cout)]

    def __call__(self, x, skips, temb, cross_kv, size=None):
        attns = self.get("attentions") or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attns):
            x = resnet(mx.concatenate([x, skips.pop()], axis=-1), temb)
            pace(x)
            if attn is not None:
                x = attn(x, cross_kv)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, size)
            pace(x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    def __init__(self, channels: int, temb: int, heads: int, depth: int, context_dim: int, cfg: UNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = [ResnetBlock2D(channels, channels, temb, g, eps) for _ in range(2)]
        self.attentions = [Transformer2DModel(channels, heads, depth, context_dim, g)]

    def __call__(self, x, temb, cross_kv):
        x = self.resnets[0](x, temb)
        pace(x)
        x = self.attentions[0](x, cross_kv)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        cfg, ch = config, config.block_out_channels
        temb, n = config.time_embed_dim, len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=cfg.conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(ch[0], temb, config.time_cond_proj_dim)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        def attn_args(i, cross):
            if not cross:
                return {}
            return dict(heads=cfg.num_attention_heads[i], depth=cfg.transformer_layers_per_block[i],
                        context_dim=cfg.cross_attention_dim)

        self.down_blocks = []
        skip_channels = [ch[0]]
        for i, kind in enumerate(cfg.down_block_types):
            cin = ch[max(i - 1, 0)]
            last = i == n - 1
            self.down_blocks.append(DownBlock(cin, ch[i], temb, cfg.layers_per_block[i], not last, cfg,
                                              **attn_args(i, kind == "CrossAttnDownBlock2D")))
            skip_channels += [ch[i]] * (cfg.layers_per_block[i] + (0 if last else 1))

        self.mid_block = MidBlock(ch[-1], temb, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                                  cfg.cross_attention_dim, cfg)

        self.up_blocks = []
        cin = ch[-1]
        for i, kind in enumerate(cfg.up_block_types):
            level = n - 1 - i
            count = cfg.layers_per_block[level] + 1
            skips = [skip_channels.pop() for _ in range(count)]
            self.up_blocks.append(UpBlock(cin, skips, ch[level], temb, i < n - 1, cfg,
                                          **attn_args(level, kind == "CrossAttnUpBlock2D")))
            cin = ch[level]

        self.conv_norm_out = group_norm(ch[0], cfg.norm_eps, cfg.norm_num_groups)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=cfg.conv_out_kernel // 2)
        for slot, block in enumerate(self.transformer_blocks()):
            block.kv_slot = slot

    def transformer_blocks(self) -> List[BasicTransformerBlock]:
        """Every transformer block, in the order of the forward pass."""
        levels = self.down_blocks + [self.mid_block] + self.up_blocks
        return [b for level in levels for t in level.get("attentions", []) for b in t.transformer_blocks]

    def cross_attention_kv(self, encoder_hidden_states: mx.array) -> List[Tuple[mx.array, mx.array]]:
        """The keys and values that every cross-attention layer makes of the text
        context, in `kv_slot` order. They depend on the prompt only, so a sampler
        computes them once per stage and passes them to each step as `cross_kv`
        (the base UNet has 140 such projections per step, the refiner 88)."""
        cfg = self.config
        c = encoder_hidden_states
        if c.ndim != 3 or c.shape[-1] != cfg.cross_attention_dim:
            raise InputError(f"encoder_hidden_states must have shape (batch, tokens, {cfg.cross_attention_dim}); "
                             f"got {tuple(c.shape)}")
        c = c.astype(self.dtype)
        return [tuple(mx.contiguous(a) for a in block.attn2.kv(c)) for block in self.transformer_blocks()]

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_in.weight.dtype

    def _check_inputs(self, sample, context, text_embeds, time_ids, cross_kv=None):
        cfg = self.config
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise InputError(f"UNet sample must be NHWC (B, H, W, {cfg.in_channels}); got shape {tuple(sample.shape)}")
        b = sample.shape[0]
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.cross_attention_dim:
            raise InputError(f"encoder_hidden_states must have shape ({b}, tokens, {cfg.cross_attention_dim}); "
                             f"got {tuple(context.shape)}")
        if text_embeds is None or time_ids is None:
            raise InputError("this UNet uses SDXL micro-conditioning: pass text_embeds (pooled text "
                             "embedding) and time_ids")
        if text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != b or time_ids.shape[0] != b:
            raise InputError(f"text_embeds and time_ids must be 2-D with batch {b}; got "
                             f"{tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
        width = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
        if width != cfg.projection_class_embeddings_input_dim:
            raise InputError(
                f"text_embeds {tuple(text_embeds.shape)} + {time_ids.shape[1]} time ids × "
                f"{cfg.addition_time_embed_dim} = {width} features, but add_embedding takes "
                f"{cfg.projection_class_embeddings_input_dim} (e.g. 1280 pooled + 6 ids for the base, "
                "+ 5 ids for the refiner)")
        if cross_kv is not None:
            layers = self.transformer_blocks()
            if len(cross_kv) != len(layers) or any(len(kv) != 2 for kv in cross_kv):
                raise InputError(f"cross_kv must be this UNet's cross_attention_kv(encoder_hidden_states): "
                                 f"{len(layers)} (key, value) pairs; got {len(cross_kv)} entries")
            k = cross_kv[0][0]
            if k.ndim != 4 or k.shape[0] != b or k.shape[2] != context.shape[1]:
                raise InputError(f"cross_kv was made from a context of another shape (keys {tuple(k.shape)}; "
                                 f"encoder_hidden_states {tuple(context.shape)}): make it with "
                                 "cross_attention_kv(encoder_hidden_states)")

    def __call__(self, sample: mx.array, timestep, encoder_hidden_states: mx.array,
                 text_embeds: Optional[mx.array] = None, time_ids: Optional[mx.array] = None,
                 cross_kv: Optional[Sequence[Tuple[mx.array, mx.array]]] = None,
                 down_block_additional_residuals: Optional[Sequence[mx.array]] = None,
                 mid_block_additional_residual: Optional[mx.array] = None,
                 timestep_cond: Optional[mx.array] = None) -> mx.array:
        """Noise prediction (B, H, W, out_channels) for NHWC `sample` at `timestep` (scalar or (B,)).

        `cross_kv`, optional: `cross_attention_kv(encoder_hidden_states)` made
        beforehand, so that repeated calls with one context skip its projections.
        `down_block_additional_residuals` (one per skip, shapes: `skip_shapes`) and
        `mid_block_additional_residual`, optional and together: ControlNet residuals, added
        to the skips and to the mid block's output as diffusers adds them.
        `timestep_cond` (B, time_cond_proj_dim): an LCM UNet's guidance embedding
        (`guidance_scale_embedding`), added to the timestep features as diffusers does."""
        args = self._forward_args(sample, timestep, encoder_hidden_states, text_embeds, time_ids, cross_kv)
        return self._forward(*args, **self._residuals(sample, down_block_additional_residuals,
                                                      mid_block_additional_residual),
                             **self._timestep_cond(sample, timestep_cond))

    def _timestep_cond(self, sample, cond) -> dict:
        """`_forward`'s keyword argument for an LCM UNet's guidance embedding, checked: {} without one."""
        dim = self.config.time_cond_proj_dim
        if cond is None:
            return {}
        if dim is None:
            raise InputError("timestep_cond is for UNets with a guidance embedding (time_cond_proj_dim); "
                             "this UNet has none")
        b = sample.shape[0]
        if cond.ndim != 2 or cond.shape[0] not in (1, b) or cond.shape[1] != dim:
            raise InputError(f"timestep_cond must have shape ({b}, {dim}); got {tuple(cond.shape)}")
        return {"timestep_cond": cond}

    def _residuals(self, sample, down, mid) -> dict:
        """`_forward`'s keyword arguments for ControlNet residuals, checked: {} without them."""
        if down is None and mid is None:
            return {}
        check_residuals(self.config, sample.shape, down, mid)
        return {"down_res": list(down), "mid_res": mid}

    def _forward_args(self, sample, timestep, context, text_embeds, time_ids, cross_kv):
        """The checked arguments of `_forward`: the timestep as a float32 array, and the
        cross-attention keys and values (made from `context` unless given)."""
        self._check_inputs(sample, context, text_embeds, time_ids, cross_kv)
        b = sample.shape[0]
        t = timestep.astype(mx.float32) if isinstance(timestep, mx.array) else mx.array(timestep, dtype=mx.float32)
        if t.size not in (1, b) or t.ndim > 1:
            raise InputError(f"timestep must be a scalar or have shape ({b},); got shape {tuple(t.shape)}")
        if cross_kv is None:
            cross_kv = self.cross_attention_kv(context)
        return sample, t, cross_kv, text_embeds, time_ids

    def _forward(self, sample, t, cross_kv, text_embeds, time_ids, down_res=None, mid_res=None,
                 timestep_cond=None) -> mx.array:
        cfg, dtype = self.config, self.dtype
        b = sample.shape[0]
        x = sample.astype(dtype)
        t = mx.broadcast_to(t.reshape(-1), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                 cfg.freq_shift).reshape(b, -1)
        add = mx.concatenate([text_embeds.astype(dtype), ids.astype(dtype)], axis=-1)
        emb = self.time_embedding(t_emb.astype(dtype), timestep_cond) + self.add_embedding(add)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, emb, cross_kv)
            skips += s
        if down_res is not None:  # ControlNet: a residual for every skip
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_res)]
        x = self.mid_block(x, emb, cross_kv)
        if mid_res is not None:  # ... and one for the mid block's output
            x = x + mid_res.astype(x.dtype)
        for block in self.up_blocks:
            count = len(block.resnets)
            target = skips[-count - 1].shape[1:3] if len(skips) > count else None
            x = block(x, skips, emb, cross_kv, target)
        return self.conv_out(self.conv_norm_out(x, silu=True))

    def compiled(self):
        """This forward pass as one compiled MLX function, f(sample, timestep, context,
        text_embeds, time_ids, cross_kv=None, down_block_additional_residuals=None,
        mid_block_additional_residual=None): elementwise work fuses across layers,
        so a step launches fewer kernels than the eager model (see docs/performance.md).
        It traces once per input shape; a float timestep is passed on as
        an array, so new timestep values reuse the trace. The cross-attention keys
        and values are inputs of the compiled graph: made from `context` on each
        call unless `cross_kv` is given. Keep the returned function for as long as
        it is used (the model does not hold it, so dropping both frees the weights
        at once)."""
        forward = mx.compile(self._forward, inputs=self.state)

        def call(sample, timestep, context, text_embeds=None, time_ids=None, cross_kv=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, timestep_cond=None):
            # checked before tracing, so bad input gets a clear error; without residuals the
            # call (and its trace) is the plain one
            args = self._forward_args(sample, timestep, context, text_embeds, time_ids, cross_kv)
            with pacing(None):  # a trace cannot be evaluated in segments
                return forward(*args, **self._residuals(sample, down_block_additional_residuals,
                                                        mid_block_additional_residual),
                               **self._timestep_cond(sample, timestep_cond))

        return call


def skip_shapes(cfg: UNetConfig, batch: int, height: int, width: int) -> Tuple[List[tuple], tuple]:
    """NHWC shapes of the down path's skips (conv_in's output first) and of the mid block's
    output, for latents of height × width: the shapes of ControlNet residuals."""
    ch, h, w = cfg.block_out_channels, height, width
    down = [(batch, h, w, ch[0])]
    for i, c in enumerate(ch):
        down += [(batch, h, w, c)] * cfg.layers_per_block[i]
        if i < len(ch) - 1:  # stride-2 conv: ceil(n / 2) with padding 1; the bottom/right-padded form floors
            h, w = ((h + 1) // 2, (w + 1) // 2) if cfg.downsample_padding == 1 else (h // 2, w // 2)
            down.append((batch, h, w, c))
    return down, (batch, h, w, ch[-1])


def check_residuals(cfg: UNetConfig, sample_shape, down, mid) -> None:
    """InputError unless `down` (one per skip) and `mid` fit a UNet call on `sample_shape`
    (a residual pooled to 1×1, as global-pooling ControlNets give, broadcasts)."""
    if down is None or mid is None:
        raise InputError("pass down_block_additional_residuals and mid_block_additional_residual together "
                         "(the residuals a ControlNet returns)")
    want_down, want_mid = skip_shapes(cfg, *sample_shape[:3])
    if len(down) != len(want_down):
        raise InputError(f"down_block_additional_residuals has {len(down)} entries; this UNet has "
                         f"{len(want_down)} skip connections")
    for i, (r, want) in enumerate(zip([*down, mid], [*want_down, want_mid])):
        if tuple(r.shape) not in (want, (want[0], 1, 1, want[3])):
            what = "mid_block_additional_residual" if i == len(down) else f"down_block_additional_residuals[{i}]"
            raise InputError(f"{what} has shape {tuple(r.shape)}; this UNet call needs {want} (NHWC)")


def unet_from_weights(config: UNetConfig, weights: dict, dtype=None) -> UNet2DConditionModel:
    """Build the UNet and load `weights` (diffusers names, PyTorch layout), lazily."""
    model = UNet2DConditionModel(config)
    apply_weights(model, torch_to_mlx(weights), "UNet", dtype=parse_dtype(dtype))
    return model


def load_unet(path, dtype=None, variant: Optional[str] = None) -> UNet2DConditionModel:
    """Load a diffusers `unet/` folder (config.json + diffusion_pytorch_model[.fp16].safetensors,
    possibly sharded). `dtype` casts the weights (None keeps the file's); nothing is evaluated."""
    if not Path(path).is_dir():
        raise WeightsError(f"UNet folder not found: {path} (expected a diffusers unet/ folder holding "
                           "config.json and diffusion_pytorch_model[.fp16].safetensors)")
    config = UNetConfig.from_dict(read_config(path))
    weights = load_folder_weights(path, ["diffusion_pytorch_model"], variant)
    return unet_from_weights(config, weights, dtype)
