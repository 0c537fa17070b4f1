"""Single-file SDXL checkpoints (Stability's SGM / A1111 layout, e.g. sd_xl_base_1.0.safetensors).

One `.safetensors` file holds every model of a pipeline under SGM's prefixes:

    model.diffusion_model.*                      UNet (SGM's openaimodel naming)
    first_stage_model.*                          VAE (LDM naming, 1x1 conv attention)
    conditioner.embedders.0.transformer.*        CLIP-L, already in transformers' file naming (base only)
    conditioner.embedders.{1|0}.model.*          OpenCLIP bigG (base: 1, refiner: 0)

`split_checkpoint` renames every tensor to diffusers' names (UNet2DConditionModel,
AutoencoderKL) and transformers' *file* names (CLIPTextModel[WithProjection]),
keeping PyTorch layout (conv OIHW); the model loaders do the OIHW -> OHWI step.
All reshaping is slicing/transposing of lazy arrays, so nothing is read from
disk until the model weights are evaluated.

Single files carry no configs, so `infer_*_config` rebuilds diffusers /
transformers config.json dicts from tensor shapes. Rules for what shapes cannot
tell (documented at each function):
  * attention heads = width / head_dim with head_dim = 64 (true for all of SDXL);
  * GroupNorm groups = 32;
  * SDXL constants that no tensor records: VAE scaling_factor 0.13025 and
    force_upcast, sample sizes, the CLIP configs' legacy token ids;
  * the UNet's per-time-id embedding width = (add_embedding in-features - pooled
    width) / number of time ids, where the base has 6 time ids and the refiner 5.
Anything can be overridden per component (e.g. tiny test models whose heads are not
64 wide).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import ConfigError, WeightsError
from .spec import BASE, MODEL_PARTS, REFINER
from .weights import load_safetensors

# A checkpoint's kind is spec.BASE or spec.REFINER, the role it plays in the pipeline.
COMPONENTS = {BASE: MODEL_PARTS, REFINER: ("unet", "vae", "text_encoder_2")}
NUM_TIME_IDS = {BASE: 6, REFINER: 5}  # (h, w, top, left, h, w) vs (h, w, top, left, aesthetic score)

# diffusers' detection keys (single_file_utils.CHECKPOINT_KEY_NAMES)
KEY_XL_BASE = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
KEY_XL_REFINER = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
KEY_OPEN_CLIP_SDXL = "conditioner.embedders.1.model.positional_embedding"
KEY_OPEN_CLIP_SDXL_REFINER = "conditioner.embedders.0.model.text_projection"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = {BASE: "conditioner.embedders.1.model.", REFINER: "conditioner.embedders.0.model."}

# Keys that carry no model weights: buffers that are rebuilt at run time, unused parameters, EMA copies.
_DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights")
# Marker keys (empty tensors) that A1111 and ComfyUI read as the model's noise schedule: a `v_pred`
# key means v-prediction, a `ztsnr` key zero terminal SNR. What each sets in the scheduler config:
SCHEDULE_MARKERS = {
    "v_pred": {"prediction_type": "v_prediction"},
    # zero-SNR training (arXiv 2305.08891) samples from t = T-1, so its spacing is "trailing"
    "ztsnr": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
}
_IGNORABLE = re.compile(
    r"(^|\.)(logit_scale|position_ids|attn_mask)$"
    r"|^denoiser\.|^model_ema\."
    rf"|^({'|'.join(_DDPM_BUFFERS + tuple(SCHEDULE_MARKERS))})$"
)


def schedule_of(keys: Iterable[str]) -> dict:
    """The scheduler config settings a checkpoint's marker keys (`v_pred`, `ztsnr`) call for."""
    keys = set(keys)
    return {k: v for marker, settings in SCHEDULE_MARKERS.items() if marker in keys for k, v in settings.items()}


def is_ignorable(key: str) -> bool:
    """True for keys that hold no weights any SDXL model uses (see _IGNORABLE)."""
    return bool(_IGNORABLE.search(key))


# ----------------------------------------------------------------------------- detection


