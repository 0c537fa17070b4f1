"""Tiny random SDXL-shaped models for tests, built offline.

`make_tokenizer_dir` writes a small CLIP BPE vocabulary laid out the way CLIP's
is: the 256 byte characters, the same with the end-of-word marker "</w>", a few
merges, then <|startoftext|> and <|endoftext|> as the two largest ids. The pad
token is either <|endoftext|> (like tokenizer/) or "!" = id 0 (like tokenizer_2/).
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["a", "photo", "of", "cat", "dog", "the", "red", "car", "an", "astronaut", "riding",
         "horse", "on", "mars", "blurry", "ugly", "green", "tree", "in", "snow"]


def _byte_chars():
    """The printable-character stand-ins for the 256 byte values, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_vocab():
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab:
                vocab.append(merged)
            pieces = [merged] + pieces[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def make_tokenizer_dir(path, pad_token: str = "<|endoftext|>") -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) at `path`."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), pad_token=pad_token)
    tok.model_max_length = 77
    tok.save_pretrained(str(path))
    return path


def vocab_size() -> int:
    return len(tiny_vocab()[0])


# ---------------------------------------------------------------------------
# Tiny SDXL base and refiner pipelines in diffusers, saved in the real layout.

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
    "timestep_spacing": "leading", "steps_offset": 1, "trained_betas": None, "clip_sample": False,
    "set_alpha_to_one": False, "skip_prk_steps": True, "sample_max_value": 1.0,
}
TIME_DIM = 8          # addition_time_embed_dim (256 at full size)
TE1_WIDTH = 64        # CLIP-L hidden size (768); 64-wide heads as in SDXL
TE2_WIDTH = 64        # bigG hidden size (1280)
POOLED = 64           # bigG projection (1280)


def _randomize(module, seed: int, std: float = 0.08):
    """Give every parameter non-trivial random values (diffusers zero-inits some)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight") or "layer_norm" in name \
                    and name.endswith("weight") or "norm1.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


def tiny_text_encoders(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common = dict(vocab_size=vocab_size(), max_position_embeddings=77, layer_norm_eps=1e-5,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=TE1_WIDTH, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=1, hidden_act="quick_gelu", projection_dim=TE1_WIDTH,
                                       **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=TE2_WIDTH, intermediate_size=64,
                                                     num_hidden_layers=3, num_attention_heads=1,
                                                     hidden_act="gelu", projection_dim=POOLED, **common))
    return _randomize(te1.eval(), seed + 1, 0.2), _randomize(te2.eval(), seed + 2, 0.2)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.13025,
                        force_upcast=True)
    vae = _randomize(vae.eval(), seed + 3, 0.05)
    import torch

    with torch.no_grad():  # a stronger output layer, so decoded images span much of [0, 1]
        vae.decoder.conv_out.weight.mul_(10.0)
    return vae


def tiny_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    common = dict(in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=8,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM)
    if kind == "base":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4],
            cross_attention_dim=TE1_WIDTH + TE2_WIDTH,
            projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM, **common)
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=1, attention_head_dim=[1, 2, 2, 2],
            cross_attention_dim=TE2_WIDTH,
            projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM, **common)
    return _randomize(unet.eval(), seed + (4 if kind == "base" else 5), 0.05)


def make_tiny_sdxl(root, seed: int = 0):
    """Build and save tiny random SDXL base and refiner pipelines.

    Returns (base_dir, refiner_dir, base_pipe, refiner_pipe): the diffusers
    pipelines (fp32, CPU, watermark off) for reference runs.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    root = Path(root)
    tok1 = CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(root / "_tok1")))
    tok2 = CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(root / "_tok2", pad_token="!")))
    te1, te2 = tiny_text_encoders(seed)
    vae = tiny_vae(seed)
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=tiny_unet("base", seed), scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
                                               tokenizer_2=tok2, unet=tiny_unet("refiner", seed),
                                               scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
                                               requires_aesthetics_score=True,
                                               force_zeros_for_empty_prompt=False, add_watermarker=False)
    base.set_progress_bar_config(disable=True)
    refiner.set_progress_bar_config(disable=True)
    base.save_pretrained(str(root / "base"))
    refiner.save_pretrained(str(root / "refiner"))
    return root / "base", root / "refiner", base, refiner
