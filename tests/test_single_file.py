"""Single-file (SGM) SDXL checkpoints: detection, key mapping, config inference, bad inputs."""

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sdxl.errors import ConfigError, WeightsError
from mlx_sdxl.single_file import (
    BASE, REFINER, detect_checkpoint, infer_clip_config, infer_configs, infer_unet_config, load_single_file,
    split_checkpoint,
)
from sgm_inverse import sgm_state_dict, write_sgm_checkpoint

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny torch matmuls on a shared 2-core machine run ~100x faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The key/shape inventory of the real checkpoints lives in the project's shared/ folder, beside the
# checkout (CI lays it there too); MLX_SDXL_SHARED points elsewhere.
_SHARED = [Path(os.environ["MLX_SDXL_SHARED"])] if os.environ.get("MLX_SDXL_SHARED") else []
_SHARED += [Path(__file__).resolve().parents[1].parent / "shared", Path("/work/shared")]
INVENTORY = next((p / "reference" / "sgm-checkpoint-keys.json" for p in _SHARED
                  if (p / "reference" / "sgm-checkpoint-keys.json").is_file()),
                 _SHARED[0] / "reference" / "sgm-checkpoint-keys.json")
MODELS = {BASE: "sd_xl_base_1.0", REFINER: "sd_xl_refiner_1.0"}

# ---------------------------------------------------------------- the released configs (facts §1.1-1.3)

UNET_COMMON = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                   norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=256, upcast_attention=None,
                   mid_block_type="UNetMidBlock2DCrossAttn", class_embed_type=None, downsample_padding=1)
KNOWN = {
    BASE: {
        "unet": dict(UNET_COMMON, block_out_channels=[320, 640, 1280],
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
                     cross_attention_dim=2048, projection_class_embeddings_input_dim=2816),
        "text_encoder": dict(architectures=["CLIPTextModel"], hidden_size=768, num_hidden_layers=12,
                             num_attention_heads=12, intermediate_size=3072, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5, max_position_embeddings=77, vocab_size=49408, projection_dim=768,
                             bos_token_id=0, eos_token_id=2, pad_token_id=1),
    },
    REFINER: {
        "unet": dict(UNET_COMMON, block_out_channels=[384, 768, 1536, 1536],
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     transformer_layers_per_block=4, attention_head_dim=[6, 12, 24, 24],
                     cross_attention_dim=1280, projection_class_embeddings_input_dim=2560),
    },
}
KNOWN_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
                 act_fn="silu", in_channels=3, out_channels=3, sample_size=1024, scaling_factor=0.13025,
                 force_upcast=True)
