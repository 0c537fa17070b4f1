"""Test helper: random LoRA / LyCORIS files for diffusers models, written in the real formats.

    kohya_file(...)     lora_unet_<SGM or diffusers name>.lora_down.weight / .lora_up.weight / .alpha,
                        lora_te1_ / lora_te2_ text-encoder layers (LoCon: 4-D conv factors)
    peft_file(...)      diffusers' save_lora_weights output: unet.<module>.lora_A.weight / lora_B.weight,
                        text_encoder[_2]. ..., alphas in `lora_adapter_metadata`
    old_diffusers_file  unet.<attention>.processor.to_q_lora.down.weight / .up.weight
    lycoris_file(...)   LoHa / LoKr modules made by the lycoris-lora package, kohya names

SGM names come from tests/sgm_inverse.py (written independently of mlx_sdxl.single_file).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
from safetensors.torch import save_file

from sgm_inverse import unet_to_sgm

ATTENTION = re.compile(r"\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$")
CONVS = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)|(down|up)samplers\.0\.conv|^conv_in|^conv_out)$")
RESNET_LINEAR = re.compile(r"(resnets\.\d+\.time_emb_proj|time_embedding\.linear_[12]|add_embedding\.linear_[12])$")
CLIP_LAYERS = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def layers(model, pattern: re.Pattern, kinds=(torch.nn.Linear, torch.nn.Conv2d)) -> Dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if pattern.search(n) and isinstance(m, kinds)}


QK = re.compile(r"(to_q|to_k|q_proj|k_proj)$")


def factors(module, rank: int, gen: torch.Generator, std: float, tucker: bool = False, name: str = ""):
    """Random (down, up[, mid]) for a Linear or Conv2d in PyTorch layout. Query and key projections
    get a third of `std`: larger changes there saturate the attention and make the images chaotic
    (tiny float differences then grow past any parity bound)."""
    std = std / 3 if QK.search(name) else std
    w = module.weight
    o, i = w.shape[:2]
    k = tuple(w.shape[2:])
    if tucker and k and k != (1, 1):
        down = torch.randn(rank, i, 1, 1, generator=gen) * std
        mid = torch.randn(rank, rank, *k, generator=gen) * std
        return down, torch.randn(o, rank, 1, 1, generator=gen) * std, mid
    down = torch.randn(rank, i, *k, generator=gen) * std
    up = torch.randn(o, rank, *((1, 1) if k else ()), generator=gen) * std
    return down, up, None


def _sgm_names(unet, unet_modules: Iterable[str]) -> Dict[str, str]:
    keys = list(unet.state_dict())  # all of them: unet_to_sgm counts layers per block from the resnets
    sgm = unet_to_sgm({k: torch.zeros(1) for k in keys})  # keeps the input's order
    names = {k: new[len("model.diffusion_model."):] for k, new in zip(keys, sgm)}
    return {m: names[m + ".weight"][:-len(".weight")] for m in unet_modules}


def kohya_names(pipe, unet_pattern=ATTENTION, sgm: bool = True, text_encoders: bool = True) -> Dict[str, tuple]:
    """{kohya layer name: (module, part)} for the layers the patterns pick."""
    unet = layers(pipe.unet, unet_pattern)
    names = _sgm_names(pipe.unet, list(unet)) if sgm else {m: m for m in unet}
    out = {"lora_unet_" + names[m].replace(".", "_"): (mod, "unet") for m, mod in unet.items()}
    if text_encoders:
        for prefix, te in (("lora_te1_", getattr(pipe, "text_encoder", None)), ("lora_te2_", pipe.text_encoder_2)):
            if te is None:
                continue
            for n, mod in layers(te, CLIP_LAYERS).items():
                n = n if n.startswith("text_model.") else "text_model." + n
                out[prefix + n.replace(".", "_")] = (mod, prefix)
    return out


def kohya_file(path, pipe, *, seed=0, rank=4, alpha: Optional[float] = 2.0, std=0.3, sgm=True,
               unet_pattern=ATTENTION, text_encoders=True, tucker=False, dtype=torch.float32) -> Path:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (module, _) in kohya_names(pipe, unet_pattern, sgm, text_encoders).items():
        down, up, mid = factors(module, rank, gen, std, tucker, name)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if mid is not None:
            sd[f"{name}.lora_mid.weight"] = mid
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path), metadata={"ss_network_module": "networks.lora"})
    return Path(path)


def _peft_layers(model, pattern, rank, gen, std, prefix_text_model=False):
    out = {}
    for n, mod in layers(model, pattern).items():
        down, up, _ = factors(mod, rank, gen, std, name=n)
        if prefix_text_model and not n.startswith("text_model."):
            n = "text_model." + n
        out[f"{n}.lora_A.weight"], out[f"{n}.lora_B.weight"] = down, up
    return out


def peft_file(folder, pipe, *, seed=0, rank=4, alpha=8, std=0.3, unet_pattern=ATTENTION, text_encoders=True) -> Path:
    """diffusers' own writer, with lora_alpha recorded in the file's adapter metadata."""
    from diffusers import StableDiffusionXLPipeline

    gen = torch.Generator().manual_seed(seed)
    unet = _peft_layers(pipe.unet, unet_pattern, rank, gen, std)
    meta = {"r": rank, "lora_alpha": alpha, "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in unet})}
    kw = dict(unet_lora_layers=unet, unet_lora_adapter_metadata=meta)
    if text_encoders:
        te1 = _peft_layers(pipe.text_encoder, CLIP_LAYERS, rank, gen, std, True)
        te2 = _peft_layers(pipe.text_encoder_2, CLIP_LAYERS, rank, gen, std, True)
        te_meta = {"r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj",
                                                                       "fc1", "fc2"]}
        kw.update(text_encoder_lora_layers=te1, text_encoder_2_lora_layers=te2,
                  text_encoder_lora_adapter_metadata=te_meta, text_encoder_2_lora_adapter_metadata=te_meta)
    Path(folder).mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(str(folder), **kw)
    return Path(folder) / "pytorch_lora_weights.safetensors"


def old_diffusers_file(path, pipe, *, seed=0, rank=4, std=0.3) -> Path:
    """The attention-processor layout of diffusers < 0.21 (scale 1: no alphas)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for n, mod in layers(pipe.unet, re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")).items():
        attn, proj = re.match(r"(.+)\.(to_q|to_k|to_v|to_out)(\.0)?$", n).group(1, 2)
        down, up, _ = factors(mod, rank, gen, std, name=n)
        sd[f"unet.{attn}.processor.{proj}_lora.down.weight"] = down
        sd[f"unet.{attn}.processor.{proj}_lora.up.weight"] = up
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return Path(path)


def lycoris_file(path, pipe, algo: str, *, seed=0, dim=4, alpha=2.0, std=0.3, text_encoders=True,
                 unet_pattern=None, **kwargs) -> Path:
    """LoHa ("loha") or LoKr ("lokr") modules made by lycoris-lora on the UNet's attention, FF and
    conv layers (and the text encoders), with random weights, saved under kohya names."""
    from lycoris import create_lycoris
    from lycoris.wrapper import LycorisNetwork

    torch.manual_seed(seed)
    sd = {}
    models = [("lora_unet", pipe.unet, unet_pattern or re.compile(ATTENTION.pattern + "|" + CONVS.pattern))]
    if text_encoders:
        models += [("lora_te1", pipe.text_encoder, CLIP_LAYERS), ("lora_te2", pipe.text_encoder_2, CLIP_LAYERS)]
    for prefix, model, pattern in models:
        names = [n for n in layers(model, pattern)]
        LycorisNetwork.apply_preset({"lora_prefix": prefix, "target_name": names, "target_module": [],
                                     "use_fnmatch": False})
        try:
            net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, conv_dim=dim, conv_alpha=alpha,
                                 algo=algo, **kwargs)
        finally:
            LycorisNetwork.apply_preset({"lora_prefix": "lycoris", "target_name": [], "target_module": [
                "Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"]})
        for module in net.loras:
            for k, v in module.state_dict().items():
                if k == "alpha" or k.startswith(("hada_", "lokr_")):
                    sd[f"{module.lora_name}.{k}"] = v if k == "alpha" else torch.randn(v.shape) * std
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return Path(path)


