"""Test helper: write SGM single-file checkpoints (sd_xl_*.safetensors layout) from diffusers models.

This is the inverse of mlx_sdxl.single_file, written independently from it (from SGM's module
layout, facts §6.2-6.3) so that a round trip checks the forward mapping:

  UNet   down_blocks/mid_block/up_blocks -> input_blocks/middle_block/output_blocks (flat numbering,
         layers_per_block + 1 blocks per level), resnet parts renamed, upsampler at `.2.conv`
         after attention levels and `.1.conv` otherwise;
  VAE    decoder up_blocks.i -> up.{n-1-i}, mid attention Linear [C, C] -> 1x1 conv [C, C, 1, 1];
  CLIP-L transformers file names under `conditioner.embedders.0.transformer.`;
  bigG   q/k/v fused into in_proj, text_projection stored transposed (in, out), OpenCLIP names.

Inputs are torch state dicts: diffusers names for the UNet/VAE, transformers file names for the
text encoders (`text_model.` is added to keys that lack it, as transformers >= 5.6 drops it in memory).
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _split_param(key: str):
    module, param = key.rsplit(".", 1)
    return module, param


def unet_to_sgm(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    lpb = len({int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))})
    per_level = lpb + 1
    attn_up = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for k, v in sd.items():
        module, param = _split_param(k)
        if module in UNET_FIXED:
            new = f"{UNET_FIXED[module]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{UNET_RESNET[m[3]]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
            new = f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"input_blocks.{1 + int(m[1]) * per_level + lpb}.0.op.{param}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", module):
            new = f"middle_block.{2 * int(m[1])}.{UNET_RESNET[m[2]]}.{param}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
            new = f"middle_block.1.{m[1]}.{param}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{UNET_RESNET[m[3]]}.{param}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
            new = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}.{param}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            slot = 2 if int(m[1]) in attn_up else 1
            new = f"output_blocks.{int(m[1]) * per_level + lpb}.{slot}.conv.{param}"
        else:
            raise KeyError(f"sgm_inverse: no SGM name for UNet key {k}")
        out["model.diffusion_model." + new] = v
    return out


def vae_to_sgm(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    levels = len({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    out = {}
    for k, v in sd.items():
        module, param = _split_param(k)
        module = module.replace("conv_shortcut", "nin_shortcut")
        if module in ("quant_conv", "post_quant_conv") or re.fullmatch(r"(encoder|decoder)\.conv_(in|out)", module):
            new = module
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module):
            new = f"{m[1]}.norm_out"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)", module):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}"
            if param == "weight" and m[2] != "group_norm":
                v = v[:, :, None, None]  # SGM's attention projections are 1x1 convs
        else:
            raise KeyError(f"sgm_inverse: no SGM name for VAE key {k}")
        out[f"first_stage_model.{new}.{param}"] = v
    return out


def _file_names(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers in-memory names -> file names (`text_model.` prefix everywhere but text_projection)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def clip_l_to_sgm(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {"conditioner.embedders.0.transformer." + k: v for k, v in _file_names(sd).items()}


def open_clip_to_sgm(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    sd = _file_names(sd)
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()  # OpenCLIP computes x @ P with P (in, out)
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            if m[2] == "q":
                parts = [sd[k.replace("q_proj", f"{n}_proj")] for n in "qkv"]
                out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(parts, 0)
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
            out[f"transformer.resblocks.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = v
        else:
            raise KeyError(f"sgm_inverse: no OpenCLIP name for key {k}")
    return {prefix + k: v for k, v in out.items()}


def sgm_state_dict(unet_sd, vae_sd, te1_sd: Optional[dict], te2_sd, extra: Optional[dict] = None) -> dict:
    """The SGM-named state dict of a base (te1_sd given) or refiner (te1_sd None) pipeline."""
    out = {**unet_to_sgm(unet_sd), **vae_to_sgm(vae_sd)}
    if te1_sd is not None:
        out.update(clip_l_to_sgm(te1_sd))
        out.update(open_clip_to_sgm(te2_sd, "conditioner.embedders.1.model."))
    else:
        out.update(open_clip_to_sgm(te2_sd, "conditioner.embedders.0.model."))
    out.update(extra or {})
    return out


def write_sgm_checkpoint(path, unet_sd, vae_sd, te1_sd_or_None, te2_sd, extra: Optional[dict] = None) -> dict:
    """Write a single-file SGM checkpoint (.safetensors); returns the SGM state dict written."""
    sd = sgm_state_dict(unet_sd, vae_sd, te1_sd_or_None, te2_sd, extra)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    return sd
