"""CLIP text encoders vs transformers' CLIPTextModel / CLIPTextModelWithProjection."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from mlx_sdxl.errors import ConfigError, InputError, WeightsError
from mlx_sdxl.models.clip import CLIPTextConfig, CLIPTextModel, clip_from_weights, load_text_encoder

transformers = pytest.importorskip("transformers")

VOCAB, BOS, EOS = 600, 598, 599  # like CLIP: bos and eos are the two largest ids
TINY = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
            vocab_size=VOCAB, max_position_embeddings=77, projection_dim=40, layer_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)  # the legacy ids of the SDXL configs


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_ids(lengths, pad):
    """Rows [bos, tokens..., eos, pad...] of 77 ids with `lengths` content tokens."""
    rng = np.random.default_rng(0)
    ids = np.full((len(lengths), 77), pad, np.int64)
    for r, n in enumerate(lengths):
        ids[r, 0] = BOS
        ids[r, 1:n + 1] = rng.integers(3, BOS, n)
        ids[r, n + 1] = EOS
    return ids


def torch_model(projection: bool, act: str, **overrides):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(**{**TINY, **overrides}, hidden_act=act)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def reference(model, ids, projection):
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    pooled = out.text_embeds if projection else out.pooler_output
    return [h.numpy() for h in out.hidden_states], pooled.numpy()


CASES = [(False, "quick_gelu"), (True, "gelu")]  # CLIP-L-like and bigG-like


@pytest.mark.parametrize("pad", [EOS, 0], ids=["pad_eos", "pad_0"])
@pytest.mark.parametrize("projection,act", CASES, ids=["clip_l", "bigg"])
def test_parity_saved_folder(tmp_path, projection, act, pad):
    torch.set_grad_enabled(False)
    tm = torch_model(projection, act)
    tm.save_pretrained(tmp_path / "text_encoder")
    ours = load_text_encoder(tmp_path / "text_encoder")
    assert ours.config.with_projection == projection and ours.config.eos_token_id == 2

    ids = make_ids([4, 0, 30, 75], pad)  # eos at different positions, incl. empty and full
    hs, pooled = reference(tm, ids, projection)
    h, p = ours(ids)
    assert rel(h, hs[-2]) <= 1e-4
    assert rel(p, pooled) <= 1e-4
    h1, p1 = ours(ids, clip_skip=1)
    assert rel(h1, hs[-3]) <= 1e-4 and rel(p1, pooled) <= 1e-4
    h2, none = ours(mx.array(ids), clip_skip=2, need_pooled=False)
    assert none is None and rel(h2, hs[-4]) <= 1e-4  # hidden_states[0]: the embeddings
    assert h.shape == (4, 77, 48) and p.shape == (4, 40 if projection else 48)


def test_pooling_with_current_eos_rule(tmp_path):
    """Configs with a real eos_token_id pool at the first eos, even when a larger id occurs."""
    torch.set_grad_enabled(False)
    tm = torch_model(True, "gelu", eos_token_id=EOS - 5)
    ids = make_ids([3, 10], 0)
    ids[ids == EOS] = EOS - 5
    ids[:, 1] = EOS - 1  # the largest id is not the eos here
    ours = clip_from_weights(CLIPTextConfig.from_dict(tm.config.to_dict(), with_projection=True), {
        k: mx.array(v.numpy()) for k, v in tm.state_dict().items()})
    hs, pooled = reference(tm, ids, True)
    h, p = ours(ids)
    assert rel(h, hs[-2]) <= 1e-4 and rel(p, pooled) <= 1e-4


def test_prefixed_sharded_and_fp16_files(tmp_path):
    """SDXL's files were written by transformers 4 with `text_model.` keys (and may hold
    position_ids); transformers 5 writes CLIPTextModel without the prefix."""
    torch.set_grad_enabled(False)
    tm = torch_model(False, "quick_gelu")
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert not any(k.startswith("text_model.") for k in sd)
    folder = tmp_path / "text_encoder"
    tm.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    prefixed = {"text_model." + k: v for k, v in sd.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in prefixed.items()},
              str(folder / "model.fp16.safetensors"))

    ids = make_ids([5, 12], EOS)
    hs, pooled = reference(tm, ids, False)
    ours = load_text_encoder(folder)  # only the fp16 variant is there
    assert all(v.dtype == mx.float16 for _, v in tree_flatten(ours.parameters()))
    h, p = ours(ids)
    assert h.dtype == mx.float16 and rel(h, hs[-2]) <= 5e-3 and rel(p, pooled) <= 5e-3
    h32, _ = load_text_encoder(folder, dtype="float32")(ids)
    assert h32.dtype == mx.float32

    sharded = tmp_path / "text_encoder_2"
    tm2 = torch_model(True, "gelu")
    tm2.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = make_ids([7, 1], 0)
    hs, pooled = reference(tm2, ids, True)
    h, p = load_text_encoder(sharded)(ids)
    assert rel(h, hs[-2]) <= 1e-4 and rel(p, pooled) <= 1e-4


def test_config_from_sdxl_files():
    te1 = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
           "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
           "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
           "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
           "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float16",
           "transformers_version": "4.32.0.dev0", "vocab_size": 49408}
    te2 = {**te1, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
           "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}
    c1, c2 = CLIPTextConfig.from_dict(te1), CLIPTextConfig.from_dict(te2)
    assert (c1.hidden_size, c1.num_hidden_layers, c1.hidden_act, c1.with_projection) == (768, 12, "quick_gelu", False)
    assert (c2.hidden_size, c2.num_hidden_layers, c2.hidden_act, c2.with_projection) == (1280, 32, "gelu", True)
    assert c2.eos_token_id == 2 and c2.projection_dim == 1280
    assert CLIPTextConfig.from_dict(te1, with_projection=True).with_projection
    assert not CLIPTextConfig.from_dict(te2, with_projection=False).with_projection


@pytest.mark.parametrize("projection,cfg,count", [
    (False, dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 hidden_act="quick_gelu", projection_dim=768), 123_060_480),
    (True, dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                hidden_act="gelu", projection_dim=1280), 694_659_840),
], ids=["clip_l", "bigg"])
def test_full_size_names_and_shapes(projection, cfg, count):
    """Built lazily (never evaluated); compared with transformers on the meta device."""
    cfg = dict(cfg, vocab_size=49408, max_position_embeddings=77, eos_token_id=2)
    with torch.device("meta"):
        cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
        tm = cls(transformers.CLIPTextConfig(**cfg))
    theirs = {k.removeprefix("text_model."): tuple(v.shape) for k, v in tm.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in tree_flatten(
        CLIPTextModel(CLIPTextConfig(**cfg, with_projection=projection)).parameters())}
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in ours.values()) == count


def tiny_weights():
    tm = torch_model(True, "gelu")  # in memory: text_model.* plus top-level text_projection.weight
    weights = {k: mx.array(v.numpy()) for k, v in tm.state_dict().items()}
    assert "text_model.final_layer_norm.weight" in weights and "text_projection.weight" in weights
    return CLIPTextConfig.from_dict(tm.config.to_dict(), with_projection=True), weights


def test_bad_weights_name_the_keys():
    config, weights = tiny_weights()
    missing = dict(weights)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    del missing["text_projection.weight"]
    with pytest.raises(WeightsError, match=r"2 missing: encoder\.layers\.1\.mlp\.fc2\.bias, text_projection\.weight"):
        clip_from_weights(config, missing)
    wrong = dict(weights)
    wrong["text_model.final_layer_norm.weight"] = mx.zeros((7,))
    wrong["text_model.logit_scale"] = mx.zeros(())
    with pytest.raises(WeightsError, match=r"final_layer_norm\.weight: file \(7,\) vs model \(48,\)") as e:
        clip_from_weights(config, wrong)
    assert "1 unexpected: logit_scale" in str(e.value)
    # a bigG file loaded as a model without projection: the projection is unexpected
    no_proj = CLIPTextConfig(**{**config.__dict__, "with_projection": False})
    with pytest.raises(WeightsError, match=r"unexpected: text_projection\.weight"):
        clip_from_weights(no_proj, weights)


def test_bad_config_and_inputs(tmp_path):
    with pytest.raises(ConfigError, match="relu.*quick_gelu, gelu"):
        CLIPTextConfig.from_dict({**TINY, "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="divisible"):
        CLIPTextConfig.from_dict({**TINY, "num_attention_heads": 5})
    with pytest.raises(ConfigError, match="text_config"):
        CLIPTextConfig.from_dict({"model_type": "clip", "text_config": TINY})
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "hidden_act": "gelu_new"}))
    with pytest.raises(ConfigError, match="gelu_new"):
        load_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(WeightsError, match="no safetensors weights"):
        load_text_encoder(tmp_path)
    with pytest.raises(WeightsError, match="missing config.json"):
        load_text_encoder(tmp_path / "nowhere")

    model = CLIPTextModel(CLIPTextConfig.from_dict(TINY))
    ids = make_ids([3], EOS)
    for bad, msg in [(dict(clip_skip=3), "clip_skip"), (dict(clip_skip=-1), "clip_skip")]:
        with pytest.raises(InputError, match=msg):
            model(ids, **bad)
    with pytest.raises(InputError, match=r"\[0, 600\)"):
        model(ids + 5)
    with pytest.raises(InputError, match="1 to 77"):
        model(np.zeros((1, 78), np.int64))
    with pytest.raises(InputError, match="2-D integer"):
        model(ids[0])