KNOWN_TE2 = dict(architectures=["CLIPTextModelWithProjection"], hidden_size=1280, num_hidden_layers=32,
                 num_attention_heads=20, intermediate_size=5120, hidden_act="gelu", layer_norm_eps=1e-5,
                 max_position_embeddings=77, vocab_size=49408, projection_dim=1280,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
for _k in KNOWN:
    KNOWN[_k].update(vae=KNOWN_VAE, text_encoder_2=KNOWN_TE2)


def file_names(sd):
    """transformers in-memory CLIP names -> file names (transformers >= 5.6 drops `text_model.`)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("position_ids")}


def reference_model(name, config):
    """The diffusers / transformers module for a component config."""
    if name == "unet":
        return diffusers.UNet2DConditionModel.from_config(config)
    if name == "vae":
        return diffusers.AutoencoderKL.from_config(config)
    cfg = transformers.CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
    projection = config["architectures"] == ["CLIPTextModelWithProjection"]
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(cfg)


def reference_shapes(name, config):
    with torch.device("meta"):
        model = reference_model(name, config)
    sd = file_names(model.state_dict()) if name.startswith("text") else model.state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def shape_stand_ins(model):
    """Lazy zeros with the checkpoint's shapes: never evaluated, so a 7 GB checkpoint costs nothing."""
    inv = json.loads(INVENTORY.read_text())[MODELS[model]]
    return {k: mx.zeros(tuple(s), dtype=mx.float16) for k, s in {**inv["required"], **inv["optional"]}.items()}, inv


# ---------------------------------------------------------------- full-size key coverage (shapes only)


@pytest.mark.parametrize("kind", [BASE, REFINER])
def test_full_checkpoint_maps_onto_diffusers_models(kind):
    weights, inv = shape_stand_ins(kind)
    extra = {"model.diffusion_model.input_blocks.1.0.unknown_layer.weight": mx.zeros((3,)),
             "first_stage_model.loss.logvar": mx.zeros(()), "conditioner.embedders.5.model.thing": mx.zeros((2,)),
             "model_ema.decay": mx.zeros(()), "denoiser.sigmas": mx.zeros((1000,)),
             "alphas_cumprod": mx.zeros((1000,)), "denoiser.log_sigmas": mx.zeros((1000,))}
    assert detect_checkpoint(weights.keys()) == kind
    components, unused = split_checkpoint({**weights, **extra})
    # every required key is consumed; optional buffers are ignored silently; unknown keys are reported
    assert unused == sorted(["model.diffusion_model.input_blocks.1.0.unknown_layer.weight",
                             "first_stage_model.loss.logvar", "conditioner.embedders.5.model.thing"])
    # renaming, slicing q/k/v and squeezing 1x1 convs keep every parameter
    assert sum(int(np.prod(v.shape)) for c in components.values() for v in c.values()) == inv["required_params"]

    configs = infer_configs(components, kind)
    assert sorted(configs) == sorted(KNOWN[kind])
    for name, known in KNOWN[kind].items():
        assert {k: configs[name].get(k) for k in known} == known, name
        ours = {k: tuple(v.shape) for k, v in components[name].items()}
        assert ours == reference_shapes(name, configs[name]), name
        assert ours == reference_shapes(name, {**configs[name], **known}), name


def test_text_projection_is_transposed_and_qkv_split_by_rows():
    weights, _ = shape_stand_ins(REFINER)
    p = "conditioner.embedders.0.model."
    proj = mx.arange(1280 * 1280, dtype=mx.float32).reshape(1280, 1280)  # not symmetric
    qkv = mx.arange(3840, dtype=mx.float32)[:, None] * mx.ones((1, 1280))
    weights.update({p + "text_projection": proj, p + "transformer.resblocks.3.attn.in_proj_weight": qkv})
    te2 = split_checkpoint(weights)[0]["text_encoder_2"]
    out = np.array(te2["text_projection.weight"])
    assert np.array_equal(out, np.array(proj).T) and not np.array_equal(out, np.array(proj))
    for i, n in enumerate("qkv"):
        rows = np.array(te2[f"text_model.encoder.layers.3.self_attn.{n}_proj.weight"])[:, 0]
        assert np.array_equal(rows, np.arange(i * 1280, (i + 1) * 1280))


def test_inferred_configs_are_accepted_by_the_mlx_models():
    from mlx_sdxl.models import clip, unet, vae

    for kind, reference in ((BASE, unet.UNetConfig.sdxl_base()), (REFINER, unet.UNetConfig.sdxl_refiner())):
        components, _ = split_checkpoint(shape_stand_ins(kind)[0])
        configs = infer_configs(components, kind)
        assert unet.UNetConfig.from_dict(configs["unet"]) == reference
        assert vae.VAEConfig.from_dict(configs["vae"]) == vae.VAEConfig.sdxl()
        te2 = clip.CLIPTextConfig.from_dict(configs["text_encoder_2"])
        assert te2.with_projection and (te2.hidden_size, te2.num_attention_heads, te2.eos_token_id) == (1280, 20, 2)
        if kind == BASE:
            te1 = clip.CLIPTextConfig.from_dict(configs["text_encoder"])
            assert not te1.with_projection and (te1.hidden_act, te1.num_attention_heads) == ("quick_gelu", 12)


# ---------------------------------------------------------------- tiny models: exact round trip through a file

HEAD_DIM = 16  # every tiny attention has 16-wide heads; the rule is heads = width / head_dim


def randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model.eval()


LEGACY_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # as in the SDXL hub configs


def tiny_models(kind):
    """Tiny diffusers / transformers models shaped like SDXL base or refiner."""
    hidden2, proj = (48, 40) if kind == BASE else (48, 48)  # base: non-square projection; refiner: square
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=300, hidden_size=hidden2, num_hidden_layers=3 if kind == BASE else 2, num_attention_heads=3,
        intermediate_size=96, projection_dim=proj, hidden_act="gelu", max_position_embeddings=77, **LEGACY_IDS))
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_act="quick_gelu", max_position_embeddings=77, **LEGACY_IDS)) if kind == BASE else None
    if kind == BASE:
        unet = diffusers.UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4], cross_attention_dim=32 + hidden2,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=proj + 6 * 8)
        vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2)
    else:
        unet = diffusers.UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=2, attention_head_dim=[2, 4, 4, 4], cross_attention_dim=hidden2,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=proj + 5 * 8)
        vae = diffusers.AutoencoderKL(block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 3,
                                      up_block_types=("UpDecoderBlock2D",) * 3)
    models = {"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2}
    return {k: randomize(m, i) for i, (k, m) in enumerate(models.items()) if m is not None}


def state_dicts(models):
    return {k: file_names(m.state_dict()) if k.startswith("text") else m.state_dict() for k, m in models.items()}


EXTRA_IGNORED = {"denoiser.sigmas": torch.ones(1000), "alphas_cumprod": torch.ones(1000),
                 "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(0)}


@pytest.fixture(scope="module", params=[BASE, REFINER])
def tiny_file(request, tmp_path_factory):
    kind = request.param
    torch.set_grad_enabled(False)
    models = tiny_models(kind)
    sds = state_dicts(models)
    te2_prefix = "conditioner.embedders.1.model." if kind == BASE else "conditioner.embedders.0.model."
    extra = dict(EXTRA_IGNORED, **{te2_prefix + "logit_scale": torch.tensor(4.6),
                                   "model.diffusion_model.middle_block.1.extra_scale": torch.ones(2),
                                   "cond_stage_model_typo.weight": torch.ones(2)})
    if kind == BASE:
        extra["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path_factory.mktemp("sgm") / f"{kind}.safetensors"
    write_sgm_checkpoint(path, sds["unet"], sds["vae"], sds.get("text_encoder"), sds["text_encoder_2"], extra)
    return kind, models, sds, path


def test_tiny_round_trip_reproduces_every_tensor_exactly(tiny_file):
    kind, models, sds, path = tiny_file
    ckpt = load_single_file(path, head_dim=HEAD_DIM)
    assert ckpt.kind == kind
    assert ckpt.unused == sorted(["model.diffusion_model.middle_block.1.extra_scale", "cond_stage_model_typo.weight"])
    assert sorted(ckpt.components) == sorted(sds)
    for name, sd in sds.items():
        _, weights = ckpt.components[name]
        assert sorted(weights) == sorted(sd), name
        for k, ref in sd.items():
            ours = np.array(weights[k])
            assert ours.shape == tuple(ref.shape) and np.array_equal(ours, ref.numpy()), f"{name}: {k}"
    # OpenCLIP's projection is stored (in, out); it must come back as the Linear's (out, in) weight
    proj = np.array(ckpt.components["text_encoder_2"][1]["text_projection.weight"])
    ref = sds["text_encoder_2"]["text_projection.weight"].numpy()
    assert np.array_equal(proj, ref)
    if proj.shape[0] == proj.shape[1]:
        assert not np.array_equal(proj, ref.T)  # a missed transpose would go unnoticed by shapes alone


def test_loading_is_lazy_and_never_copies(tiny_file):
    """Nothing is read by load_single_file; evaluating every mapped tensor costs the file's tensors once
    (q/k/v slices, the transposed projection and squeezed 1x1 convs are views)."""
    path = tiny_file[3]
    mx.clear_cache()
    before = mx.get_active_memory()
    ckpt = load_single_file(path, head_dim=HEAD_DIM)
    assert mx.get_active_memory() == before
    tensors = [v for _, weights in ckpt.components.values() for v in weights.values()]
    mx.eval(tensors)
    used = mx.get_active_memory() - before
    stored = sum(v.nbytes for v in mx.load(str(path)).values())
    assert used <= 1.01 * stored, (used, stored)


def test_tiny_inferred_configs_rebuild_the_same_models(tiny_file):
    """The inferred configs give models with identical outputs (heads, groups, time ids all right)."""
    kind, models, sds, path = tiny_file
    ckpt = load_single_file(path, head_dim=HEAD_DIM)
    for name, model in models.items():
        config, weights = ckpt.components[name]
        rebuilt = reference_model(name, config).eval()
        loaded = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        rebuilt.load_state_dict(loaded if name in ("unet", "vae") else
                                {k.removeprefix("text_model.") if not hasattr(rebuilt, "text_model") else k: v
                                 for k, v in loaded.items()}, strict=True)
        fields = {"unet": ["block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
                           "cross_attention_dim", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                           "norm_num_groups", "in_channels", "out_channels", "use_linear_projection",
                           "attention_head_dim"],
                  "vae": ["block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                          "in_channels", "out_channels", "down_block_types", "up_block_types"]}.get(
            name, ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                   "max_position_embeddings", "hidden_act"])
        for f in fields:
            a, b = getattr(rebuilt.config, f), getattr(model.config, f)
            assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b), f
        assert same_outputs(name, model, rebuilt, kind), name
    if kind == BASE:
        assert ckpt.components["unet"][0]["transformer_layers_per_block"] == [1, 1, 2]
    else:
        assert ckpt.components["unet"][0]["transformer_layers_per_block"] == 2


def same_outputs(name, a, b, kind):
    torch.manual_seed(1)
    if name == "unet":
        n_ids = 6 if kind == BASE else 5
        pooled = a.config.projection_class_embeddings_input_dim - n_ids * a.config.addition_time_embed_dim
        cond = {"text_embeds": torch.randn(1, pooled), "time_ids": 100 * torch.randn(1, n_ids)}
        args = (torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 7, a.config.cross_attention_dim))
        outs = [m(*args, added_cond_kwargs=cond).sample for m in (a, b)]
    elif name == "vae":
        x = torch.randn(1, 3, 16, 16)
        outs = [m(x, sample_posterior=False).sample for m in (a, b)]
    else:
        ids = torch.randint(0, 300, (2, 77))
        outs = [m(ids, output_hidden_states=True) for m in (a, b)]
        outs = [torch.cat([o.hidden_states[-2].flatten(),
                           (o.text_embeds if hasattr(o, "text_embeds") else o.pooler_output).flatten()]) for o in outs]
    return float((outs[0] - outs[1]).norm() / outs[0].norm()) < 1e-6


# ---------------------------------------------------------------- bad inputs


def test_truncated_file(tiny_file, tmp_path):
    data = tiny_file[3].read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        load_single_file(bad)


def test_pickle_is_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "sd_xl_base_1.0.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.time_embed.0.weight": torch.ones(2, 2)}}, bad)
    with pytest.raises(WeightsError, match="not a safetensors"):
        load_single_file(bad)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_single_file(tmp_path / "nope.safetensors")