def detect_checkpoint(keys: Iterable[str]) -> str:
    """Return BASE ("base") or REFINER ("refiner") for an SGM single-file checkpoint's tensor names."""
    keys = set(keys)
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if any(k.startswith("cond_stage_model.") for k in keys) or (
        has_unet and not any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys)
    ):
        raise WeightsError(
            "this looks like a Stable Diffusion 1.x/2.x checkpoint (it has cond_stage_model.* text encoder "
            "keys or a UNet without SDXL's label_emb); mlx_sdxl needs an SDXL base or refiner"
        )
    if "edm_mean" in keys:
        raise WeightsError("this looks like a Playground v2.5 checkpoint (EDM, edm_mean/edm_std); "
                           "mlx_sdxl supports SDXL 1.0 base and refiner checkpoints")
    if KEY_XL_BASE in keys or KEY_OPEN_CLIP_SDXL in keys:
        return BASE
    if KEY_XL_REFINER in keys or KEY_OPEN_CLIP_SDXL_REFINER in keys:
        return REFINER
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    shown = ", ".join(prefixes[:10]) + (f", ... ({len(prefixes) - 10} more)" if len(prefixes) > 10 else "")
    raise WeightsError(
        "not an SDXL single-file checkpoint: expected SGM keys such as "
        f"{KEY_XL_BASE!r} or {KEY_OPEN_CLIP_SDXL!r} (base) or {KEY_XL_REFINER!r} or "
        f"{KEY_OPEN_CLIP_SDXL_REFINER!r} (refiner) next to {UNET_PREFIX}* and {VAE_PREFIX}*; "
        f"found key prefixes: {shown or 'none'}. "
        "(A diffusers folder is loaded as a folder, not as a single file.)"
    )


# ----------------------------------------------------------------------------- key mapping
#
# Each component has a rename function: SGM key (prefix removed) -> diffusers key,
# or None when the key is not understood (then it is reported as unused).
# Tensor changes are few and named: VAE attention 1x1 convs -> Linear,
# OpenCLIP fused qkv -> three slices, OpenCLIP text_projection -> transposed.

_RESNET_UNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_UNET_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_PARAM = r"\.(weight|bias)$"
_TRANSFORMER_PARAM = re.compile(
    r"^((norm|proj_in|proj_out)|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|ff\.net\.0\.proj|ff\.net\.2))" + _PARAM
)


def _rename_param(rest: str, names: Mapping[str, str]) -> Optional[str]:
    """`<module>.weight|bias` with <module> looked up in `names`; None if it is not there."""
    m = re.match(r"^(.*)" + _PARAM, rest)
    if m and m.group(1) in names:
        return f"{names[m.group(1)]}.{m.group(2)}"
    return None


def _transformer(rest: str) -> Optional[str]:
    return rest if _TRANSFORMER_PARAM.match(rest) else None


def _join(head: str, tail: Optional[str]) -> Optional[str]:
    return None if tail is None else f"{head}.{tail}"


def _unet_layers_per_block(keys: Iterable[str]) -> int:
    """SGM numbers input/output blocks flat; each level holds layers_per_block + 1 of them
    (resnets plus a down/upsampler slot). Levels = number of downsamplers (`.0.op`) + 1."""
    outs, ops = set(), set()
    for k in keys:
        if m := re.match(r"^output_blocks\.(\d+)\.", k):
            outs.add(int(m.group(1)))
        if m := re.match(r"^input_blocks\.(\d+)\.0\.op\.", k):
            ops.add(int(m.group(1)))
    levels = len(ops) + 1
    if not outs or len(outs) % levels:
        raise WeightsError(f"UNet weights are incomplete: {len(outs)} output blocks for {levels} levels "
                           f"(expected a multiple of {levels}, and at least one)")
    return len(outs) // levels - 1


