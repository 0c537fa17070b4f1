"""The SDXL VAE (diffusers AutoencoderKL) in MLX: NHWC activations, diffusers names.

    posterior = vae.encode(image)     # image NHWC in [-1, 1] → DiagonalGaussian
    latents = posterior.sample(key) * vae.config.scaling_factor
    image = vae.decode(latents / vae.config.scaling_factor)   # decode takes UNSCALED latents

Precision policy (`upcast`, set by `load_vae` / `vae_from_weights`):
- None (default): weights stored in float16 with `force_upcast: true` in the config
  (the original SDXL VAE, whose activations overflow fp16) are cast to float32 for
  each encode/decode, inputs too, and the result is float32. Any other storage dtype
  (fp32, bf16, or fp16 with force_upcast false, e.g. madebyollin/sdxl-vae-fp16-fix)
  computes in that dtype.
- True: always compute in float32. False: always compute in the storage dtype.

Tiling (`tiled=` on decode / encode; `tile_size=` in image pixels, a multiple of 8):
- None (default): exact tiling when the image is larger than one tile along either side
  (the tile is the model's `tile_size` attribute, vae_tiling.DEFAULT_TILE_SIZE pixels unless
  set; setting it to None makes the default untiled: faster on a GPU with memory to spare),
  else untiled.
- True or "exact": the same (an image that fits in one tile runs untiled).
- False: never tile.
- "blend": diffusers' enable_tiling. Each tile (`tile_size`, else `tile_sample_size`, default
  config.sample_size = 1024 px; neighbours int(tile · (1 − overlap)) latents apart, overlap
  0.25) is decoded on its own, with its own GroupNorm statistics and attention, then blended
  into its upper and left neighbours by linear ramps: this CHANGES the image (seams), and
  reproduces diffusers' tiled_decode / _tiled_encode. `enable_tiling(size, overlap)` sets
  these blend settings only.
Exact tiling equals the untiled result up to float rounding: the convolutions run tile by
tile with a one-pixel halo and every GroupNorm uses whole-image statistics, gathered as the
tiles are made; only the mid block's attention sees the whole (latent) map, a chunk of query
rows at a time. Peak memory is a few full-resolution feature maps plus one tile's working
set (see vae_tiling). On MLX-CPU it is the MORE accurate of the two at full size: MLX's own
GroupNorm there sums each group in one long float32 sum (~1e-5 relative error per norm).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from numbers import Integral
from typing import Callable, Mapping, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from ..errors import ConfigError, InputError, WeightsError
from ..weights import apply_weights, load_folder_weights, parse_dtype, read_config, torch_to_mlx
from .blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D, group_norm
from .vae_tiling import DEFAULT_TILE_SIZE, blended, decode_exact, encode_exact

EPS = 1e-6  # every GroupNorm in the VAE


@dataclass
class VAEConfig:
    """diffusers AutoencoderKL config; the defaults are SDXL's."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 1024
    scaling_factor: float = 0.13025
    force_upcast: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        n = len(self.block_out_channels)
        if n == 0:
            raise ConfigError("VAE block_out_channels is empty")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, key)
            if len(types) != n:
                raise ConfigError(f"VAE {key} has {len(types)} entries but block_out_channels has {n}")
            bad = sorted(set(types) - {want})
            if bad:
                raise ConfigError(f"unsupported VAE {key} {bad}; accepted: {want}")
        if self.act_fn != "silu":
            raise ConfigError(f"unsupported VAE act_fn {self.act_fn!r}; accepted: silu")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ConfigError(f"VAE block_out_channels {odd} are not divisible by norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ConfigError("VAE layers_per_block and latent_channels must be positive")

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        return cls()

    @classmethod
    def from_dict(cls, d: Mapping) -> "VAEConfig":
        """Read a diffusers vae/config.json; reject settings this model does not implement."""
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if d.get(key) is not None:
                raise ConfigError(
                    f"VAE {key}={d[key]!r} is not supported (SDXL's VAE has none); accepted: null or absent"
                )
        for key in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
            if d.get(key, True) is not True:
                raise ConfigError(f"VAE {key}={d[key]!r} is not supported; accepted: true")
        size = d.get("sample_size", cls.sample_size)
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ConfigError(f"VAE sample_size {size} is not supported; accepted: one int or a square [n, n]")
            size = size[0]
        names = {f.name for f in fields(cls)} - {"sample_size"}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        return cls(**kwargs, sample_size=int(size))


# ----------------------------------------------------------------------------- modules

class AttentionBlock(Attention):
    """Single-head self-attention over all positions, with its own GroupNorm and residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = group_norm(channels, EPS, groups)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = super().__call__(self.group_norm(x).reshape(b, h * w, c))
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups=groups, eps=EPS) for _ in range(2)]
        self.attentions = [AttentionBlock(channels, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups=groups, eps=EPS) for i in range(layers)]
        if downsample:
            self.downsamplers = [Downsample2D(cout, padding=0)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class UpDecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups=groups, eps=EPS) for i in range(layers)]
        if upsample:
            self.upsamplers = [Upsample2D(cout)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < n - 1)
            for i in range(n)
        ]
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = group_norm(ch[-1], EPS, g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = [
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < n - 1)
            for i in range(n)
        ]
        self.conv_norm_out = group_norm(ch[-1], EPS, g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array, between_blocks: Optional[Callable[[mx.array], None]] = None) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
            if between_blocks is not None:
                between_blocks(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class DiagonalGaussian:
    """The encoder's posterior: `moments` = mean ‖ logvar along the last axis."""

    def __init__(self, moments: mx.array):
        self.mean, logvar = mx.split(moments, 2, axis=-1)
        self.logvar = mx.clip(logvar, -30.0, 20.0)
        self.std = mx.exp(0.5 * self.logvar)
        self.var = mx.exp(self.logvar)

    def sample(self, key: Optional[mx.array] = None) -> mx.array:
        """mean + std · N(0, 1), drawn with `key` (MLX's global generator when None)."""
        return self.mean + self.std * mx.random.normal(self.mean.shape, dtype=self.mean.dtype, key=key)

    def mode(self) -> mx.array:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig, upcast: Optional[bool] = None):
        super().__init__()
        self.config = config
        self.upcast = upcast
        self.tile_sample_size = config.sample_size
        self.tile_overlap = 0.25
        self.tile_size: Optional[int] = DEFAULT_TILE_SIZE  # exact tiles of tiled=None calls; None: untiled
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    # -- precision
    @property
    def dtype(self) -> mx.Dtype:
        """The dtype the weights are stored in."""
        return self.post_quant_conv.weight.dtype

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The dtype encode/decode run in (see the module docstring)."""
        if self.upcast is None:
            upcast = self.dtype == mx.float16 and self.config.force_upcast
        else:
            upcast = self.upcast
        return mx.float32 if upcast else self.dtype

    @contextmanager
    def _computing(self):
        """Within: the parameters are (lazy) casts to the compute dtype; the stored ones come back after."""
        dtype = self.compute_dtype
        stored = None
        if dtype != self.dtype:
            stored = self.parameters()
            self.update(tree_map(lambda p: p.astype(dtype), stored))
        try:
            yield dtype
        finally:
            if stored is not None:
                self.update(stored)

    # -- tiling
    def enable_tiling(self, tile_sample_size: Optional[int] = None, overlap: Optional[float] = None) -> None:
        """Set the settings of `tiled="blend"` (diffusers' blended tiling): tile size in pixels
        and overlap fraction. Exact tiling (the default for large images) does not read them."""
        size = self.tile_sample_size if tile_sample_size is None else tile_sample_size
        overlap = self.tile_overlap if overlap is None else float(overlap)
        size = self._tile_pixels(size, "tile_sample_size")
        f = self.config.scale_factor
        if not 0 <= overlap < 1 or int(size // f * (1 - overlap)) < 1:
            raise InputError(f"tile overlap must be in [0, 1) and leave a stride of at least 1 latent, got {overlap}")
        self.tile_sample_size, self.tile_overlap = size, overlap

    def disable_tiling(self) -> None:
        """Restore the default blend settings (config.sample_size pixels, overlap 0.25)."""
        self.tile_sample_size, self.tile_overlap = self.config.sample_size, 0.25

    def _tile_pixels(self, size, what: str = "tile_size") -> int:
        f = self.config.scale_factor
        if isinstance(size, bool) or not isinstance(size, Integral) or size < f or size % f:
            raise InputError(f"{what} must be a positive multiple of {f} pixels (the VAE's scale factor), "
                             f"e.g. {DEFAULT_TILE_SIZE}; got {size!r}")
        return int(size)

    def _tiling(self, tiled, tile_size, height: int, width: int) -> Tuple[Optional[str], int]:
        """(mode, tile pixels) of a call on a `height`×`width`-pixel image: mode "exact",
        "blend" or None (untiled); a mode other than "blend" tiles only images larger than a tile."""
        if not (tiled is None or isinstance(tiled, bool) or (isinstance(tiled, str) and tiled in ("exact", "blend"))):
            raise InputError(f"tiled must be None (tile when larger than a tile), True or 'exact', False "
                             f"or 'blend' (diffusers' blended tiling); got {tiled!r}")
        if tiled == "blend":
            tile = self.tile_sample_size if tile_size is None else self._tile_pixels(tile_size)
            f = self.config.scale_factor
            if int(tile // f * (1 - self.tile_overlap)) < 1:
                raise InputError(f"tile_size {tile} leaves blended tiles no stride at overlap {self.tile_overlap}; "
                                 f"accepted: tiles of at least {f} / (1 - overlap) pixels")
        else:
            default = self.tile_size if self.tile_size is not None else DEFAULT_TILE_SIZE
            tile = self._tile_pixels(default if tile_size is None else tile_size)
            if tiled is None and tile_size is None and self.tile_size is None:
                return None, tile
        if tiled is False or max(height, width) <= tile:
            return None, tile
        return ("blend" if tiled == "blend" else "exact"), tile

    def _blend_geometry(self, tile_px: int) -> Tuple[int, int]:
        """(tile, stride) in latents of blended tiling with `tile_px`-pixel tiles."""
        tile = tile_px // self.config.scale_factor
        return tile, int(tile * (1 - self.tile_overlap))

    # -- checks
    def _check(self, x, what: str, channels: int, multiple: int) -> mx.array:
        if not isinstance(x, mx.array):
            x = mx.array(np.asarray(x))
        if x.ndim != 4 or x.shape[-1] != channels:
            hint = " (this looks channels-first; transpose to NHWC)" if x.ndim == 4 and x.shape[1] == channels else ""
            raise InputError(f"VAE {what} must be NHWC with {channels} channels, got shape {tuple(x.shape)}{hint}")
        if not mx.issubdtype(x.dtype, mx.floating):
            raise InputError(f"VAE {what} must be floating point, got {x.dtype}")
        if x.shape[0] < 1 or x.shape[1] < multiple or x.shape[2] < multiple or x.shape[1] % multiple or x.shape[2] % multiple:
            raise InputError(f"VAE {what} height and width must be positive multiples of {multiple}, got {tuple(x.shape)}")
        return x

    # -- public
    def encode(self, x: mx.array, tiled: Union[None, bool, str] = None,
               tile_size: Optional[int] = None) -> DiagonalGaussian:
        """NHWC image in [-1, 1] → posterior over unscaled latents (H/8 × W/8 for SDXL).
        `tiled` / `tile_size` (image pixels): see the module docstring."""
        f = self.config.scale_factor
        x = self._check(x, "image", self.config.in_channels, f)
        mode, tile = self._tiling(tiled, tile_size, *x.shape[1:3])
        with self._computing() as dtype:
            x = x.astype(dtype)
            if mode == "exact":
                moments = self.quant_conv(encode_exact(self.encoder, x, tile, self.config.norm_num_groups))
            elif mode == "blend":
                t, stride = self._blend_geometry(tile)
                run = lambda t: self.quant_conv(self.encoder(t))
                moments = blended(run, x, t * f, stride * f, blend=t - stride, keep=stride)
            else:
                moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussian(moments)

    def decode(self, z: mx.array, tiled: Union[None, bool, str] = None,
               between_blocks: Optional[Callable[[mx.array], None]] = None,
               tile_size: Optional[int] = None) -> mx.array:
        """UNSCALED NHWC latents (divide by config.scaling_factor first) → NHWC image ≈ [-1, 1].
        `tiled` / `tile_size` (image pixels): see the module docstring.

        `between_blocks(x)` is called after each decoder up block of an untiled (or blended,
        per tile) decode, e.g. `mx.eval`, so that a long decode returns to Python (and Ctrl-C)
        between blocks. An exact tiled decode does not call it: it evaluates tile by tile,
        returning to Python after each tile anyway."""
        f = self.config.scale_factor
        z = self._check(z, "latents", self.config.latent_channels, 1)
        mode, tile = self._tiling(tiled, tile_size, z.shape[1] * f, z.shape[2] * f)
        with self._computing() as dtype:
            z = z.astype(dtype)
            if mode == "exact":
                return decode_exact(self.decoder, self.post_quant_conv(z), tile, self.config.norm_num_groups)
            run = lambda t: self.decoder(self.post_quant_conv(t), between_blocks)
            if mode == "blend":
                t, stride = self._blend_geometry(tile)
                return blended(run, z, t, stride, blend=(t - stride) * f, keep=stride * f)
            return run(z)


# ----------------------------------------------------------------------------- loading

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _modern_names(weights: Mapping[str, mx.array]) -> dict:
    """Old diffusers files name the mid-block attention query/key/value/proj_attn, and
    converted single-file checkpoints may keep its projections as 1×1 convs."""
    out = {}
    for k, v in weights.items():
        if ".attentions." in k:
            parts = k.split(".")
            if parts[-2] in _LEGACY_ATTENTION:
                parts[-2] = _LEGACY_ATTENTION[parts[-2]]
                k = ".".join(parts)
            if v.ndim == 4 and k.endswith(".weight") and tuple(v.shape[2:]) == (1, 1) and "group_norm" not in k:
                v = v.reshape(v.shape[:2])
        out[k] = v
    return out


def vae_from_weights(config, weights: Mapping[str, mx.array], dtype=None,
                     upcast: Optional[bool] = None) -> AutoencoderKL:
    """Build the VAE from tensors with diffusers names in PyTorch layout.

    `config` is a VAEConfig or a config.json dict; `dtype` casts the stored weights
    (None keeps the file's); `upcast` is the precision policy in the module docstring.
    """
    cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
    model = AutoencoderKL(cfg, upcast=upcast)
    apply_weights(model, torch_to_mlx(_modern_names(weights)), "VAE", dtype=parse_dtype(dtype))
    model.eval()
    return model


def load_vae(path, dtype=None, upcast: Optional[bool] = None, variant: Optional[str] = None) -> AutoencoderKL:
    """Load a diffusers `vae/` folder (config.json + diffusion_pytorch_model[.fp16].safetensors).

    A model root holding `vae/` is accepted too. With dtype float16 the `.fp16.` file
    is preferred (unless `variant` says otherwise).
    """
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not folder.is_dir():
        raise WeightsError(f"VAE folder not found: {folder}")
    dtype = parse_dtype(dtype)
    config = VAEConfig.from_dict(read_config(folder))
    if variant is None and dtype is not None and dtype == mx.float16:
        variant = "fp16"
    weights = load_folder_weights(folder, ["diffusion_pytorch_model"], variant)
    return vae_from_weights(config, weights, dtype, upcast)
