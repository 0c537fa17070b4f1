"""SDXL ControlNet in MLX (diffusers' ControlNetModel): NHWC activations, diffusers parameter names.

A copy of the UNet's encoder half that reads a control image and returns one residual per
UNet skip connection, and one for the mid block:

    emb   = time_embedding(sinusoid(t)) + add_embedding([text_embeds, sinusoid(time_ids)])
    h     = conv_in(x) + controlnet_cond_embedding(image)        image: full resolution, 8× the latents
    down  : the UNet's down blocks; h_0 = h, then every resnet (+ transformer) output and downsample
    mid   : the UNet's mid block → m
    out   : down_k = s_k · controlnet_down_blocks[k](h_k)   (1×1 "zero convs")
            mid    = s_K · controlnet_mid_block(m)
            s_k = conditioning_scale; in guess mode s_k = conditioning_scale · 10^(k/K − 1), k = 0..K,
            K = number of down residuals (0.1 for the first skip, 1.0 for the mid block)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError, InputError, WeightsError
from ..weights import apply_weights, load_folder_weights, load_safetensors, parse_dtype, read_config, torch_to_mlx
from .cpu_kernels import silu
from .unet import DownBlock, MidBlock, TimestepEmbedding, UNetConfig, timestep_embedding

# config.json of diffusers/controlnet-canny-sdxl-1.0 (the same as ControlNetModel.from_unet of the
# SDXL base UNet); the depth and other full-size SDXL ControlNets share it.
SDXL_CONTROLNET_CONFIG = {
    "_class_name": "ControlNetModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}
# config.json keys of a ControlNet that its UNet-like trunk does not have.
_CONTROL_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels",
                 "controlnet_conditioning_channel_order", "global_pool_conditions")
_FAMILIES = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}


def _refuse_non_sdxl(d: dict) -> None:
    """SD 1.x / 2.x ControlNets have no SDXL text_time conditioning and another cross-attention width."""
    if d.get("addition_embed_type") == "text_time":
        return
    width = d.get("cross_attention_dim")
    family = _FAMILIES.get(width, "a model other than SDXL") if isinstance(width, int) else "a model other than SDXL"
    raise WeightsError(
        f"this ControlNet was made for {family}: its cross-attention width (cross_attention_dim) is {width!r} and "
        f"it has no SDXL 'text_time' conditioning (addition_embed_type={d.get('addition_embed_type')!r}); "
        "mlx_sdxl runs SDXL ControlNets (cross_attention_dim 2048, addition_embed_type 'text_time'), "
        "e.g. diffusers/controlnet-canny-sdxl-1.0")


def _positive_ints(name: str, value) -> Tuple[int, ...]:
    """An int or a non-empty list of positive ints → a tuple (ConfigError otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        raise ConfigError(f"ControlNet config: {name}={value!r}; accepted: positive ints")
    return tuple(value)


@dataclass
class ControlNetConfig:
    """ControlNetModel settings: `unet` holds those of the UNet trunk it copies (conv_in,
    embeddings, down and mid blocks); the rest are the control image's. Read diffusers'
    config.json with `from_dict`; `ControlNetConfig.sdxl()` is the published SDXL one."""

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def __post_init__(self):
        (self.conditioning_channels,) = _positive_ints("conditioning_channels", self.conditioning_channels)
        self.conditioning_embedding_out_channels = _positive_ints(
            "conditioning_embedding_out_channels", self.conditioning_embedding_out_channels)
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"ControlNet config: controlnet_conditioning_channel_order="
                              f"{self.controlnet_conditioning_channel_order!r}; accepted: 'rgb' or 'bgr'")
        if not isinstance(self.global_pool_conditions, bool):
            raise ConfigError(f"ControlNet config: global_pool_conditions={self.global_pool_conditions!r}; "
                              "accepted: true or false")

    @property
    def image_factor(self) -> int:
        """How many control-image pixels make one latent pixel (the conditioning embedding's stride)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        """Read a diffusers ControlNet config.json dict. A ControlNet for SD 1.x/2.x raises
        WeightsError (it cannot drive an SDXL UNet); unsupported settings raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"ControlNet config: a JSON object is needed, got {type(d).__name__}")
        name = d.get("_class_name", "ControlNetModel")
        if name != "ControlNetModel":
            raise ConfigError(f"ControlNet config: _class_name={name!r}; accepted: ControlNetModel (ControlNet-Union, "
                              "ControlNet-XS and T2I adapters are other models)")
        _refuse_non_sdxl(d)
        trunk = {k: v for k, v in d.items() if k not in _CONTROL_KEYS}
        trunk["_class_name"] = "UNet2DConditionModel"
        downs = trunk.get("down_block_types", UNetConfig.down_block_types)
        if isinstance(downs, (list, tuple)) and all(isinstance(t, str) for t in downs):
            # a ControlNet has no up blocks; the trunk's config wants a matching list
            trunk["up_block_types"] = [t.replace("Down", "Up") for t in reversed(downs)]
        try:
            unet = UNetConfig.from_dict(trunk)
        except ConfigError as e:
            raise ConfigError(str(e).replace("UNet config", "ControlNet config")) from None
        return cls(unet, **{k: d[k] for k in _CONTROL_KEYS if k in d})

    @classmethod
    def sdxl(cls) -> "ControlNetConfig":
        return cls.from_dict(SDXL_CONTROLNET_CONFIG)


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in, then (3×3 conv, stride-2 3×3 conv) per width step, each followed by SiLU, then conv_out."""

    def __init__(self, out_channels: int, in_channels: int, widths: Tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = []
        for a, b in zip(widths, widths[1:]):
            self.blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, stride=2, padding=1)]
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = silu(self.conv_in(x))
        for conv in self.blocks:
            x = silu(conv(x))
        return self.conv_out(x)


def guess_mode_scales(count: int) -> List[float]:
    """diffusers' guess-mode weights torch.logspace(-1, 0, count + 1): 0.1 for the first
    down residual rising geometrically to 1.0 for the mid block."""
    return [10.0 ** (-1 + k / count) for k in range(count + 1)]


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


class ControlNetModel(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        ch, temb = cfg.block_out_channels, cfg.time_embed_dim
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], config.conditioning_channels, config.conditioning_embedding_out_channels)
        self.down_blocks, widths = [], [ch[0]]
        for i, kind in enumerate(cfg.down_block_types):
            last = i == len(ch) - 1
            attn = dict(heads=cfg.num_attention_heads[i], depth=cfg.transformer_layers_per_block[i],
                        context_dim=cfg.cross_attention_dim) if kind == "CrossAttnDownBlock2D" else {}
            self.down_blocks.append(DownBlock(ch[max(i - 1, 0)], ch[i], temb, cfg.layers_per_block[i], not last,
                                              cfg, **attn))
            widths += [ch[i]] * (cfg.layers_per_block[i] + (0 if last else 1))
        self.mid_block = MidBlock(ch[-1], temb, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                                  cfg.cross_attention_dim, cfg)
        self.controlnet_down_blocks = [nn.Conv2d(c, c, 1) for c in widths]
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)
        for slot, block in enumerate(self.transformer_blocks()):
            block.kv_slot = slot

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_in.weight.dtype

    def transformer_blocks(self) -> list:
        """Every transformer block, in the order of the forward pass."""
        levels = self.down_blocks + [self.mid_block]
        return [b for level in levels for t in level.get("attentions", []) for b in t.transformer_blocks]

    def cross_attention_kv(self, encoder_hidden_states: mx.array) -> list:
        """The text context's keys and values for every cross-attention layer (see the UNet's)."""
        c = encoder_hidden_states
        if c.ndim != 3 or c.shape[-1] != self.config.unet.cross_attention_dim:
            raise InputError(f"ControlNet encoder_hidden_states must have shape (batch, tokens, "
                             f"{self.config.unet.cross_attention_dim}); got {tuple(c.shape)}")
        c = c.astype(self.dtype)
        return [tuple(mx.contiguous(a) for a in block.attn2.kv(c)) for block in self.transformer_blocks()]

    def _check_images(self, sample: mx.array, cond: mx.array) -> None:
        cfg, f = self.config, self.config.image_factor
        if sample.ndim != 4 or sample.shape[-1] != cfg.unet.in_channels:
            raise InputError(f"ControlNet sample must be NHWC (B, H, W, {cfg.unet.in_channels}); "
                             f"got shape {tuple(sample.shape)}")
        b, h, w, _ = sample.shape
        c = cfg.conditioning_channels
        if cond.ndim != 4 or cond.shape[0] != b or cond.shape[-1] != c:
            raise InputError(f"controlnet_cond must be NHWC ({b}, H, W, {c}) (the control image, batch as the "
                             f"sample); got shape {tuple(cond.shape)}")
        if (_ceil_div(cond.shape[1], f), _ceil_div(cond.shape[2], f)) != (h, w):
            raise InputError(f"the control image is {cond.shape[2]}x{cond.shape[1]} but the latents are {w}x{h}: "
                             f"it must be {f}x their size ({w * f}x{h * f})")

    def _check_conditioning(self, sample, context, text_embeds, time_ids, cross_kv) -> None:
        cfg, b = self.config.unet, sample.shape[0]
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.cross_attention_dim:
            raise InputError(f"ControlNet encoder_hidden_states must have shape ({b}, tokens, "
                             f"{cfg.cross_attention_dim}); got {tuple(context.shape)}")
        if text_embeds is None or time_ids is None or text_embeds.ndim != 2 or time_ids.ndim != 2 \
                or text_embeds.shape[0] != b or time_ids.shape[0] != b:
            raise InputError(f"the SDXL ControlNet needs text_embeds and time_ids, 2-D with batch {b}")
        width = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
        if width != cfg.projection_class_embeddings_input_dim:
            raise InputError(f"text_embeds {tuple(text_embeds.shape)} + {time_ids.shape[1]} time ids make {width} "
                             f"features; the ControlNet's add_embedding takes "
                             f"{cfg.projection_class_embeddings_input_dim}")
        if cross_kv is not None and (len(cross_kv) != len(self.transformer_blocks())
                                     or cross_kv[0][0].shape[0] != b or cross_kv[0][0].shape[2] != context.shape[1]):
            raise InputError("cross_kv must be this ControlNet's cross_attention_kv(encoder_hidden_states)")

    def _forward_args(self, sample, timestep, context, cond, text_embeds, time_ids, cross_kv):
        """The checked arguments of `_forward` (the timestep as float32, the keys and values made if not given)."""
        self._check_images(sample, cond)
        self._check_conditioning(sample, context, text_embeds, time_ids, cross_kv)
        t = timestep.astype(mx.float32) if isinstance(timestep, mx.array) else mx.array(timestep, dtype=mx.float32)
        if t.ndim > 1 or t.size not in (1, sample.shape[0]):
            raise InputError(f"timestep must be a scalar or have shape ({sample.shape[0]},); got {tuple(t.shape)}")
        if self.config.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        if cross_kv is None:
            cross_kv = self.cross_attention_kv(context)
        return sample, cond, t, cross_kv, text_embeds, time_ids

    def _embedding(self, t: mx.array, text_embeds: mx.array, time_ids: mx.array) -> mx.array:
        cfg, dtype, b = self.config.unet, self.dtype, text_embeds.shape[0]
        t_emb = timestep_embedding(mx.broadcast_to(t.reshape(-1), (b,)), cfg.block_out_channels[0],
                                   cfg.flip_sin_to_cos, cfg.freq_shift)
        ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                 cfg.freq_shift).reshape(b, -1)
        add = mx.concatenate([text_embeds.astype(dtype), ids.astype(dtype)], axis=-1)
        return self.time_embedding(t_emb.astype(dtype)) + self.add_embedding(add)

    def _forward(self, sample, cond, t, cross_kv, text_embeds, time_ids) -> Tuple[List[mx.array], mx.array]:
        """The unscaled residuals: the zero convs applied to every skip and to the mid block's output."""
        emb = self._embedding(t, text_embeds, time_ids)
        h = self.conv_in(sample.astype(self.dtype)) + self.controlnet_cond_embedding(cond.astype(self.dtype))
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, emb, cross_kv)
            skips += s
        h = self.mid_block(h, emb, cross_kv)
        down = [zero_conv(s) for zero_conv, s in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(h)

    def _scaled(self, down, mid, conditioning_scale: float, guess_mode: bool):
        pooled = self.config.global_pool_conditions
        if guess_mode and not pooled:
            scales = [conditioning_scale * s for s in guess_mode_scales(len(down))]
        else:
            scales = [conditioning_scale] * (len(down) + 1)
        down = [r * s for r, s in zip(down, scales)]
        mid = mid * scales[-1]
        if pooled:
            down = [r.mean(axis=(1, 2), keepdims=True) for r in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return down, mid

    def __call__(self, sample: mx.array, timestep, encoder_hidden_states: mx.array, controlnet_cond: mx.array,
                 conditioning_scale: float = 1.0, text_embeds: Optional[mx.array] = None,
                 time_ids: Optional[mx.array] = None, guess_mode: bool = False,
                 cross_kv: Optional[list] = None) -> Tuple[List[mx.array], mx.array]:
        """(down_block_res_samples, mid_block_res_sample) for NHWC latents `sample` and the NHWC
        control image `controlnet_cond` in [0, 1] (image_factor × the latents' size), as diffusers'
        ControlNetModel returns them (NHWC). `cross_kv`: as the UNet's, made beforehand."""
        args = self._forward_args(sample, timestep, encoder_hidden_states, controlnet_cond, text_embeds, time_ids,
                                  cross_kv)
        return self._scaled(*self._forward(*args), conditioning_scale, guess_mode)

    def compiled(self):
        """This forward pass as a compiled MLX function with `__call__`'s signature (the
        scaling stays outside the trace, so new scales reuse it); keep it while used."""
        forward = mx.compile(self._forward, inputs=self.state)

        def call(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, text_embeds=None,
                 time_ids=None, guess_mode=False, cross_kv=None):
            args = self._forward_args(sample, timestep, encoder_hidden_states, controlnet_cond, text_embeds,
                                      time_ids, cross_kv)
            return self._scaled(*forward(*args), conditioning_scale, guess_mode)

        return call


def controlnet_from_weights(config: ControlNetConfig, weights: dict, dtype=None) -> ControlNetModel:
    """Build the ControlNet and load `weights` (diffusers names, PyTorch layout), lazily."""
    model = ControlNetModel(config)
    apply_weights(model, torch_to_mlx(weights), "ControlNet", dtype=parse_dtype(dtype))
    return model


def load_controlnet(path, dtype=None, variant: Optional[str] = None) -> ControlNetModel:
    """Load an SDXL ControlNet: a diffusers folder (config.json + diffusion_pytorch_model[.fp16].safetensors,
    possibly sharded), or one .safetensors file in diffusers naming (its config read from a
    config.json beside it, else worked out from the tensor shapes). `dtype` casts the weights
    (None keeps the file's); nothing is evaluated. An SD 1.x/2.x ControlNet raises WeightsError."""
    path = Path(path)
    if path.is_file():
        return _load_single_file(path, dtype)
    if not path.is_dir():
        raise WeightsError(f"ControlNet not found: {path} (expected a diffusers ControlNet folder holding config.json "
                           "and diffusion_pytorch_model.safetensors, or one .safetensors file)")
    config = ControlNetConfig.from_dict(read_config(path))
    weights = load_folder_weights(path, ["diffusion_pytorch_model"], variant)
    return controlnet_from_weights(config, weights, dtype)


def _load_single_file(path: Path, dtype) -> ControlNetModel:
    if (path.parent / "config.json").is_file():
        config = ControlNetConfig.from_dict(read_config(path.parent))
        weights = load_safetensors(path)
    else:
        weights = load_safetensors(path)
        config = ControlNetConfig.from_dict(config_from_weights(weights, path))
    return controlnet_from_weights(config, weights, dtype)


def check_controlnet_fits(controlnet: ControlNetModel, unet_config: UNetConfig) -> None:
    """WeightsError unless `controlnet`'s residuals fit a UNet with `unet_config` (the
    SDXL base: same widths, levels, layers and text context)."""
    c, u = controlnet.config.unet, unet_config
    fields = ("block_out_channels", "layers_per_block", "cross_attention_dim", "projection_class_embeddings_input_dim",
              "downsample_padding")
    differ = [f"{f} {getattr(c, f)} vs {getattr(u, f)}" for f in fields if getattr(c, f) != getattr(u, f)]
    if differ:
        raise WeightsError("this ControlNet does not fit the UNet it would control (ControlNet vs UNet: "
                           + "; ".join(differ) + "); SDXL ControlNets drive the SDXL base UNet, not the refiner")



_HEAD_WIDTH = 64  # SDXL's attention head width: a weights file does not record head counts


def _count(weights: dict, prefix: str) -> int:
    """How many numbered children `prefix.N.…` the weights hold."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m.group(1) for m in map(pattern.match, weights) if m})


def _cross_width(weights: dict) -> int:
    return next(v.shape[1] for k, v in weights.items() if k.endswith("attn2.to_k.weight"))


def config_from_weights(weights: dict, path) -> dict:
    """The config.json of a single-file ControlNet in diffusers naming, from its tensor shapes;
    what shapes do not tell follows SDXL (64-wide heads, 32 norm groups, 256-wide time-id embeddings)."""
    if "controlnet_cond_embedding.conv_in.weight" not in weights:
        raise WeightsError(f"{path}: not a ControlNet in diffusers naming (no controlnet_cond_embedding tensors); "
                           "use a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors)")
    try:
        if "add_embedding.linear_1.weight" not in weights:
            _refuse_non_sdxl({"cross_attention_dim": _cross_width(weights)})
        levels = _count(weights, "down_blocks")
        ch = [weights[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
        attn = [_count(weights, f"down_blocks.{i}.attentions") > 0 for i in range(levels)]
        depth = [_count(weights, f"down_blocks.{i}.attentions.0.transformer_blocks") or 1 for i in range(levels)]
        depth[-1] = _count(weights, "mid_block.attentions.0.transformer_blocks")
        emb = weights["controlnet_cond_embedding.conv_in.weight"]
        widths = [emb.shape[0]] + [weights[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0]
                                   for j in range(1, _count(weights, "controlnet_cond_embedding.blocks"), 2)]
        return {**SDXL_CONTROLNET_CONFIG, "block_out_channels": ch, "transformer_layers_per_block": depth,
                "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                "layers_per_block": _count(weights, "down_blocks.0.resnets"),
                "attention_head_dim": [max(c // _HEAD_WIDTH, 1) for c in ch],
                "cross_attention_dim": _cross_width(weights), "in_channels": weights["conv_in.weight"].shape[1],
                "conditioning_channels": emb.shape[1], "conditioning_embedding_out_channels": widths,
                "projection_class_embeddings_input_dim": weights["add_embedding.linear_1.weight"].shape[1]}
    except (KeyError, StopIteration, IndexError) as e:
        raise WeightsError(f"{path}: an incomplete ControlNet in diffusers naming (no tensor for {e}); use a "
                           "diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors)") from None
