"""A model part's MLX module built from its diffusers config, with MLX's default (lazy)
initialisation: nothing is allocated until the parameters are evaluated or replaced."""

from __future__ import annotations

import mlx.nn as nn


def build_part(part: str, config: dict) -> nn.Module:
    """"unet", "vae", or a text encoder ("text_encoder", "text_encoder_2") from its config dict."""
    if part == "unet":
        from .unet import UNet2DConditionModel, UNetConfig
        return UNet2DConditionModel(UNetConfig.from_dict(config))
    if part == "vae":
        from .vae import AutoencoderKL, VAEConfig
        return AutoencoderKL(VAEConfig.from_dict(config))
    from .clip import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig.from_dict(config))