def unet_key(k: str, layers_per_block: int) -> Optional[str]:
    """SGM UNet key (without `model.diffusion_model.`) -> diffusers UNet2DConditionModel key."""
    n = layers_per_block + 1
    m = re.match(r"^(.*)" + _PARAM, k)
    if m and m.group(1) in _UNET_FIXED:
        return f"{_UNET_FIXED[m.group(1)]}.{m.group(2)}"
    if m := re.match(r"^input_blocks\.(\d+)\.(\d+)\.(.*)$", k):
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if i == 0:
            return None
        level, layer = divmod(i - 1, n)
        if j == 0 and re.match(r"^op" + _PARAM, rest):
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        if j == 0:
            return _join(f"down_blocks.{level}.resnets.{layer}", _rename_param(rest, _RESNET_UNET))
        if j == 1:
            return _join(f"down_blocks.{level}.attentions.{layer}", _transformer(rest))
        return None
    if m := re.match(r"^middle_block\.([012])\.(.*)$", k):
        j, rest = int(m.group(1)), m.group(2)
        if j == 1:
            return _join("mid_block.attentions.0", _transformer(rest))
        return _join(f"mid_block.resnets.{j // 2}", _rename_param(rest, _RESNET_UNET))
    if m := re.match(r"^output_blocks\.(\d+)\.(\d+)\.(.*)$", k):
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, layer = divmod(i, n)
        if j in (1, 2) and re.match(r"^conv" + _PARAM, rest):  # `.2.conv` after attention, else `.1.conv`
            return f"up_blocks.{level}.upsamplers.0.conv.{rest[5:]}"
        if j == 0:
            return _join(f"up_blocks.{level}.resnets.{layer}", _rename_param(rest, _RESNET_UNET))
        if j == 1:
            return _join(f"up_blocks.{level}.attentions.{layer}", _transformer(rest))
    return None


_RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_key(k: str, num_levels: int) -> Optional[str]:
    """LDM VAE key (without `first_stage_model.`) -> diffusers AutoencoderKL key.
    The decoder's `up.{i}` runs from the lowest resolution upwards in reverse: up_blocks.{n-1-i}."""
    if re.match(r"^(quant_conv|post_quant_conv)" + _PARAM, k):
        return k
    m = re.match(r"^(encoder|decoder)\.(.*)$", k)
    if not m:
        return None
    side, rest = m.groups()
    if re.match(r"^(conv_in|conv_out)" + _PARAM, rest):
        return k
    if re.match(r"^norm_out" + _PARAM, rest):
        return f"{side}.conv_{rest}"
    if m := re.match(r"^mid\.block_([12])\.(.*)$", rest):
        return _join(f"{side}.mid_block.resnets.{int(m.group(1)) - 1}", _rename_param(m.group(2), _RESNET_VAE))
    if m := re.match(r"^mid\.attn_1\.(.*)$", rest):
        return _join(f"{side}.mid_block.attentions.0", _rename_param(m.group(1), _VAE_ATTN))
    if side == "encoder" and (m := re.match(r"^down\.(\d+)\.(.*)$", rest)):
        i, sub = int(m.group(1)), m.group(2)
        head = f"encoder.down_blocks.{i}"
    elif side == "decoder" and (m := re.match(r"^up\.(\d+)\.(.*)$", rest)):
        i, sub = num_levels - 1 - int(m.group(1)), m.group(2)
        head = f"decoder.up_blocks.{i}"
    else:
        return None
    if i < 0:
        return None
    if m := re.match(r"^block\.(\d+)\.(.*)$", sub):
        return _join(f"{head}.resnets.{m.group(1)}", _rename_param(m.group(2), _RESNET_VAE))
    sampler = "downsample" if side == "encoder" else "upsample"
    if re.match(rf"^{sampler}\.conv" + _PARAM, sub):
        return f"{head}.{sampler}rs.0.conv.{sub.rsplit('.', 1)[1]}"
    return None


_CLIP_FILE_KEY = re.compile(
    r"^text_model\.(embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias))$"
)


def clip_key(k: str) -> Optional[str]:
    """CLIP-L keys (without `conditioner.embedders.0.transformer.`) are transformers' file names already."""
    return k if _CLIP_FILE_KEY.match(k) else None


