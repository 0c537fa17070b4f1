"""The SDXL ControlNet, the UNet's residual inputs and the per-step control residuals,
against diffusers on tiny random models saved in the real format."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from mlx.utils import tree_flatten
from PIL import Image

import mlx_sdxl
from mlx_sdxl.control import Control, canny, control_image, control_residuals, prepare_controls
from mlx_sdxl.errors import ConfigError, InputError, WeightsError
from mlx_sdxl.models.controlnet import (SDXL_CONTROLNET_CONFIG, ControlNetConfig, ControlNetModel,
                                        check_controlnet_fits, guess_mode_scales, load_controlnet)
from mlx_sdxl.models.unet import SDXL_BASE_CONFIG, UNetConfig, load_unet, skip_shapes
from mlx_sdxl.quantize import QConv2d, QLinear, quantize_model

torch.set_grad_enabled(False)

POOLED, TIME_DIM, CONTEXT = 16, 8, 32
UNET = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2, transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4],
    cross_attention_dim=CONTEXT, norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM, sample_size=16,
)
COND_WIDTHS = (8, 16, 16, 32)  # the conditioning embedding's widths ((16, 32, 96, 256) at full size)


def randomize(model, seed):
    """Every parameter random and non-zero (diffusers zero-inits the zero convs), norms around 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()