def lycoris_deltas(path, pipe) -> Dict[str, torch.Tensor]:
    """{(prefix, module name): ΔW} as lycoris-lora's modules compute it for the file (multiplier 1)."""
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork
    from safetensors.torch import load_file

    sd = load_file(str(path))
    out = {}
    for prefix, model in (("lora_unet", pipe.unet), ("lora_te1", pipe.text_encoder),
                          ("lora_te2", pipe.text_encoder_2)):
        part = {k: v for k, v in sd.items() if k.startswith(prefix + "_")}
        if not part:
            continue
        LycorisNetwork.LORA_PREFIX = prefix
        try:
            net, _ = create_lycoris_from_weights(1.0, None, model, weights_sd=part)
        finally:
            LycorisNetwork.LORA_PREFIX = "lycoris"
        names = {f"{prefix}_{n}".replace(".", "_"): n for n, _ in model.named_modules()}
        for lora in net.loras:
            module = names[lora.lora_name]
            shape = dict(model.named_modules())[module].weight.shape
            # get_weight is ΔW (alpha/r included) as the module's forward adds it; lycoris 4.1.3's
            # get_diff_weight multiplies by alpha/r a second time, which its forward never does
            out[(prefix, module)] = lora.get_weight(shape).detach().float()
    return out


def merge_deltas(pipe, deltas, scale: float = 1.0) -> List[str]:
    """Add lycoris deltas into a diffusers pipeline's weights in place; returns the modules changed."""
    models = {"lora_unet": pipe.unet, "lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2}
    with torch.no_grad():
        for (prefix, module), delta in deltas.items():
            dict(models[prefix].named_modules())[module].weight.add_(scale * delta.reshape(
                dict(models[prefix].named_modules())[module].weight.shape))
    return [m for _, m in deltas]