_OPEN_CLIP_FIXED = {"positional_embedding": "text_model.embeddings.position_embedding.weight",
                    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                    "ln_final.weight": "text_model.final_layer_norm.weight",
                    "ln_final.bias": "text_model.final_layer_norm.bias",
                    "text_projection": "text_projection.weight"}
_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
                    "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}


def open_clip_key(k: str) -> Optional[str]:
    """OpenCLIP key (without its prefix) -> CLIPTextModelWithProjection file key.
    The fused `attn.in_proj_{weight,bias}` keeps its name under `...self_attn.` until _split_qkv."""
    if k in _OPEN_CLIP_FIXED:
        return _OPEN_CLIP_FIXED[k]
    m = re.match(r"^transformer\.resblocks\.(\d+)\.(.*)$", k)
    if not m:
        return None
    head = f"text_model.encoder.layers.{m.group(1)}"
    if m.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias"):
        return f"{head}.self_attn.{m.group(2)[5:]}"  # split into q/k/v_proj by _split_qkv
    return _join(head, _rename_param(m.group(2), _OPEN_CLIP_LAYER))


def _map(sub: Mapping, rename: Callable[[str], Optional[str]], prefix: str, unused: List[str]) -> Dict:
    out = {}
    for k, v in sub.items():
        new = rename(k)
        if new is None:
            if not is_ignorable(prefix + k):
                unused.append(prefix + k)
        elif new in out:
            raise WeightsError(f"two checkpoint tensors map to the same weight {new!r} (second: {prefix + k})")
        else:
            out[new] = v
    return out


def _squeeze_vae_attention(vae: Dict) -> Dict:
    """SGM's VAE attention q/k/v/proj_out are 1x1 convs [C, C, 1, 1] (or Conv1d [C, C, 1]): take [:, :, 0, ...]."""
    for k in [k for k in vae if re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", k)]:
        w = vae[k]
        if w.ndim == 4:
            vae[k] = w[:, :, 0, 0]
        elif w.ndim == 3:
            vae[k] = w[:, :, 0]
    return vae


def _split_qkv(te: Dict, what: str) -> Dict:
    """Split OpenCLIP's fused in_proj rows [q; k; v] (each `hidden` rows); transpose text_projection.

    OpenCLIP applies the projection as x @ P with P stored (in, out); a Linear wants (out, in).
    """
    hidden = _shape(te, "text_model.embeddings.token_embedding.weight", what)[1]
    out = {}
    for k, v in te.items():
        if m := re.match(r"^(.*)\.in_proj_(weight|bias)$", k):
            if v.shape[0] != 3 * hidden:
                raise WeightsError(f"{what}: fused attention {k} has {v.shape[0]} rows, "
                                   f"expected 3 x hidden size = {3 * hidden}")
            for i, name in enumerate("qkv"):
                out[f"{m.group(1)}.{name}_proj.{m.group(2)}"] = v[i * hidden:(i + 1) * hidden]
        elif k == "text_projection.weight":
            if v.ndim != 2 or v.shape[0] != hidden:
                raise WeightsError(f"{what}: text_projection has shape {tuple(v.shape)}, "
                                   f"expected (hidden size {hidden}, projection width)")
            out[k] = v.T
        else:
            out[k] = v
    return out


def _take(weights: Mapping, prefix: str) -> Dict:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def split_checkpoint(weights: Mapping, kind: Optional[str] = None) -> Tuple[Dict[str, Dict], List[str]]:
    """Split an SGM single-file state dict into diffusers / transformers-file named components.

    Returns `(components, unused)`: components maps "unet", "vae", "text_encoder" (base only) and
    "text_encoder_2" to weight dicts (PyTorch layout, lazy views of the inputs); `unused` lists the
    checkpoint keys no rule understood, except the known ignorable ones (`is_ignorable`).
    A component missing from the file is a WeightsError.
    """
    kind = kind or detect_checkpoint(weights.keys())
    if kind not in COMPONENTS:
        raise WeightsError(f"unknown checkpoint kind {kind!r}; accepted: {', '.join(COMPONENTS)}")
    unused: List[str] = []
    claimed = [UNET_PREFIX, VAE_PREFIX, OPEN_CLIP_PREFIX[kind]] + ([CLIP_L_PREFIX] if kind == BASE else [])
    subs = {"unet": _take(weights, UNET_PREFIX), "vae": _take(weights, VAE_PREFIX),
            "text_encoder_2": _take(weights, OPEN_CLIP_PREFIX[kind])}
    if kind == BASE:
        subs["text_encoder"] = _take(weights, CLIP_L_PREFIX)
    labels = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_L_PREFIX,
              "text_encoder_2": OPEN_CLIP_PREFIX[kind]}
    missing = [f"{name} ({labels[name]}*)" for name in COMPONENTS[kind] if not subs[name]]
    if missing:
        raise WeightsError(f"the SDXL {kind} checkpoint lacks "
                           f"{', '.join(missing)}; a single file must hold every model of the pipeline")

    lpb = _unet_layers_per_block(subs["unet"])
    levels = len({int(m.group(1)) for k in subs["vae"] if (m := re.match(r"^decoder\.up\.(\d+)\.", k))})
    components = {
        "unet": _map(subs["unet"], lambda k: unet_key(k, lpb), UNET_PREFIX, unused),
        "vae": _squeeze_vae_attention(_map(subs["vae"], lambda k: vae_key(k, levels), VAE_PREFIX, unused)),
    }
    if kind == BASE:
        components["text_encoder"] = _map(subs["text_encoder"], clip_key, CLIP_L_PREFIX, unused)
    te2 = _map(subs["text_encoder_2"], open_clip_key, OPEN_CLIP_PREFIX[kind], unused)
    components["text_encoder_2"] = _split_qkv(te2, "text_encoder_2 (OpenCLIP bigG)")
    unused += [k for k in weights if not any(k.startswith(p) for p in claimed) and not is_ignorable(k)]
    return components, sorted(unused)