def sd15_keys():
    return ["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "model.diffusion_model.time_embed.0.weight", "first_stage_model.encoder.conv_in.weight"]


def test_sd15_checkpoint_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="Stable Diffusion 1.x/2.x"):
        detect_checkpoint(sd15_keys())
    # SD 2.x: OpenCLIP under cond_stage_model.model, UNet without label_emb
    with pytest.raises(WeightsError, match="1.x/2.x"):
        detect_checkpoint(["cond_stage_model.model.token_embedding.weight", "model.diffusion_model.out.2.weight"])
    with pytest.raises(WeightsError, match="1.x/2.x"):
        detect_checkpoint(["model.diffusion_model.input_blocks.0.0.weight"])
    path = tmp_path / "v1-5.safetensors"
    from safetensors.torch import save_file
    save_file({k: torch.zeros(2) for k in sd15_keys()}, str(path))
    with pytest.raises(WeightsError, match=r"v1-5\.safetensors: this looks like a Stable Diffusion 1.x/2.x"):
        load_single_file(path)


def test_unknown_checkpoint_lists_expected_keys():
    with pytest.raises(WeightsError, match="conditioner.embedders.1.model.positional_embedding") as e:
        detect_checkpoint(["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"])
    assert "down_blocks.0" in str(e.value) and "diffusers folder" in str(e.value)


