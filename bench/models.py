"""Model sources for the benchmark: real weights (any source mlx_sdxl opens) or random
weights at the real SDXL architecture (`--random-weights`) or at a tiny one (`--tiny`)."""

from __future__ import annotations

import dataclasses
import zlib
from types import SimpleNamespace
from typing import Optional

import mlx.core as mx
import numpy as np

from mlx_sdxl.models.parts import build_part
from mlx_sdxl.models.unet import SDXL_BASE_CONFIG, SDXL_REFINER_CONFIG, UNetConfig
from mlx_sdxl.models.vae import VAEConfig
from mlx_sdxl.sources import ModelSource, open_source
from mlx_sdxl.spec import BASE, REFINER

VOCAB = 49408
BOS, EOS = 49406, 49407

_CLIP_L = {"model_type": "clip_text_model", "architectures": ["CLIPTextModel"], "hidden_size": 768,
           "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
           "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": VOCAB, "max_position_embeddings": 77,
           "layer_norm_eps": 1e-5, "eos_token_id": 2}
_BIG_G = {**_CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280,
          "num_hidden_layers": 32, "num_attention_heads": 20, "intermediate_size": 5120, "hidden_act": "gelu",
          "projection_dim": 1280}
_VAE = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(VAEConfig.sdxl()).items()}

FULL = {
    BASE: {"unet": SDXL_BASE_CONFIG, "vae": _VAE, "text_encoder": _CLIP_L, "text_encoder_2": _BIG_G},
    REFINER: {"unet": SDXL_REFINER_CONFIG, "vae": _VAE, "text_encoder_2": _BIG_G},
}

# Tiny versions of the same architectures (seconds on a CPU), for tests and smoke runs.
_T1 = {**_CLIP_L, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1, "intermediate_size": 128,
       "projection_dim": 64}
_T2 = {**_BIG_G, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1, "intermediate_size": 128,
       "projection_dim": 64}