# ----------------------------------------------------------------------------- config inference


def _shape(w: Mapping, key: str, what: str) -> Tuple[int, ...]:
    if key not in w:
        raise WeightsError(f"{what} weights are incomplete: missing {key}")
    return tuple(w[key].shape)


def _indices(w: Mapping, pattern: str) -> List[int]:
    return sorted({int(m.group(1)) for k in w if (m := re.match(pattern, k))})


def _heads(width: int, head_dim: int, what: str) -> int:
    if width % head_dim:
        raise ConfigError(f"cannot infer the number of attention heads of {what}: width {width} is not a "
                          f"multiple of head_dim {head_dim}; pass head_dim or a config override")
    return width // head_dim


def _groups(channels: Iterable[int], groups: int, what: str) -> int:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ConfigError(f"{what}: channel counts {bad} are not divisible by norm_num_groups={groups} "
                          "(the SDXL value); pass norm_num_groups as a config override")
    return groups


# What no SDXL UNet tensor records: the values of the released SDXL configs.
_SDXL_UNET_FIXED = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "upcast_attention": None, "addition_embed_type": "text_time", "act_fn": "silu", "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "dual_cross_attention": False, "only_cross_attention": False,
    "resnet_time_scale_shift": "default", "class_embed_type": None, "num_class_embeds": None,
}


def _attention_layout(w: Mapping, levels: List[int]):
    """(attentions per down level, per up level, transformer_layers_per_block, mid depth).
    transformer_layers_per_block is one int when every attention agrees (refiner: 4), else a
    list with 1 for levels without attention (base: [1, 2, 10])."""
    def depth(prefix):
        return len(_indices(w, "^" + re.escape(prefix) + r"\.transformer_blocks\.(\d+)\."))

    attn_down = [bool(_indices(w, rf"^down_blocks\.{i}\.attentions\.(\d+)\.")) for i in levels]
    attn_up = [bool(_indices(w, rf"^up_blocks\.{i}\.attentions\.(\d+)\.")) for i in levels]
    depths = [depth(f"down_blocks.{i}.attentions.0") if a else 0 for i, a in zip(levels, attn_down)]
    mid_depth = depth("mid_block.attentions.0")
    used = {d for d in depths if d} | ({mid_depth} if mid_depth else set())
    if len(used) == 1:
        return attn_down, attn_up, used.pop(), mid_depth
    layers = [d or 1 for d in depths]
    if mid_depth and not depths[-1]:
        layers[-1] = mid_depth  # diffusers' mid block takes the last level's depth
    return attn_down, attn_up, layers, mid_depth