def test_missing_component(tiny_file):
    kind, models, sds, path = tiny_file
    te2 = "conditioner.embedders.1.model." if kind == BASE else "conditioner.embedders.0.model."
    drops = {"first_stage_model.": "vae", "model.diffusion_model.": "unet", te2: "text_encoder_2"}
    if kind == BASE:
        drops["conditioner.embedders.0.transformer."] = "text_encoder"
    weights = dict(mx.load(str(path)))
    for prefix, name in drops.items():
        kept = {k: v for k, v in weights.items() if not k.startswith(prefix)}
        with pytest.raises(WeightsError, match=rf"lacks {name} \({re.escape(prefix)}\*\)"):
            split_checkpoint(kept, kind)


def test_inconsistent_shapes_are_caught_at_split_or_inference(tiny_file):
    """Shapes the mapping or the config inference rely on are checked here; every other tensor's
    shape is checked against the built model by the model loader (weights.apply_weights)."""
    kind, models, sds, path = tiny_file
    weights = dict(mx.load(str(path)))
    p = "conditioner.embedders.1.model." if kind == BASE else "conditioner.embedders.0.model."
    bad = dict(weights, **{p + "transformer.resblocks.0.attn.in_proj_weight": mx.zeros((140, 48))})
    with pytest.raises(WeightsError, match="in_proj_weight has 140 rows, expected 3 x hidden size = 144"):
        split_checkpoint(bad)
    bad = dict(weights, **{p + "text_projection": mx.zeros((40, 40))})
    with pytest.raises(WeightsError, match="text_projection has shape"):
        split_checkpoint(bad)
    # add_embedding must take pooled (the projection width) + 6 (base) or 5 (refiner) equal time-id embeddings
    components, _ = split_checkpoint(weights)
    unet = dict(components["unet"], **{"add_embedding.linear_1.weight": mx.zeros((128, 90))})
    with pytest.raises(WeightsError, match="add_embedding takes 90 features"):
        infer_configs(dict(components, unet=unet), kind, head_dim=HEAD_DIM)
    # a tensor the inference does not read: caught when the model is built from the weights
    if kind == BASE:
        from mlx_sdxl.models.clip import CLIPTextConfig, clip_from_weights
        te = dict(components["text_encoder"], **{"text_model.encoder.layers.1.mlp.fc1.weight": mx.zeros((64, 31))})
        config = CLIPTextConfig.from_dict(infer_clip_config(te, "clip_l", head_dim=HEAD_DIM))
        with pytest.raises(WeightsError, match="wrong shape: encoder.layers.1.mlp.fc1.weight"):
            clip_from_weights(config, te)


