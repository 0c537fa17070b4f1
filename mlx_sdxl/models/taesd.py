"""TAESDXL, the tiny autoencoder for SDXL latents (diffusers' AutoencoderTiny), in MLX.

    taesd = load_taesd("madebyollin/taesdxl")        # or a local folder / .safetensors file
    image = taesd.decode(latents)                    # the pipeline's (scaled) latents → NHWC ≈ [-1, 1]
    latents = taesd.encode(image)                    # NHWC image in [-1, 1] → latents

It has about 2.4M parameters per half, so decoding a 1024² image costs a fraction of the
full VAE's time and memory. The server uses it for live previews and, with
`--vae-decoder taesd`, for final images. Activations are NHWC; parameter names are
diffusers' (`encoder.layers.N...`, `decoder.layers.N...`), so a diffusers
`diffusion_pytorch_model.safetensors` loads as it is. Only safetensors files are read.

TAESDXL's config has scaling_factor 1.0: it decodes the latents the SDXL pipeline
samples (already multiplied by the big VAE's 0.13025) directly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..errors import ConfigError, WeightsError
from ..weights import apply_weights, load_folder_weights, load_safetensors, parse_dtype, read_config, torch_to_mlx
from .blocks import upsample_nearest

TAESDXL_ID = "madebyollin/taesdxl"
WEIGHT_STEM = "diffusion_pytorch_model"


@dataclass
class TinyConfig:
    """diffusers AutoencoderTiny config (the defaults are TAESDXL's)."""

    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: Tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: Tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: Tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: Tuple[int, ...] = (3, 3, 3, 1)
    latent_channels: int = 4
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    upsampling_scaling_factor: int = 2
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self):
        for key in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks",
                    "num_decoder_blocks"):
            setattr(self, key, tuple(int(v) for v in getattr(self, key)))
        if len(self.encoder_block_out_channels) != len(self.num_encoder_blocks) or \
                len(self.decoder_block_out_channels) != len(self.num_decoder_blocks):
            raise ConfigError("AutoencoderTiny block_out_channels and num_*_blocks must have the same length")
        accepted = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}
        for key, want in accepted.items():
            if getattr(self, key) != want:
                raise ConfigError(f"AutoencoderTiny {key}={getattr(self, key)!r} is not supported; accepted: {want!r}")
        if self.shift_factor:
            raise ConfigError(f"AutoencoderTiny shift_factor={self.shift_factor!r} is not supported; accepted: 0")

    @classmethod
    def from_dict(cls, d: Mapping) -> "TinyConfig":
        names = {f.name for f in fields(cls)}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        if "block_out_channels" in d and "encoder_block_out_channels" not in d:  # older configs
            kwargs["encoder_block_out_channels"] = kwargs["decoder_block_out_channels"] = d["block_out_channels"]
        return cls(**kwargs)


class _Upsample(nn.Module):
    """Nearest-neighbour 2× upsampling (no parameters; holds a place in the layer list)."""

    def __call__(self, x: mx.array) -> mx.array:
        return upsample_nearest(x)


class TinyBlock(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + skip(x)), diffusers' AutoencoderTinyBlock."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                     nn.Conv2d(cout, cout, 3, padding=1)]
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.conv:
            h = layer(h)
        return nn.relu(h + self.skip(x))


def _run(layers, x: mx.array) -> mx.array:
    for layer in layers:
        x = layer(x)
    return x


class TinyEncoder(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        layers = []
        for i, (channels, blocks) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks)):
            if i == 0:
                layers.append(nn.Conv2d(cfg.in_channels, channels, 3, padding=1))
            else:
                layers.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False))
            layers += [TinyBlock(channels, channels) for _ in range(blocks)]
        layers.append(nn.Conv2d(cfg.encoder_block_out_channels[-1], cfg.latent_channels, 3, padding=1))
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        return _run(self.layers, (x + 1) / 2)  # TAESD works on images in [0, 1]


class TinyDecoder(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        channels = cfg.decoder_block_out_channels
        layers = [nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1), nn.ReLU()]
        last = len(channels) - 1
        for i, (width, blocks) in enumerate(zip(channels, cfg.num_decoder_blocks)):
            layers += [TinyBlock(width, width) for _ in range(blocks)]
            if i < last:
                layers.append(_Upsample())
            layers.append(nn.Conv2d(width, cfg.out_channels if i == last else width, 3, padding=1, bias=i == last))
        self.layers = layers

    def __call__(self, z: mx.array) -> mx.array:
        return _run(self.layers, mx.tanh(z / 3) * 3) * 2 - 1  # soft clamp in; [0, 1] → [-1, 1] out


class AutoencoderTiny(nn.Module):
    """TAESD(XL): `encode` NHWC images in [-1, 1] → latents; `decode` latents → images ≈ [-1, 1]."""

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.config = cfg
        self.encoder = TinyEncoder(cfg)
        self.decoder = TinyDecoder(cfg)

    def _check(self, x, channels: int, what: str) -> mx.array:
        x = x if isinstance(x, mx.array) else mx.array(x)
        if x.ndim != 4 or x.shape[-1] != channels:
            raise WeightsError(f"TAESD {what} must be NHWC with {channels} channels, got shape {tuple(x.shape)}")
        return x.astype(self.decoder.layers[0].weight.dtype)

    def encode(self, image: mx.array) -> mx.array:
        return self.encoder(self._check(image, self.config.in_channels, "images"))

    def decode(self, latents: mx.array) -> mx.array:
        """Latents as the SDXL pipeline samples them (scaled by 0.13025) → NHWC image ≈ [-1, 1]."""
        z = self._check(latents, self.config.latent_channels, "latents") / self.config.scaling_factor
        return self.decoder(z)


def taesd_from_weights(config, weights: Mapping[str, mx.array], dtype=None) -> AutoencoderTiny:
    """Build TAESD from diffusers-named tensors in PyTorch layout."""
    cfg = config if isinstance(config, TinyConfig) else TinyConfig.from_dict(config)
    model = AutoencoderTiny(cfg)
    apply_weights(model, torch_to_mlx(weights), "TAESD (AutoencoderTiny)", dtype=parse_dtype(dtype))
    model.eval()
    mx.eval(model.parameters())  # small: read now, so any thread can use it (lazy arrays belong to their thread)
    return model


def _local_folder(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        return path
    from ..hub import looks_like_repo_id, snapshot

    if not looks_like_repo_id(spec):
        raise WeightsError(f"TAESD {spec!r}: no such file or folder, and not a hub id (owner/name)")
    return snapshot(spec, extra_patterns=["config.json", f"{WEIGHT_STEM}.safetensors"])


def load_taesd(spec=TAESDXL_ID, dtype=mx.float32) -> AutoencoderTiny:
    """TAESD from a diffusers folder (config.json + diffusion_pytorch_model.safetensors), a bare
    .safetensors file (TAESDXL's config is assumed), or a hub id (downloaded once, as models are)."""
    path = _local_folder(str(spec))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise WeightsError(f"TAESD weights are read from .safetensors only, got {path.name}")
        return taesd_from_weights(TinyConfig(), load_safetensors(path), dtype)
    config = read_config(path) if (path / "config.json").is_file() else {}
    return taesd_from_weights(config, load_folder_weights(path, [WEIGHT_STEM]), dtype)