def torch_controlnet(unet, seed, **kwargs):
    net = TorchControlNet.from_unet(unet, conditioning_embedding_out_channels=COND_WIDTHS,
                                    load_weights_from_unet=False, **kwargs)
    return randomize(net, seed)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny torch UNet and two ControlNets made from it, each saved in diffusers layout."""
    root = tmp_path_factory.mktemp("control")
    unet = randomize(TorchUNet(**UNET), 0)
    nets = [torch_controlnet(unet, 1), torch_controlnet(unet, 2)]
    unet.save_pretrained(root / "unet")
    for i, net in enumerate(nets):
        net.save_pretrained(root / f"cn{i}")
    return dict(unet=unet, nets=nets, unet_dir=root / "unet", dirs=[root / f"cn{i}" for i in range(2)])


def inputs(batch, h, w, seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, h, w, generator=g),
                context=torch.randn(batch, 7, CONTEXT, generator=g),
                text_embeds=torch.randn(batch, POOLED, generator=g),
                time_ids=torch.tensor([[64.0, 48.0, 3.0, 5.0, 64.0, 48.0]] * batch) + torch.arange(batch)[:, None],
                image=torch.rand(batch, 3, 8 * h, 8 * w, generator=g))


def nhwc(t):
    return mx.array(t.permute(0, 2, 3, 1).numpy() if t.ndim == 4 else t.numpy())


def to_np(a):
    return np.array(a.astype(mx.float32))


def torch_nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def rel_l2(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def run_torch(net, inp, t, scale=1.0, guess_mode=False):
    added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    down, mid = net(inp["sample"], t, inp["context"], inp["image"], conditioning_scale=scale, guess_mode=guess_mode,
                    added_cond_kwargs=added, return_dict=False)
    return [torch_nhwc(d) for d in down], torch_nhwc(mid)


def run_ours(net, inp, t, scale=1.0, guess_mode=False):
    down, mid = net(nhwc(inp["sample"]), t, nhwc(inp["context"]), nhwc(inp["image"]), scale,
                    text_embeds=nhwc(inp["text_embeds"]), time_ids=nhwc(inp["time_ids"]), guess_mode=guess_mode)
    return [to_np(d) for d in down], to_np(mid)


def worst(ours, ref):
    """The largest relative L2 error over the down residuals and the mid residual."""
    (down, mid), (ref_down, ref_mid) = ours, ref
    assert len(down) == len(ref_down) == 9
    return max([rel_l2(a, b) for a, b in zip(down, ref_down)] + [rel_l2(mid, ref_mid)])


@pytest.mark.parametrize("h,w,batch,guess", [(16, 16, 2, False), (16, 16, 2, True), (12, 8, 1, False),
                                              (13, 9, 1, True)])
def test_controlnet_matches_diffusers(models, h, w, batch, guess):
    net = load_controlnet(models["dirs"][0])
    assert net.dtype == mx.float32
    inp = inputs(batch, h, w)
    ref = run_torch(models["nets"][0], inp, torch.tensor(500.0), 0.8, guess)
    ours = run_ours(net, inp, 500.0, 0.8, guess)
    assert worst(ours, ref) <= 1e-4
    assert ours[0][0].shape == (batch, h, w, 32) and ours[1].shape[1:3] == ((h + 3) // 4, (w + 3) // 4)


def test_guess_mode_scales_rise_from_a_tenth_to_one(models):
    assert guess_mode_scales(9) == pytest.approx(torch.logspace(-1, 0, 10).tolist(), rel=1e-6)
    net = load_controlnet(models["dirs"][0])
    inp = inputs(1, 8, 8)
    plain, guess = run_ours(net, inp, 10.0), run_ours(net, inp, 10.0, guess_mode=True)
    assert np.allclose(guess[0][0], 0.1 * plain[0][0], rtol=1e-5, atol=1e-7)
    assert np.allclose(guess[1], plain[1], rtol=1e-6)


def test_compiled_controlnet_and_bgr_order(models, tmp_path):
    net = load_controlnet(models["dirs"][1])
    inp = inputs(2, 8, 8, seed=4)
    ref = run_torch(models["nets"][1], inp, torch.tensor([900.0, 20.0]), 0.5)
    compiled = net.compiled()
    for _ in range(2):
        down, mid = compiled(nhwc(inp["sample"]), mx.array([900.0, 20.0]), nhwc(inp["context"]), nhwc(inp["image"]),
                             0.5, text_embeds=nhwc(inp["text_embeds"]), time_ids=nhwc(inp["time_ids"]))
        assert worst(([to_np(d) for d in down], to_np(mid)), ref) <= 1e-4
    config = json.loads((models["dirs"][1] / "config.json").read_text())
    bgr = ControlNetConfig.from_dict({**config, "controlnet_conditioning_channel_order": "bgr"})
    flipped = ControlNetModel(bgr)
    flipped.update(net.parameters())
    down, mid = flipped(nhwc(inp["sample"]), mx.array([900.0, 20.0]), nhwc(inp["context"]),
                        nhwc(inp["image"].flip(1)), 0.5, text_embeds=nhwc(inp["text_embeds"]),
                        time_ids=nhwc(inp["time_ids"]))
    assert worst(([to_np(d) for d in down], to_np(mid)), ref) <= 1e-4


def unet_residual_inputs(models, inp, t):
    """The torch ControlNet's residuals for `inp` (torch NCHW and ours NHWC)."""
    added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    down, mid = models["nets"][0](inp["sample"], t, inp["context"], inp["image"], conditioning_scale=1.0,
                                  added_cond_kwargs=added, return_dict=False)
    return (down, mid), ([nhwc(d) for d in down], nhwc(mid))


def test_unet_with_residuals_matches_diffusers(models):
    inp = inputs(2, 12, 8, seed=5)
    added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    (t_down, t_mid), (down, mid) = unet_residual_inputs(models, inp, 400.0)
    ref = torch_nhwc(models["unet"](inp["sample"], 400.0, inp["context"], added_cond_kwargs=added,
                                    down_block_additional_residuals=t_down, mid_block_additional_residual=t_mid).sample)
    plain_ref = torch_nhwc(models["unet"](inp["sample"], 400.0, inp["context"], added_cond_kwargs=added).sample)
    unet = load_unet(models["unet_dir"])
    args = (nhwc(inp["sample"]), 400.0, nhwc(inp["context"]), nhwc(inp["text_embeds"]), nhwc(inp["time_ids"]))
    for forward in (unet, unet.compiled()):
        out = to_np(forward(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid))
        assert rel_l2(out, ref) <= 1e-4
        plain = to_np(forward(*args))
        assert rel_l2(plain, plain_ref) <= 1e-4
        assert rel_l2(out, plain) > 0.05  # the residuals change the prediction visibly