def _added_embedding(w: Mapping, pooled_dim: Optional[int], num_time_ids: Optional[int]):
    """(add_embedding in-features, time-id embedding width): (in − pooled) / time ids when both
    are known, else SDXL's 256."""
    add_in = _shape(w, "add_embedding.linear_1.weight", "UNet")[1]
    if pooled_dim is None or num_time_ids is None:
        return add_in, 256
    extra = add_in - pooled_dim
    if extra <= 0 or extra % num_time_ids:
        raise WeightsError(f"UNet: add_embedding takes {add_in} features, which is not the pooled text embedding "
                           f"({pooled_dim}) plus {num_time_ids} equal time-id embeddings")
    return add_in, extra // num_time_ids


def infer_unet_config(w: Mapping, *, pooled_dim: Optional[int] = None, num_time_ids: Optional[int] = None,
                      head_dim: int = 64, overrides: Optional[Mapping] = None) -> dict:
    """diffusers UNet2DConditionModel config.json dict from diffusers-named UNet weights.

    - block_out_channels: each level's first resnet width; layers_per_block: resnets per down level.
    - down/up block types: CrossAttn* where the level has attentions.
    - transformer_layers_per_block: transformer blocks per attention of each level. When every
      attention level and the mid block agree it is that int (refiner: 4); otherwise a list with
      1 for levels without attention (base: [1, 2, 10]).
    - attention_head_dim (diffusers' name for the head count): width // head_dim for every level.
    - addition_time_embed_dim: (add_embedding in-features - pooled_dim) / num_time_ids when both are
      given (load_single_file passes the text_encoder_2 projection width and 6 for the base, 5 for the
      refiner), else SDXL's 256.
    - norm_num_groups 32 (not recorded in weights).
    `overrides` replace inferred fields (and skip rules that could not decide them).
    """
    overrides = dict(overrides or {})
    what = "UNet"
    levels = _indices(w, r"^down_blocks\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise WeightsError(f"{what} weights are incomplete: down block levels found {levels}")
    channels = [_shape(w, f"down_blocks.{i}.resnets.0.conv1.weight", what)[0] for i in levels]
    lpb = len(_indices(w, r"^down_blocks\.0\.resnets\.(\d+)\."))
    attn_down, attn_up, layers, mid_depth = _attention_layout(w, levels)
    first = next((k for k in sorted(w) if k.endswith("attn2.to_k.weight")), None)
    if first is None and "cross_attention_dim" not in overrides:
        raise WeightsError(f"{what} has no cross-attention (attn2) weights; not an SDXL UNet")
    proj_in = next((k for k in sorted(w) if k.endswith(".proj_in.weight")), None)
    add_in, time_dim = _added_embedding(w, pooled_dim, num_time_ids)
    config = {
        **_SDXL_UNET_FIXED,
        "in_channels": _shape(w, "conv_in.weight", what)[1],
        "out_channels": _shape(w, "conv_out.weight", what)[0],
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_down],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn_up],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": lpb,
        "transformer_layers_per_block": layers,
        "cross_attention_dim": _shape(w, first, what)[1] if first else None,
        "use_linear_projection": bool(proj_in) and len(_shape(w, proj_in, what)) == 2,
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": add_in,
    }
    if "attention_head_dim" not in overrides:
        n = len(levels)  # up_blocks run from the deepest level: up_blocks[n-1-i] is level i
        has_attention = [attn_down[i] or attn_up[n - 1 - i] or (i == n - 1 and mid_depth > 0) for i in range(n)]
        config["attention_head_dim"] = [_heads(c, head_dim, f"UNet level {i}") if has_attention[i]
                                        else max(c // head_dim, 1) for i, c in enumerate(channels)]
    if "norm_num_groups" not in overrides:
        config["norm_num_groups"] = _groups(channels, 32, what)
    config.update(overrides)
    if config["in_channels"] not in (4, 9):
        raise WeightsError(f"{what} takes {config['in_channels']} input channels; mlx_sdxl supports SDXL UNets "
                           "with 4 (text and image to image) or 9 (inpainting: latents, mask, masked image)")
    return config


def infer_vae_config(w: Mapping, *, overrides: Optional[Mapping] = None) -> dict:
    """diffusers AutoencoderKL config.json dict from diffusers-named VAE weights.

    Shapes give the channels and layer counts; SDXL's scaling_factor 0.13025, force_upcast true
    (the original SDXL VAE overflows in fp16), sample_size 1024 and norm_num_groups 32 are constants.
    """
    overrides = dict(overrides or {})
    what = "VAE"
    levels = _indices(w, r"^encoder\.down_blocks\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise WeightsError(f"{what} weights are incomplete: encoder levels found {levels}")
    channels = [_shape(w, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", what)[0] for i in levels]
    latent = _shape(w, "decoder.conv_in.weight", what)[1]
    enc_out = _shape(w, "encoder.conv_out.weight", what)[0]
    if enc_out != 2 * latent:
        raise WeightsError(f"{what}: encoder.conv_out has {enc_out} output channels, expected 2 x "
                           f"latent channels ({2 * latent}: mean and log-variance)")
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(w, "encoder.conv_in.weight", what)[1],
        "out_channels": _shape(w, "decoder.conv_out.weight", what)[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(w, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")),
        "act_fn": "silu",
        "latent_channels": latent,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in w),
        "use_quant_conv": "quant_conv.weight" in w,
        "use_post_quant_conv": "post_quant_conv.weight" in w,
    }
    if "norm_num_groups" not in overrides:
        config["norm_num_groups"] = _groups(channels, 32, what)
    config.update(overrides)
    return config


def infer_clip_config(w: Mapping, kind: str = "clip_l", *, head_dim: int = 64,
                      overrides: Optional[Mapping] = None) -> dict:
    """transformers CLIPTextConfig config.json dict from CLIP text weights in transformers' file naming.

    kind "clip_l" (OpenAI CLIP ViT-L/14 text tower: quick_gelu, no projection weights, projection_dim =
    hidden) or "open_clip" (OpenCLIP bigG: gelu, text_projection). Heads = hidden // head_dim.
    Token ids are the legacy placeholders of the hub configs (bos 0, eos 2, pad 1), which make
    transformers pool at argmax(input_ids), i.e. the first end-of-text token.
    """
    if kind not in ("clip_l", "open_clip"):
        raise ConfigError(f"unknown CLIP kind {kind!r}; accepted: clip_l, open_clip")
    overrides = dict(overrides or {})
    what = "CLIP-L text encoder" if kind == "clip_l" else "OpenCLIP bigG text encoder"
    vocab, hidden = _shape(w, "text_model.embeddings.token_embedding.weight", what)
    layers = _indices(w, r"^text_model\.encoder\.layers\.(\d+)\.")
    if not layers or layers != list(range(len(layers))):
        raise WeightsError(f"{what} weights are incomplete: layers found {layers}")
    projection = kind == "open_clip"
    if projection:
        proj_out, proj_in = _shape(w, "text_projection.weight", what)
        if proj_in != hidden:
            raise WeightsError(f"{what}: text_projection.weight is {(proj_out, proj_in)}, expected (out, {hidden})")
    config = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(w, "text_model.encoder.layers.0.mlp.fc1.weight", what)[0],
        "num_hidden_layers": len(layers),
        "max_position_embeddings": _shape(w, "text_model.embeddings.position_embedding.weight", what)[0],
        "hidden_act": "gelu" if projection else "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": proj_out if projection else hidden,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    if "num_attention_heads" not in overrides:
        config["num_attention_heads"] = _heads(hidden, head_dim, what)
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------- loading


@dataclass
class SingleFileCheckpoint:
    """A split single-file checkpoint: `components[name] = (config dict, weights)`.

    `kind` is BASE ("base") or REFINER ("refiner"); weights use diffusers / transformers-file names in
    PyTorch layout and are lazy. `unused` lists checkpoint keys that were not understood (the
    known-ignorable buffers excluded); callers should warn about them.
    """

    kind: str
    components: Dict[str, Tuple[dict, Dict]]
    unused: List[str] = field(default_factory=list)
    path: Optional[Path] = None
    schedule: Dict[str, object] = field(default_factory=dict)  # scheduler config from `v_pred` / `ztsnr`

    @property
    def role(self) -> str:
        """The pipeline role, spec.BASE or spec.REFINER: the same as `kind`."""
        return self.kind


def infer_configs(components: Mapping[str, Mapping], kind: str, *, head_dim: int = 64,
                  overrides: Optional[Mapping[str, Mapping]] = None) -> Dict[str, dict]:
    """Config dicts for every component of a split checkpoint (see the infer_* functions)."""
    overrides = overrides or {}
    unknown = set(overrides) - set(COMPONENTS[BASE])
    if unknown:
        raise ConfigError(f"config overrides for unknown components {sorted(unknown)}; "
                          f"accepted: {', '.join(COMPONENTS[BASE])}")
    configs = {}
    if "text_encoder" in components:
        configs["text_encoder"] = infer_clip_config(components["text_encoder"], "clip_l", head_dim=head_dim,
                                                    overrides=overrides.get("text_encoder"))
    configs["text_encoder_2"] = infer_clip_config(components["text_encoder_2"], "open_clip", head_dim=head_dim,
                                                  overrides=overrides.get("text_encoder_2"))
    configs["unet"] = infer_unet_config(components["unet"], pooled_dim=configs["text_encoder_2"]["projection_dim"],
                                        num_time_ids=NUM_TIME_IDS[kind], head_dim=head_dim,
                                        overrides=overrides.get("unet"))
    configs["vae"] = infer_vae_config(components["vae"], overrides=overrides.get("vae"))
    return configs


def load_single_file(path, *, head_dim: int = 64,
                     overrides: Optional[Mapping[str, Mapping]] = None) -> SingleFileCheckpoint:
    """Open an SGM single-file SDXL checkpoint lazily: detect base/refiner, split, infer configs.

    `head_dim` (64 for SDXL) sets the head counts of every attention; `overrides` maps a component
    name to config fields that replace the inferred ones. Tensors stay memory-mapped until used.
    """
    path = Path(path)
    weights = load_safetensors(path)
    try:
        kind = detect_checkpoint(weights.keys())
        components, unused = split_checkpoint(weights, kind)
        configs = infer_configs(components, kind, head_dim=head_dim, overrides=overrides)
    except (WeightsError, ConfigError) as e:
        raise type(e)(f"{path}: {e}") from None
    return SingleFileCheckpoint(kind, {name: (configs[name], components[name]) for name in components},
                                unused, path, schedule_of(weights.keys()))


def ldm_vae_to_diffusers(weights: Mapping) -> Dict:
    """A stand-alone VAE file in the original (LDM) naming, e.g. `sdxl_vae.safetensors`,
    without the `first_stage_model.` prefix → diffusers names (PyTorch layout)."""
    unused: List[str] = []
    levels = len({int(m.group(1)) for k in weights if (m := re.match(r"^decoder\.up\.(\d+)\.", k))})
    vae = _squeeze_vae_attention(_map(weights, lambda k: vae_key(k, levels), "", unused))
    unused = [k for k in unused if not is_ignorable(k)]
    if unused:
        raise WeightsError(f"not an SDXL VAE file: {len(unused)} keys not understood, e.g. {', '.join(unused[:5])}")
    return vae
