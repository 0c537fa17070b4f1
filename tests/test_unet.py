"""Parity of the MLX UNet with diffusers' UNet2DConditionModel on tiny random SDXL-shaped models."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import load_file, save_file

from mlx_sdxl.errors import ConfigError, InputError, WeightsError
from mlx_sdxl.models.unet import SDXL_BASE_CONFIG, UNet2DConditionModel, UNetConfig, load_unet

torch.set_grad_enabled(False)

POOLED = 16
TIME_DIM = 8

# Base-like: 3 levels Down / CrossAttn / CrossAttn, per-level transformer depth, 6 time ids.
BASE = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 4, 4],  # head counts (diffusers' naming trap)
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
    sample_size=16,
)
# Refiner-like: 4 levels Down / CrossAttn / CrossAttn / Down, one int depth, 5 time ids.
REFINER = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2,
    attention_head_dim=[2, 2, 4, 4],
    cross_attention_dim=24,
    norm_num_groups=16,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM,
    sample_size=16,
)


def make_torch_unet(config, seed=0):
    """A diffusers UNet with every parameter random (nothing zero, norms around 1)."""
    torch.manual_seed(seed)
    model = TorchUNet(**config).eval()
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    return model


def make_inputs(config, batch, h, w, n_ids, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = [64.0, 48.0, 3.0, 5.0, 64.0, 48.0][:n_ids]
    if n_ids == 5:
        ids[-1] = 6.0  # aesthetic score
    return dict(
        sample=torch.randn(batch, 4, h, w, generator=g),
        context=torch.randn(batch, 7, config["cross_attention_dim"], generator=g),
        text_embeds=torch.randn(batch, POOLED, generator=g),
        time_ids=torch.tensor([ids] * batch) + torch.arange(batch)[:, None],
    )


def torch_forward(model, inp, timestep):
    added = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    out = model(inp["sample"], timestep, inp["context"], added_cond_kwargs=added).sample
    return out.permute(0, 2, 3, 1).numpy()


def mlx_forward(model, inp, timestep):
    def m(t):
        return mx.array(t.numpy())

    out = model(mx.array(inp["sample"].permute(0, 2, 3, 1).numpy()), timestep, m(inp["context"]),
                text_embeds=m(inp["text_embeds"]), time_ids=m(inp["time_ids"]))
    return np.array(out.astype(mx.float32))


def rel_l2(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(torch model, saved unet/ folder) for the base-like config."""
    model = make_torch_unet(BASE)
    path = tmp_path_factory.mktemp("base") / "unet"
    model.save_pretrained(path)
    return model, path


def test_base_like_matches_diffusers(base):
    model, path = base
    inp = make_inputs(BASE, 1, 16, 16, 6)
    ref = torch_forward(model, inp, 500.0)
    ours = load_unet(path)
    assert ours.dtype == mx.float32
    assert rel_l2(mlx_forward(ours, inp, 500.0), ref) <= 1e-4