def test_controlnet_then_unet_end_to_end(models):
    """Our ControlNet feeding our UNet equals diffusers' ControlNet feeding diffusers' UNet."""
    inp = inputs(1, 16, 16, seed=6)
    added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    (t_down, t_mid), _ = unet_residual_inputs(models, inp, 700.0)
    ref = torch_nhwc(models["unet"](inp["sample"], 700.0, inp["context"], added_cond_kwargs=added,
                                    down_block_additional_residuals=t_down, mid_block_additional_residual=t_mid).sample)
    down, mid = load_controlnet(models["dirs"][0])(nhwc(inp["sample"]), 700.0, nhwc(inp["context"]),
                                                   nhwc(inp["image"]), text_embeds=nhwc(inp["text_embeds"]),
                                                   time_ids=nhwc(inp["time_ids"]))
    out = load_unet(models["unet_dir"])(nhwc(inp["sample"]), 700.0, nhwc(inp["context"]), nhwc(inp["text_embeds"]),
                                        nhwc(inp["time_ids"]), down_block_additional_residuals=down,
                                        mid_block_additional_residual=mid)
    assert rel_l2(to_np(out), ref) <= 1e-4


def test_unet_refuses_residuals_that_do_not_fit(models):
    unet = load_unet(models["unet_dir"])
    cfg = unet.config
    down, mid = skip_shapes(cfg, 1, 13, 9)
    assert down[-1] == (1, 4, 3, 64) and mid == (1, 4, 3, 64) and len(down) == 9
    x, ctx, pooled, ids = mx.zeros((1, 13, 9, 4)), mx.zeros((1, 7, CONTEXT)), mx.zeros((1, POOLED)), mx.zeros((1, 6))
    good = [mx.zeros(s) for s in down]
    for forward in (unet, unet.compiled()):
        call = lambda d, m: forward(x, 1.0, ctx, pooled, ids, down_block_additional_residuals=d,  # noqa: E731
                                    mid_block_additional_residual=m)
        assert call(good, mx.zeros(mid)).shape == (1, 13, 9, 4)
        with pytest.raises(InputError, match="together"):
            call(good, None)
        with pytest.raises(InputError, match="8 entries; this UNet has 9"):
            call(good[:-1], mx.zeros(mid))
        with pytest.raises(InputError, match=r"down_block_additional_residuals\[3\] has shape"):
            call(good[:3] + [mx.zeros((1, 13, 9, 32))] + good[4:], mx.zeros(mid))


# -- control_residuals -------------------------------------------------------------------------