_TINY_UNET = {"layers_per_block": 1, "addition_time_embed_dim": 8, "norm_num_groups": 32}
TINY = {
    BASE: {"unet": {**SDXL_BASE_CONFIG, **_TINY_UNET, "block_out_channels": [32, 64, 64],
                    "transformer_layers_per_block": [1, 1, 2], "attention_head_dim": [2, 4, 4],
                    "cross_attention_dim": 128, "projection_class_embeddings_input_dim": 64 + 6 * 8},
           "vae": {**_VAE, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
           "text_encoder": _T1, "text_encoder_2": _T2},
    REFINER: {"unet": {**SDXL_REFINER_CONFIG, **_TINY_UNET, "block_out_channels": [32, 64, 64, 64],
                       "transformer_layers_per_block": 1, "attention_head_dim": [1, 2, 2, 2],
                       "cross_attention_dim": 64, "projection_class_embeddings_input_dim": 64 + 5 * 8}},
}
TINY[REFINER].update(vae=TINY[BASE]["vae"], text_encoder_2=_T2)


class WordTokenizer:
    """Stands in for the CLIP tokenizers with random weights (no vocabulary files needed):
    one id per word, laid out as CLIP's are, [bos, words..., eos, pad...]. Text-encoder
    cost does not depend on which ids it sees."""

    model_max_length = 77
    bos_token_id, eos_token_id, unk_token_id = BOS, EOS, EOS

    def __init__(self, pad: int):
        self.pad = self.pad_token_id = pad

    def __len__(self) -> int:
        return VOCAB

    def _ids(self, text: str, special: bool = True):
        words = [1 + zlib.crc32(w.encode()) % (BOS - 1) for w in text.lower().split()]
        return [BOS] + words + [EOS] if special else words

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id  # no comma token: the a1111 chunks never move back to one

    def __call__(self, prompts, padding=False, max_length=None, truncation=False, return_tensors=None,
                 add_special_tokens=True, **_):
        rows = [self._ids(p, add_special_tokens) for p in prompts]
        if truncation:
            n = max_length or self.model_max_length
            rows = [r[:n - 1] + [EOS] if len(r) > n else r for r in rows]
        if padding == "max_length":
            rows = [r + [self.pad] * (max_length - len(r)) for r in rows]
        return SimpleNamespace(input_ids=np.array(rows, dtype=np.int64) if return_tensors == "np" else rows)

    def decode(self, ids, **_):
        return " ".join(str(i) for i in ids)


def build_random(name: str, config: dict, dtype=None, seed: int = 0, evaluate: bool = True):
    """A model part with random parameters (MLX's default initialisation), evaluated once, or
    (`evaluate=False`) left lazy, to be made when first used, as weights mapped from a file are."""
    mx.random.seed(seed)
    model = build_part(name, config)
    if dtype is not None:
        model.set_dtype(dtype)
    model.eval()
    if evaluate:
        mx.eval(model.parameters())
    return model


def unet_inputs(cfg: UNetConfig, role: str, height: int, width: int, batch: int, vae_factor: int = 8) -> dict:
    """Random UNet inputs for a `height`×`width` image (keyword names of the UNet's call),
    with the role's time ids: original size, crop, then target size (base) or aesthetic score."""
    n_ids = 6 if role == BASE else 5
    pooled = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
    key = mx.random.key(0)
    ids = [float(height), width, 0, 0] + ([height, width] if role == BASE else [6.0])
    latent = (batch, height // vae_factor, width // vae_factor, cfg.in_channels)
    inputs = dict(sample=mx.random.normal(latent, key=key),
                  encoder_hidden_states=mx.random.normal((batch, 77, cfg.cross_attention_dim), key=key),
                  text_embeds=mx.random.normal((batch, pooled), key=key),
                  time_ids=mx.broadcast_to(mx.array(ids), (batch, n_ids)))
    mx.eval(inputs)
    return inputs


def random_source(role: str, tiny: bool = False, lazy: bool = False) -> ModelSource:
    """Random weights at the SDXL architecture (or a tiny one). `lazy`: each model's parameters are
    made when first used, as a pipeline loading real files reads them (the loading peak is then
    the real one: a 4-bit model, say, is quantized layer by layer, never held dense)."""
    configs = (TINY if tiny else FULL)[role]
    seeds = {"unet": 1 if role == BASE else 2, "vae": 3, "text_encoder": 4, "text_encoder_2": 5}
    loaders = {name: (lambda n, c: (lambda dtype=None: build_random(n, c, dtype, seeds[n], not lazy)))(name, cfg)
               for name, cfg in configs.items()}
    tokenizers = {"tokenizer_2": lambda: WordTokenizer(pad=0)}
    if role == BASE:
        tokenizers["tokenizer"] = lambda: WordTokenizer(pad=EOS)
    size = "tiny" if tiny else "full-size"
    # the same fingerprint for shared parts lets a pipeline build them once for base and refiner
    fps = {name: f"random-{size}-{name}" + ("" if name in ("vae", "text_encoder_2") else f"-{role}")
           for name in configs}
    return ModelSource(role=role, description=f"random weights ({size} SDXL {role})", configs=dict(configs),
                       loaders=loaders, tokenizers=tokenizers, fingerprints=fps,
                       force_zeros_for_empty_prompt=role == BASE, requires_aesthetics_score=role == REFINER)


def open_sources(model: Optional[str], refiner: Optional[str], random_weights: bool, tiny: bool, lazy: bool = False):
    """(base, refiner or None) ModelSources (`lazy`: see random_source)."""
    if random_weights or tiny:
        return random_source(BASE, tiny, lazy), (random_source(REFINER, tiny, lazy) if refiner != "none" else None)
    base = open_source(model, BASE)
    ref = open_source(refiner, REFINER) if refiner not in (None, "none") else None
    return base, ref