def test_refiner_like_sharded_matches_diffusers(tmp_path):
    model = make_torch_unet(REFINER, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="150KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    inp = make_inputs(REFINER, 1, 16, 16, 5)
    ref = torch_forward(model, inp, torch.tensor(321.0))
    ours = mlx_forward(load_unet(tmp_path), inp, mx.array(321.0))  # 0-d array timestep
    assert rel_l2(ours, ref) <= 1e-4


def test_odd_latent_size(base):
    model, path = base
    inp = make_inputs(BASE, 1, 13, 9, 6, seed=2)
    ref = torch_forward(model, inp, 999.0)
    ours = mlx_forward(load_unet(path), inp, 999.0)
    assert ours.shape == (1, 13, 9, 4)
    assert rel_l2(ours, ref) <= 1e-4


def test_batch_with_a_timestep_per_sample(base):
    model, path = base
    inp = make_inputs(BASE, 2, 16, 8, 6, seed=4)
    t = torch.tensor([976.0, 1.0])
    ref = torch_forward(model, inp, t)
    ours = mlx_forward(load_unet(path), inp, mx.array(t.numpy()))
    assert rel_l2(ours, ref) <= 1e-4
    # each sample really sees its own timestep: swapping them changes the result
    swapped = mlx_forward(load_unet(path), inp, mx.array([1.0, 976.0]))
    assert rel_l2(swapped, ref) > 1e-2


def test_fp16_weight_file(tmp_path):
    model = make_torch_unet(BASE, seed=5).half()
    model.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    inp = make_inputs(BASE, 1, 16, 16, 6, seed=6)
    ref = torch_forward(model.float(), inp, 250.0)  # fp32 model holding the fp16-rounded weights
    ours32 = load_unet(tmp_path, dtype="float32")
    assert ours32.dtype == mx.float32
    assert rel_l2(mlx_forward(ours32, inp, 250.0), ref) <= 1e-4
    # kept in fp16 and fed fp32 inputs: runs in fp16 and stays close
    ours16 = load_unet(tmp_path)
    assert ours16.dtype == mx.float16
    out = ours16(mx.array(inp["sample"].permute(0, 2, 3, 1).numpy()), 250.0, mx.array(inp["context"].numpy()),
                 text_embeds=mx.array(inp["text_embeds"].numpy()), time_ids=mx.array(inp["time_ids"].numpy()))
    assert out.dtype == mx.float16
    assert rel_l2(np.array(out.astype(mx.float32)), ref) <= 1e-2


def test_geglu_feed_forward_is_exact_gelu():
    """h * gelu_exact(gate), h first: the tanh approximation or a swapped split fails here."""
    from diffusers.models.attention import FeedForward as TorchFF

    from mlx_sdxl.models.unet import FeedForward

    torch.manual_seed(7)
    ff = TorchFF(32, activation_fn="geglu").eval()
    x = 3 * torch.randn(2, 10, 32)
    ours = FeedForward(32)
    ours.load_weights([(k, mx.array(v.numpy())) for k, v in ff.state_dict().items()])
    assert rel_l2(np.array(ours(mx.array(x.numpy()))), ff(x).numpy()) <= 1e-5


def test_sdxl_configs_resolve_head_counts():
    base = UNetConfig.sdxl_base()
    assert base.num_attention_heads == (5, 10, 20)
    assert [c // h for c, h in zip(base.block_out_channels, base.num_attention_heads)] == [64, 64, 64]
    assert base.transformer_layers_per_block == (1, 2, 10) and base.cross_attention_dim == 2048
    ref = UNetConfig.sdxl_refiner()
    assert ref.num_attention_heads == (6, 12, 24, 24) and ref.transformer_layers_per_block == (4, 4, 4, 4)
    assert ref.time_embed_dim == 1536 and ref.projection_class_embeddings_input_dim == 2560
    # a config naming num_attention_heads explicitly uses it
    cfg = UNetConfig.from_dict({**SDXL_BASE_CONFIG, "num_attention_heads": [10, 20, 40]})
    assert cfg.num_attention_heads == (10, 20, 40)


@pytest.mark.parametrize("key,value", [
    ("addition_embed_type", "text"),
    ("addition_embed_type", None),
    ("time_cond_proj_dim", 0),  # a positive int (an LCM UNet's guidance embedding) is supported
    ("class_embed_type", "timestep"),
    ("encoder_hid_dim", 1024),
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("use_linear_projection", False),
    ("down_block_types", ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["CrossAttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("transformer_layers_per_block", [[1, 1], [2, 2], [10, 10]]),
    ("attention_head_dim", [7, 10, 20]),
    ("only_cross_attention", True),
    ("_class_name", "UNet2DModel"),
    ("some_future_option", 3),
    ("block_out_channels", 320),
    ("norm_num_groups", 24),
])
def test_config_rejects_unsupported(key, value):
    with pytest.raises(ConfigError, match=key):
        UNetConfig.from_dict({**SDXL_BASE_CONFIG, key: value})


def test_config_missing_defaults_are_diffusers():
    d = {k: v for k, v in SDXL_BASE_CONFIG.items() if k != "use_linear_projection"}
    with pytest.raises(ConfigError, match="use_linear_projection"):  # diffusers' default is False
        UNetConfig.from_dict(d)
    cfg = UNetConfig.from_dict({k: v for k, v in SDXL_BASE_CONFIG.items()
                                if k not in ("layers_per_block", "sample_size", "_diffusers_version")})
    assert cfg.layers_per_block == (2, 2, 2)


def test_weight_mismatches_are_listed(base, tmp_path):
    _, path = base
    w = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    del w["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    w["conv_out.bias"] = np.zeros(5, np.float32)
    w["extra.weight"] = np.zeros(3, np.float32)
    save_file(w, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(WeightsError) as e:
        load_unet(tmp_path)
    msg = str(e.value)
    assert "1 missing: down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "conv_out.bias: file (5,) vs model (4,)" in msg


def test_missing_files_give_clear_errors(base, tmp_path):
    _, path = base
    with pytest.raises(WeightsError, match="not found"):
        load_unet(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="config.json"):
        load_unet(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(WeightsError, match="diffusion_pytorch_model"):
        load_unet(tmp_path)


def test_bad_inputs_raise_input_error(base):
    _, path = base
    model = load_unet(path)
    x, ctx = mx.zeros((1, 8, 8, 4)), mx.zeros((1, 7, 32))
    pooled, ids = mx.zeros((1, POOLED)), mx.zeros((1, 6))
    with pytest.raises(InputError, match="time ids"):
        model(x, 1.0, ctx, pooled, mx.zeros((1, 5)))
    with pytest.raises(InputError, match="text_embeds"):
        model(x, 1.0, ctx)
    with pytest.raises(InputError, match="NHWC"):
        model(mx.zeros((1, 4, 8, 8)), 1.0, ctx, pooled, ids)
    with pytest.raises(InputError, match="encoder_hidden_states"):
        model(x, 1.0, mx.zeros((1, 7, 16)), pooled, ids)
    with pytest.raises(InputError, match="timestep"):
        model(x, mx.array([1.0, 2.0]), ctx, pooled, ids)


def test_config_json_roundtrip_from_diffusers(base):
    """The config.json diffusers writes is read without complaint, with head counts resolved."""
    _, path = base
    cfg = UNetConfig.from_dict(json.loads((path / "config.json").read_text()))
    assert cfg.num_attention_heads == (2, 4, 4) and cfg.transformer_layers_per_block == (1, 1, 2)
    assert isinstance(UNet2DConditionModel(cfg), UNet2DConditionModel)


def test_compiled_forward_matches_diffusers(base):
    model, path = base
    ours = load_unet(path).compiled()
    for t, seed in ((500.0, 6), (120.0, 7)):  # a new timestep value reuses the trace
        inp = make_inputs(BASE, 2, 16, 8, 6, seed=seed)
        ref = torch_forward(model, inp, t)
        out = ours(mx.array(inp["sample"].permute(0, 2, 3, 1).numpy()), mx.array(t), mx.array(inp["context"].numpy()),
                   mx.array(inp["text_embeds"].numpy()), mx.array(inp["time_ids"].numpy()))
        assert rel_l2(np.array(out), ref) <= 1e-4
    with pytest.raises(InputError):
        ours(mx.zeros((1, 16, 16, 3)), 1.0, mx.zeros((1, 7, 32)), mx.zeros((1, POOLED)), mx.zeros((1, 6)))


def test_cross_kv_made_once_gives_the_same_steps_as_diffusers(base):
    """A sampler makes the prompt's cross-attention keys and values once per stage
    (`cross_attention_kv`) and passes them to every step: eager and compiled, batch 2,
    non-square latents, several timesteps, against diffusers and bit-equal to the
    forward that makes them itself."""
    model, path = base
    ours = load_unet(path)
    compiled = ours.compiled()
    inp = make_inputs(BASE, 2, 12, 8, 6, seed=8)
    m = {k: mx.array(v.numpy()) for k, v in inp.items()}
    x = mx.array(inp["sample"].permute(0, 2, 3, 1).numpy())
    kv = ours.cross_attention_kv(m["context"])
    blocks = ours.transformer_blocks()
    assert len(kv) == len(blocks) and [b.kv_slot for b in blocks] == list(range(len(blocks)))
    for (k, v), block in zip(kv, blocks):  # (batch, heads, tokens, head dim) per layer
        assert k.shape == v.shape == (2, block.attn2.heads, 7, block.attn2.to_k.weight.shape[0] // block.attn2.heads)
    for t in (999.0, 500.0, 1.0):
        ref = torch_forward(model, inp, t)
        plain = ours(x, t, m["context"], text_embeds=m["text_embeds"], time_ids=m["time_ids"])
        for forward in (ours, compiled):
            out = forward(x, t, m["context"], text_embeds=m["text_embeds"], time_ids=m["time_ids"], cross_kv=kv)
            assert rel_l2(np.array(out), ref) <= 1e-4
            assert mx.array_equal(out, plain)


def test_cross_kv_of_another_context_is_refused(base):
    _, path = base
    model = load_unet(path)
    x, ctx = mx.zeros((2, 8, 8, 4)), mx.zeros((2, 7, 32))
    pooled, ids = mx.zeros((2, POOLED)), mx.zeros((2, 6))
    kv = model.cross_attention_kv(ctx)
    n = len(kv)
    for bad, match in ((kv[:-1], f"{n} \\(key, value\\) pairs; got {n - 1}"),
                       (model.cross_attention_kv(mx.zeros((1, 7, 32))), "another shape"),
                       (model.cross_attention_kv(mx.zeros((2, 9, 32))), "another shape")):
        for forward in (model, model.compiled()):
            with pytest.raises(InputError, match=match):
                forward(x, 1.0, ctx, text_embeds=pooled, time_ids=ids, cross_kv=bad)
    with pytest.raises(InputError, match="encoder_hidden_states must have shape"):
        model.cross_attention_kv(mx.zeros((2, 7, 16)))


def test_full_size_transformer_blocks_and_their_slots():
    """70 transformer blocks in the base (10 at 640 channels, 60 at 1280), 44 in the refiner; one kv slot each."""
    for cfg, count in ((UNetConfig.sdxl_base(), 70), (UNetConfig.sdxl_refiner(), 44)):
        model = UNet2DConditionModel(cfg)  # lazy: nothing is allocated
        blocks = model.transformer_blocks()
        assert len(blocks) == count and sorted(b.kv_slot for b in blocks) == list(range(count))