def pil_control(seed, size=(100, 70)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_control_image_is_prepared_as_diffusers_does():
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    rgba = pil_control(7).convert("RGBA")
    grey = pil_control(8, (64, 64)).convert("L")
    for image in (pil_control(6), rgba, grey):
        ref = processor.preprocess(image, height=64, width=96)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(control_image(image, 96, 64), ref)
    floats = np.random.default_rng(9).random((50, 30, 3)).astype(np.float32)
    ref = processor.preprocess(floats[None], height=64, width=48)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(control_image(floats, 48, 64), ref)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        control_image(floats * 2, 48, 64)


def step_inputs(batch, guided, seed=10):
    inp = inputs(2 * batch if guided else batch, 8, 12, seed)
    if guided:  # both halves of a guided batch hold the same latents
        inp["sample"][:batch] = inp["sample"][batch:]
    return inp


def torch_multi(models, inp, images, scales, guess_mode):
    """diffusers' pipeline: MultiControlNetModel with the conditioning scales × controlnet_keep."""
    added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    down, mid = MultiControlNetModel(models["nets"])(inp["sample"], 300.0, inp["context"], images, scales,
                                                     added_cond_kwargs=added, guess_mode=guess_mode, return_dict=False)
    return [torch_nhwc(d) for d in down], torch_nhwc(mid)


def diffusers_keep(i, n, start, end):
    return 1.0 - float(i / n < start or (i + 1) / n > end)


def test_two_controlnets_with_scales_and_windows_match_diffusers(models):
    nets = {"edges": load_controlnet(models["dirs"][0]), "depth": load_controlnet(models["dirs"][1])}
    controls = [Control("edges", pil_control(11), 0.7), Control("depth", pil_control(12), 0.4, start=0.2, end=0.7)]
    batch, n = 1, 10
    prepared = prepare_controls(controls, nets, 96, 64, batch, guided=True)
    assert prepared[0].image.shape == (2, 64, 96, 3)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    images = [torch.cat([processor.preprocess(c.image, height=64, width=96)] * 2) for c in controls]
    inp = step_inputs(batch, True)
    args = (nhwc(inp["sample"]), 300.0, nhwc(inp["context"]), nhwc(inp["text_embeds"]), nhwc(inp["time_ids"]))
    for step in (0, 2, 6, 7, 9):  # depth acts from step 2 to step 6 of 10
        keep = [diffusers_keep(step, n, 0.0, 1.0), diffusers_keep(step, n, 0.2, 0.7)]
        assert [c.active(step, n) for c in controls] == [bool(k) for k in keep]
        ref = torch_multi(models, inp, images, [0.7 * keep[0], 0.4 * keep[1]], False)
        down, mid = control_residuals(prepared, nets, *args, step, n, guided=True)
        assert worst(([to_np(d) for d in down], to_np(mid)), ref) <= 1e-4
    compiled = {"edges": nets["edges"].compiled()}  # how a step may call a ControlNet instead
    down, mid = control_residuals(prepared, nets, *args, 2, n, guided=True, forwards=compiled)
    ref = torch_multi(models, inp, images, [0.7, 0.4], False)
    assert worst(([to_np(d) for d in down], to_np(mid)), ref) <= 1e-4
    # a direct computation: the sum of each ControlNet's own residuals at its scale
    direct = [nets[c.name](args[0], 300.0, args[2], p.image, c.scale, text_embeds=args[3], time_ids=args[4])
              for c, p in zip(controls, prepared)]
    down, mid = control_residuals(prepared, nets, *args, 3, n, guided=True)
    assert np.allclose(to_np(mid), to_np(direct[0][1] + direct[1][1]), rtol=1e-5, atol=1e-6)
    only_depth = [Control("depth", pil_control(12), 0.4, start=0.2, end=0.7)]
    assert control_residuals(prepare_controls(only_depth, nets, 96, 64, 1, True), nets, *args, 8, n, True) is None


def test_guess_mode_with_guidance_runs_the_conditional_half(models):
    nets = {"a": load_controlnet(models["dirs"][0]), "b": load_controlnet(models["dirs"][1])}
    controls = [Control("a", pil_control(13), 0.7), Control("b", pil_control(14), 0.4)]
    prepared = prepare_controls(controls, nets, 96, 64, 1, guided=True, guess_mode=True)
    assert prepared[0].image.shape == (1, 64, 96, 3)  # not doubled in guess mode
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    images = [processor.preprocess(c.image, height=64, width=96) for c in controls]
    inp = step_inputs(1, True, seed=15)
    cond = {k: v[1:] for k, v in inp.items()}
    ref_down, ref_mid = torch_multi(models, cond, images, [0.7, 0.4], True)
    args = (nhwc(inp["sample"]), 300.0, nhwc(inp["context"]), nhwc(inp["text_embeds"]), nhwc(inp["time_ids"]))
    down, mid = control_residuals(prepared, nets, *args, 0, 4, guided=True, guess_mode=True)
    assert to_np(mid).shape[0] == 2 and not to_np(mid)[0].any() and not to_np(down[0])[0].any()
    assert worst(([to_np(d)[1:] for d in down], to_np(mid)[1:]), (ref_down, ref_mid)) <= 1e-4


def test_control_checks_come_first(models):
    nets = {"edges": load_controlnet(models["dirs"][0])}
    for kwargs, match in ((dict(start=0.5, end=0.5), "start < end"), (dict(end=1.5), "start < end"),
                          (dict(scale=math.nan), "finite"), (dict(scale=True), "finite")):
        with pytest.raises(InputError, match=match):
            Control("edges", pil_control(1), **kwargs)
    with pytest.raises(InputError, match="no ControlNet loaded as 'pose'; loaded: 'edges'"):
        prepare_controls([Control("pose", pil_control(1))], nets, 64, 64, 1, True)
    with pytest.raises(InputError, match="Control or a list"):
        prepare_controls(["edges"], nets, 64, 64, 1, True)
    with pytest.raises(InputError, match="must be 8x their size"):
        nets["edges"](mx.zeros((1, 8, 8, 4)), 1.0, mx.zeros((1, 7, CONTEXT)), mx.zeros((1, 56, 64, 3)),
                      text_embeds=mx.zeros((1, POOLED)), time_ids=mx.zeros((1, 6)))
    assert mlx_sdxl.Control is Control


# -- loading, full size, quantization ----------------------------------------------------------

SD15_CONFIG = {
    "_class_name": "ControlNetModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "in_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "use_linear_projection": False,
}


def test_sd15_controlnet_is_refused_before_its_weights_are_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SD15_CONFIG))
    with pytest.raises(WeightsError, match=r"Stable Diffusion 1.x: its cross-attention width \(cross_attention_dim\) "
                                           r"is 768.*SDXL ControlNets \(cross_attention_dim 2048"):
        load_controlnet(tmp_path)
    with pytest.raises(ConfigError, match="ControlNet config: unsupported use_linear_projection"):
        ControlNetConfig.from_dict({**SDXL_CONTROLNET_CONFIG, "use_linear_projection": False})
    with pytest.raises(ConfigError, match="ControlNetUnionModel"):
        ControlNetConfig.from_dict({**SDXL_CONTROLNET_CONFIG, "_class_name": "ControlNetUnionModel"})