def test_inpainting_unet_is_accepted_and_other_widths_refused():
    weights, _ = shape_stand_ins(BASE)
    weights["model.diffusion_model.input_blocks.0.0.weight"] = mx.zeros((320, 9, 3, 3))
    components, _ = split_checkpoint(weights)
    assert infer_configs(components, BASE)["unet"]["in_channels"] == 9  # inpainting: latents, mask, masked image
    weights["model.diffusion_model.input_blocks.0.0.weight"] = mx.zeros((320, 7, 3, 3))
    components, _ = split_checkpoint(weights)
    with pytest.raises(WeightsError, match="7 input channels"):
        infer_configs(components, BASE)


def test_heads_and_groups_rules_and_overrides(tiny_file):
    kind, models, sds, path = tiny_file
    with pytest.raises(ConfigError, match="not a multiple of head_dim 64"):
        load_single_file(path)  # the tiny model's 32/48-wide layers are not 64-wide heads
    ckpt = load_single_file(path, head_dim=HEAD_DIM, overrides={"unet": {"attention_head_dim": [1, 2, 2, 2][:len(
        models["unet"].config.block_out_channels)]}, "vae": {"scaling_factor": 0.5}})
    assert ckpt.components["unet"][0]["attention_head_dim"][:3] == [1, 2, 2]
    assert ckpt.components["vae"][0]["scaling_factor"] == 0.5
    with pytest.raises(ConfigError, match="unknown components"):
        load_single_file(path, head_dim=HEAD_DIM, overrides={"scheduler": {}})
    # level 0 has no attention, so only the GroupNorm rule (32 groups) constrains its width
    components, _ = split_checkpoint(dict(mx.load(str(path))))
    unet = dict(components["unet"], **{"down_blocks.0.resnets.0.conv1.weight": mx.zeros((24, 32, 3, 3))})
    with pytest.raises(ConfigError, match="not divisible by norm_num_groups=32"):
        infer_unet_config(unet, head_dim=HEAD_DIM)
    assert infer_unet_config(unet, head_dim=HEAD_DIM, overrides={"norm_num_groups": 8})["norm_num_groups"] == 8


def test_detection_keys_of_diffusers():
    assert detect_checkpoint(["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"]) == BASE
    assert detect_checkpoint(["conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"]) == REFINER
    assert detect_checkpoint(["conditioner.embedders.0.model.text_projection"]) == REFINER
    with pytest.raises(WeightsError, match="Playground"):
        detect_checkpoint(["edm_mean", "conditioner.embedders.1.model.positional_embedding"])


def test_sgm_inverse_matches_the_inventory_naming():
    """The test writer produces exactly the real checkpoint's key set for an SDXL-shaped model."""
    for kind in (BASE, REFINER):
        inv = json.loads(INVENTORY.read_text())[MODELS[kind]]
        cfgs = KNOWN[kind]
        with torch.device("meta"):
            sds = {name: file_names(reference_model(name, cfg).state_dict()) if name.startswith("text")
                   else reference_model(name, cfg).state_dict() for name, cfg in cfgs.items()}
        sgm = sgm_state_dict(sds["unet"], sds["vae"], sds.get("text_encoder"), sds["text_encoder_2"])
        assert {k: list(v.shape) for k, v in sgm.items()} == inv["required"]
