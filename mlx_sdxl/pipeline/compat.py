"""Checks that a base, a refiner and a VAE can work together, before anything loads."""

from __future__ import annotations

from typing import Optional

from ..errors import WeightsError
from ..sources import ModelSource


def inpainting_channels(latent: int) -> int:
    """An inpainting UNet reads the latents, the mask and the masked image's latents."""
    return 2 * latent + 1


def is_inpainting(source: ModelSource) -> bool:
    unet = source.configs["unet"]
    return unet.get("in_channels", 4) == inpainting_channels(unet.get("out_channels", 4))


def check_compatible(base: ModelSource, refiner: Optional[ModelSource], vae: ModelSource) -> None:
    vae_cfg = vae.configs["vae"]
    latent = vae_cfg.get("latent_channels", 4)
    for src in filter(None, (base, refiner)):
        unet = src.configs["unet"]
        if unet.get("in_channels", 4) not in (latent, inpainting_channels(latent)):
            raise WeightsError(f"the {src.role} UNet takes {unet.get('in_channels')} input channels but the VAE "
                               f"makes {latent} (an inpainting UNet takes {inpainting_channels(latent)})")
    if refiner is None:
        return
    te2_b, te2_r = base.configs["text_encoder_2"], refiner.configs["text_encoder_2"]
    for key in ("hidden_size", "num_hidden_layers", "projection_dim", "vocab_size"):
        if te2_b.get(key) != te2_r.get(key):
            raise WeightsError(
                f"base and refiner text_encoder_2 differ in {key} ({te2_b.get(key)} vs {te2_r.get(key)}); "
                "an SDXL refiner must use the same OpenCLIP bigG encoder as its base")
    cross = refiner.configs["unet"].get("cross_attention_dim")
    if cross != te2_r.get("hidden_size"):
        raise WeightsError(f"the refiner UNet attends to width {cross} but text_encoder_2 gives "
                           f"{te2_r.get('hidden_size')}")
    if refiner.configs["vae"].get("latent_channels") != vae_cfg.get("latent_channels"):
        raise WeightsError("base and refiner VAEs have different latent channels")