def meta_sdxl_controlnet():
    with torch.device("meta"):
        unet = TorchUNet(**{k: v for k, v in SDXL_BASE_CONFIG.items() if not k.startswith("_")})
        return TorchControlNet.from_unet(unet, load_weights_from_unet=False)


def test_full_size_matches_diffusers_meta_model():
    ref = meta_sdxl_controlnet()
    written = json.loads(ref.to_json_string())
    for key, value in SDXL_CONTROLNET_CONFIG.items():  # the published config is from_unet's
        assert json.loads(json.dumps(written.get(key, value))) == value, key
    ours = ControlNetModel(ControlNetConfig.from_dict(written))  # lazy: nothing is allocated
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(ours.parameters())}
    expected = {k: tuple(p.shape) if p.ndim != 4 else (p.shape[0], p.shape[2], p.shape[3], p.shape[1])
                for k, p in ref.named_parameters()}
    assert shapes == expected
    count = sum(p.numel() for p in ref.parameters())
    assert sum(math.prod(s) for s in shapes.values()) == count == 1_251_014_160
    assert len(ours.controlnet_down_blocks) == 9 and len(ours.transformer_blocks()) == 34
    check_controlnet_fits(ours, UNetConfig.sdxl_base())
    with pytest.raises(WeightsError, match="block_out_channels"):
        check_controlnet_fits(ours, UNetConfig.sdxl_refiner())


def test_single_file_in_diffusers_naming(tmp_path):
    """A lone .safetensors in diffusers naming: the config comes from the tensor shapes, and SDXL's
    conventions where shapes tell nothing (64-wide heads, 32 norm groups, 256-wide time ids)."""
    unet = TorchUNet(**{**UNET, "block_out_channels": (64, 128, 128), "attention_head_dim": [1, 2, 2],
                        "norm_num_groups": 32, "addition_time_embed_dim": 256,
                        "projection_class_embeddings_input_dim": POOLED + 6 * 256})
    torch_net = torch_controlnet(unet, 16)
    torch_net.save_pretrained(tmp_path / "folder")
    lone = tmp_path / "lone" / "canny.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((tmp_path / "folder" / "diffusion_pytorch_model.safetensors").read_bytes())
    folder, single = load_controlnet(tmp_path / "folder"), load_controlnet(lone)
    assert single.config == folder.config
    inp = inputs(1, 8, 8, seed=17)
    ref = run_torch(torch_net, inp, torch.tensor(50.0))
    assert worst(run_ours(single, inp, 50.0), ref) <= 1e-4
    with pytest.raises(WeightsError, match="not a ControlNet in diffusers naming"):
        load_controlnet(_unet_file(tmp_path))  # a UNet's weights


def _unet_file(tmp_path):
    unet = randomize(TorchUNet(**UNET), 18)
    unet.save_pretrained(tmp_path / "unet")
    lone = tmp_path / "unet_alone" / "unet.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    return lone


def test_fp16_controlnet_feeds_an_fp16_unet(models):
    net, unet = load_controlnet(models["dirs"][0], dtype="float16"), load_unet(models["unet_dir"], dtype="float16")
    inp = inputs(1, 8, 8, seed=21)
    down, mid = net(nhwc(inp["sample"]), 600.0, nhwc(inp["context"]), nhwc(inp["image"]),
                    text_embeds=nhwc(inp["text_embeds"]), time_ids=nhwc(inp["time_ids"]))
    assert mid.dtype == mx.float16
    dense = run_ours(load_controlnet(models["dirs"][0]), inp, 600.0)
    assert worst(([to_np(d) for d in down], to_np(mid)), dense) < 1e-2
    out = unet(nhwc(inp["sample"]), 600.0, nhwc(inp["context"]), nhwc(inp["text_embeds"]), nhwc(inp["time_ids"]),
               down_block_additional_residuals=[d.astype(mx.float32) for d in down], mid_block_additional_residual=mid)
    assert out.dtype == mx.float16  # fp32 residuals do not promote the fp16 UNet


def test_quantized_controlnet_stays_close(models):
    net = load_controlnet(models["dirs"][0])
    inp = inputs(1, 8, 8, seed=19)
    dense = run_ours(net, inp, 600.0)
    quantize_model(net, bits=8, group_size=32)
    layers = [m for _, m in net.named_modules()]
    assert sum(isinstance(m, QLinear) for m in layers) > 20 and sum(isinstance(m, QConv2d) for m in layers) > 20
    assert worst(run_ours(net, inp, 600.0), dense) <= 2e-2


# -- canny ---------------------------------------------------------------------------------------

def test_canny_edges():
    cv2 = pytest.importorskip("cv2")
    square = np.zeros((64, 96, 3), np.uint8)
    square[16:48, 32:64] = 255
    edges = canny(Image.fromarray(square))
    assert edges.mode == "RGB" and edges.size == (96, 64)
    pixels = np.asarray(edges)
    assert np.array_equal(pixels[..., 0], cv2.Canny(square, 100, 200)) and set(np.unique(pixels)) == {0, 255}
    assert pixels[15:17, 40:56].any(axis=0).all() and not pixels[24:40, 40:56].any()


def test_canny_without_opencv_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(InputError, match=r"pip install 'mlx-sdxl\[canny\]'"):
        canny(pil_control(20))
