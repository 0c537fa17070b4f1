"""LoRA / LoCon / LoHa / LoKr adapters (issue 16) on the tiny SDXL models, against diffusers,
peft and lycoris-lora: every format, several at once, text encoders, 4-bit side paths,
unloading, bad files, the command line, metadata and convert --lora."""

import json
import re
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.errors import InputError, WeightsError

from lora_files import (ATTENTION, CONVS, kohya_file, lycoris_deltas, lycoris_file, merge_deltas,
                        old_diffusers_file, peft_file)

torch.set_grad_enabled(False)
PROMPT = "a photo of a cat"
BOUND = 2e-3                 # the parity bound of the pipeline tests (mean absolute difference)
MOVES = 10 * BOUND           # each LoRA moves the image at least this much
RUN = dict(num_inference_steps=5, guidance_scale=15.0, height=64, width=64)


def noise(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 8, 8, 4)).astype(np.float32)


def ours_image(pipe, seed=0, prompt=PROMPT):
    return pipe(prompt, latents=mx.array(noise(seed)), output_type="np", **RUN)


def ref_image(pipe, seed=0, prompt=PROMPT):
    lat = torch.from_numpy(noise(seed)).permute(0, 3, 1, 2).contiguous()
    return pipe(prompt=prompt, latents=lat, output_type="np", **RUN).images


def mad(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).mean())


@pytest.fixture(scope="module")
def ref(tiny_sdxl):
    """A diffusers base pipeline of its own (LoRAs are loaded into it and taken off again)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl[0]), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(tiny_sdxl):
    return SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32)


@pytest.fixture(scope="module")
def plain(ours, ref):
    return ours_image(ours), ref_image(ref)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """One file per format, random weights large enough to move the image by >= 10x the bound."""
    d = tmp_path_factory.mktemp("loras")
    unet_and_convs = re.compile(ATTENTION.pattern + "|" + CONVS.pattern)
    return {
        "kohya_sgm": kohya_file(d / "kohya_sgm.safetensors", ref, std=0.4, sgm=True),
        "kohya_diffusers": kohya_file(d / "kohya_diffusers.safetensors", ref, std=0.4, sgm=False, seed=1),
        "peft": peft_file(d / "peft", ref, std=0.3, seed=2),
        "old_diffusers": old_diffusers_file(d / "old_diffusers.safetensors", ref, std=0.5, seed=3),
        "locon": kohya_file(d / "locon.safetensors", ref, std=1.0, unet_pattern=CONVS, text_encoders=False, seed=4),
        "unet_only": kohya_file(d / "unet_only.safetensors", ref, std=0.4, unet_pattern=unet_and_convs,
                                text_encoders=False, seed=5),
        "te_only": kohya_file(d / "te_only.safetensors", ref, std=0.5, unet_pattern=re.compile("^$"), seed=6),
    }


@pytest.fixture
def clean(ours, ref):
    """Every test starts and ends with no LoRA on either pipeline."""
    yield
    ours.unload_lora()
    ref.unload_lora_weights()


@pytest.mark.parametrize("fmt", ["kohya_sgm", "kohya_diffusers", "peft", "old_diffusers", "locon"])
def test_formats_match_diffusers(fmt, ours, ref, plain, files, clean):
    name = ours.load_lora(files[fmt], 0.8)
    assert ours.loras == {name: 0.8}
    got = ours_image(ours)
    ref.load_lora_weights(str(files[fmt]), adapter_name="a")
    ref.set_adapters(["a"], [0.8])
    want = ref_image(ref)
    assert mad(got, want) <= BOUND, mad(got, want)
    assert mad(want, plain[1]) >= MOVES and mad(got, plain[0]) >= MOVES, (mad(want, plain[1]), mad(got, plain[0]))


def test_several_loras_with_scales_match_set_adapters(ours, ref, plain, files, clean):
    ours.load_lora(files["kohya_sgm"], 0.7, name="a")
    ours.load_lora(files["peft"], -0.5, name="b")
    ours.load_lora(files["locon"], 0.6, name="c")
    assert ours.loras == {"a": 0.7, "b": -0.5, "c": 0.6}
    got = ours_image(ours)
    for name in "abc":
        ref.load_lora_weights(str(files[{"a": "kohya_sgm", "b": "peft", "c": "locon"}[name]]), adapter_name=name)
    ref.set_adapters(["a", "b", "c"], [0.7, -0.5, 0.6])
    assert mad(got, ref_image(ref)) <= BOUND
    ours.set_lora_scale("b", 0.4)
    ref.set_adapters(["a", "b", "c"], [0.7, 0.4, 0.6])
    got = ours_image(ours)
    assert mad(got, ref_image(ref)) <= BOUND
    ours.unload_lora("b")
    ref.set_adapters(["a", "c"], [0.7, 0.6])
    assert ours.loras == {"a": 0.7, "c": 0.6}
    assert mad(ours_image(ours), ref_image(ref)) <= BOUND


# ---------------------------------------------------------------- LyCORIS
def _t(*shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


FORMULA_CASES = {  # kind, tensors (PyTorch layout), target shape (O, I[, kh, kw]), alpha
    "locon": ("lora", dict(down=(4, 8, 3, 3), up=(6, 4, 1, 1)), (6, 8, 3, 3), 2.0),
    "locon_tucker": ("lora", dict(down=(4, 8, 1, 1), mid=(4, 4, 3, 3), up=(6, 4, 1, 1)), (6, 8, 3, 3), 3.0),
    "loha_linear": ("loha", dict(w1a=(6, 4), w1b=(4, 8), w2a=(6, 4), w2b=(4, 8)), (6, 8), 2.0),
    "loha_conv_flat": ("loha", dict(w1a=(6, 4), w1b=(4, 72), w2a=(6, 4), w2b=(4, 72)), (6, 8, 3, 3), None),
    "loha_tucker": ("loha", dict(w1a=(4, 6), w1b=(4, 8), t1=(4, 4, 3, 3), w2a=(4, 6), w2b=(4, 8),
                                 t2=(4, 4, 3, 3)), (6, 8, 3, 3), 1.0),
    "lokr_full": ("lokr", dict(w1=(2, 4), w2=(3, 2)), (6, 8), 7.0),
    "lokr_factored": ("lokr", dict(w1a=(2, 3), w1b=(3, 4), w2a=(3, 3), w2b=(3, 2)), (6, 8), 1.5),
    "lokr_conv": ("lokr", dict(w1=(2, 2), w2a=(3, 2), w2b=(2, 4, 3, 3)), (6, 8, 3, 3), 1.0),
    "lokr_tucker": ("lokr", dict(w1=(2, 2), w2a=(2, 3), w2b=(2, 4), t2=(2, 2, 3, 3)), (6, 8, 3, 3), 1.0),
}


def _lycoris_reference(kind, t, scale):
    from lycoris.functional import lokr, loha, locon

    if kind == "lora":
        return locon.diff_weight(t["down"], t["up"], t.get("mid"), gamma=scale, backend="torch")
    if kind == "loha":
        return loha.diff_weight(t["w1b"], t["w1a"], t["w2b"], t["w2a"], t.get("t1"), t.get("t2"), gamma=scale,
                                backend="torch")
    # kron_weight takes the module's alpha/rank as LokrModule.get_weight passes it (diff_weight takes alpha)
    return lokr.kron_weight(t.get("w1"), t.get("w1a"), t.get("w1b"), t.get("w2"), t.get("w2a"), t.get("w2b"),
                            t.get("t2"), scale=scale, backend="torch")


@pytest.mark.parametrize("case", list(FORMULA_CASES))
def test_formulas_match_lycoris(case):
    """Every LoCon / LoHa / LoKr variant (Tucker cores, factored halves, convs) against lycoris-lora's functions."""
    from mlx_sdxl.lora.deltas import delta_shape, fits, torch_delta
    from mlx_sdxl.lora.formats import LayerWeights
    from mlx_sdxl.lora.keys import Target

    kind, shapes, shape, alpha = FORMULA_CASES[case]
    t = {k: _t(*s, seed=i) for i, (k, s) in enumerate(shapes.items())}
    layer = LayerWeights("x", kind, {k: mx.array(v.numpy()) for k, v in t.items()}, alpha)
    target = Target("unet", "x", len(shape) == 4, shape)
    assert fits(delta_shape(layer), target)
    want = _lycoris_reference(kind, t, layer.scale).reshape(shape).numpy()
    got = np.array(torch_delta(layer, target))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
    if case == "lokr_full":
        assert layer.scale == 1.0  # two full matrices: alpha is ignored, as in LyCORIS
    elif alpha is None:
        assert layer.scale == 1.0  # no alpha: alpha = rank


@pytest.mark.parametrize("algo, kwargs, std", [("loha", {}, 0.5), ("loha", {"use_tucker": True}, 0.5),
                                               ("lokr", {"factor": 4}, 0.35)], ids=["loha", "loha_tucker", "lokr"])
def test_lycoris_files_match_lycoris_and_merged_diffusers(algo, kwargs, std, ours, tiny_sdxl, plain, tmp_path, clean):
    """LoHa / LoKr files made by lycoris-lora: our merged weights equal lycoris' deltas, and our image
    equals a diffusers pipeline with those deltas merged into its weights."""
    from diffusers import StableDiffusionXLPipeline
    from mlx.utils import tree_flatten

    merged = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl[0]), dtype=torch.float32)
    merged.set_progress_bar_config(disable=True)
    path = lycoris_file(tmp_path / f"{algo}.safetensors", merged, algo, std=std, **kwargs)
    deltas = lycoris_deltas(path, merged)
    scale = 0.9
    ours.load_lora(path, scale)
    parts = {"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
    before = {p: dict(tree_flatten(SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32).models.get(
        ours.base, p).parameters())) for p in parts.values()}
    worst = 0.0
    for (prefix, module), delta in deltas.items():
        part = parts[prefix]
        path_ = module[len("text_model."):] if module.startswith("text_model.") else module
        w = dict(tree_flatten(ours.models.get(ours.base, part).parameters()))[path_ + ".weight"]
        got = np.array(w) - np.array(before[part][path_ + ".weight"])
        got = got.transpose(0, 3, 1, 2) if got.ndim == 4 else got
        want = scale * delta.numpy()
        worst = max(worst, np.linalg.norm(got - want) / np.linalg.norm(want))
    assert len(deltas) > 100 and worst <= 1e-5, worst
    merge_deltas(merged, deltas, scale)
    got = ours_image(ours)
    assert mad(got, ref_image(merged)) <= BOUND, mad(got, ref_image(merged))
    assert mad(got, plain[0]) >= MOVES, mad(got, plain[0])


# ---------------------------------------------------------------- text encoders
def test_text_encoder_embeddings_match_diffusers(ours, ref, files, clean):
    """Pooled and penultimate embeddings of both text encoders with a LoRA on them, against diffusers."""
    plain = [np.array(x) for x in ours.encode_prompt(PROMPT, "blurry")]
    ours.load_lora(files["te_only"], 0.9)
    ref.load_lora_weights(str(files["te_only"]), adapter_name="te")
    ref.set_adapters(["te"], [0.9])
    pe, npe, pooled, npooled = (np.array(x) for x in ours.encode_prompt(PROMPT, "blurry"))
    want = [t.numpy() for t in ref.encode_prompt(PROMPT, negative_prompt="blurry", device="cpu")]
    for got, exp, before in zip((pe, npe, pooled, npooled), want, plain):
        assert np.abs(got - exp).max() <= 1e-4 * max(1.0, np.abs(exp).max())
        assert np.abs(got - before).mean() >= 0.05 * np.abs(before).mean()  # the LoRA moved it
    assert mad(pe[..., :64], plain[0][..., :64]) > 0 and mad(pe[..., 64:], plain[0][..., 64:]) > 0  # CLIP-L and bigG


# ---------------------------------------------------------------- unloading
def test_unload_is_bit_identical_and_scale_zero_is_unloaded(ours, plain, files, clean):
    never = ours_image(ours)
    np.testing.assert_array_equal(never, plain[0])
    ours.load_lora(files["kohya_sgm"], 1.0, name="a")
    ours.load_lora(files["locon"], -0.7, name="b")
    assert mad(ours_image(ours), never) >= MOVES
    ours.set_lora_scale("a", 0.0)
    ours.set_lora_scale("b", 0.0)
    assert ours.loras == {"a": 0.0, "b": 0.0}
    assert mad(ours_image(ours), never) <= 1e-6  # scale 0: as unloaded, within float noise
    ours.set_lora_scale("a", 0.5)
    ours.unload_lora("a")
    ours.set_lora_scale("b", 1.0)
    ours.unload_lora()
    assert ours.loras == {}
    np.testing.assert_array_equal(ours_image(ours), never)  # weights read back from the files: the same bits


def test_unload_reads_the_weights_back_from_the_source(ours, files, clean, monkeypatch):
    """Unloading reloads the changed tensors from the model's files, never subtracts."""
    from mlx_sdxl.lora import apply

    ours.models.get(ours.base, "unet")
    ours.load_lora(files["locon"], 1.0)
    calls = []
    real = ours.models._originals

    def counted(source, part):
        read = real(source, part)

        def wrapped(paths):
            calls.append((part, len(paths)))
            return read(paths)
        return wrapped

    monkeypatch.setattr(ours.models, "_originals", counted)
    ours.unload_lora()
    assert calls and all(part == "unet" and n > 0 for part, n in calls)
    assert apply.fused_weight  # fused layers, not side paths, on a dense model


# ---------------------------------------------------------------- a shared text encoder
def test_base_lora_does_not_reach_the_refiners_shared_text_encoder(tiny_sdxl, files):
    from mlx.utils import tree_flatten

    pipe = SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32)
    kw = dict(num_inference_steps=5, height=64, width=64, seed=1, output_type="np")
    before = pipe(PROMPT, **kw)
    shared = pipe.models.get(pipe.refiner, "text_encoder_2")
    assert shared is pipe.models.get(pipe.base, "text_encoder_2")
    refiner_embeds = np.array(pipe.encode_prompt(PROMPT, stage="refiner")[0])
    plain_weights = {k: np.array(v) for k, v in tree_flatten(shared.parameters())}
    pipe.load_lora(files["te_only"], 1.0)
    base_te2 = pipe.models.get(pipe.base, "text_encoder_2")
    assert base_te2 is not pipe.models.get(pipe.refiner, "text_encoder_2")
    assert pipe.models.get(pipe.refiner, "text_encoder_2") is shared
    assert all(np.array_equal(np.array(v), plain_weights[k]) for k, v in tree_flatten(shared.parameters()))
    np.testing.assert_array_equal(np.array(pipe.encode_prompt(PROMPT, stage="refiner")[0]), refiner_embeds)
    assert mad(pipe(PROMPT, **kw), before) > 1e-3
    pipe.unload_lora()
    assert pipe.models.get(pipe.base, "text_encoder_2") is shared  # one shared model again
    assert len([k for k, _ in pipe.models.loaded() if k == "text_encoder_2"]) == 1
    np.testing.assert_array_equal(pipe(PROMPT, **kw), before)


def test_refiner_target_matches_diffusers_img2img(tiny_sdxl, tmp_path, monkeypatch):
    """target="refiner": the refiner's UNet and text encoder, as diffusers' img2img pipeline loads it;
    given for the base, the same file is refused before anything changes."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_mod
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    refiner_ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_sdxl[1]), dtype=torch.float32)
    refiner_ref.set_progress_bar_config(disable=True)
    # diffusers names: diffusers' SGM converter reads the refiner's `output_blocks.2.1.conv` (the upsampler
    # of a level without attention) as `up_blocks.0.attentions.2.conv` and drops it; we map it by SGM's
    # layout (single_file.unet_key) to up_blocks.0.upsamplers.0.conv
    path = kohya_file(tmp_path / "refiner.safetensors", refiner_ref, std=0.5, seed=7, sgm=False,
                      unet_pattern=re.compile(ATTENTION.pattern + "|" + CONVS.pattern))
    pipe = SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32)
    rng = np.random.default_rng(5)
    image = rng.uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    eps = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    monkeypatch.setattr(img2img_mod, "randn_tensor", lambda *a, **k: torch.from_numpy(eps).permute(0, 3, 1, 2))
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    kw = dict(strength=0.6, num_inference_steps=10, guidance_scale=15.0, output_type="np")

    def ours_refine():
        return pipe.refine(image, PROMPT, noise=eps, sample_posterior=False, **kw)

    before = ours_refine()
    with pytest.raises(WeightsError, match="refiner") as e:
        pipe.load_lora(path)
    assert "target='refiner'" in str(e.value) and "layers match" in str(e.value)
    assert pipe.loras == {}
    np.testing.assert_array_equal(ours_refine(), before)
    pipe.load_lora(path, 1.0, target="refiner")
    got = ours_refine()
    refiner_ref.load_lora_weights(str(path), adapter_name="r")
    refiner_ref.set_adapters(["r"], [1.0])
    want = refiner_ref(prompt=PROMPT, image=torch.from_numpy(image).permute(0, 3, 1, 2), **kw).images
    assert mad(got, want) <= BOUND, mad(got, want)
    assert mad(got, before) >= MOVES, mad(got, before)
    assert pipe.models.key(pipe.base, "unet") == pipe.models.key(pipe.base, "unet")[:1] + (
        pipe.base.fingerprints["unet"],)  # the base is untouched
    pipe.unload_lora()
    np.testing.assert_array_equal(ours_refine(), before)


# ---------------------------------------------------------------- 4-bit models
def _quantized_layers(model):
    from mlx_sdxl.quantize import QConv2d, QLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (QLinear, QConv2d))}


@pytest.mark.parametrize("fmt", ["unet_only", "loha"])
def test_quantized_base_keeps_the_lora_effect_without_dense_copies(fmt, tiny_sdxl, ours, plain, files, ref, tmp_path,
                                                                   clean):
    """Base at 4 bits + LoRA against dense base + LoRA: the LoRA's own effect is the same within 10%; the
    packed weights stay as they are, LoRAs run beside them (LoRA factors; LoHa as its dense delta)."""
    path = files["unet_only"] if fmt == "unet_only" else lycoris_file(
        tmp_path / "loha.safetensors", ref, "loha", std=0.4, text_encoders=False)
    q = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32, base_bits=4, group_size=32)
    q0 = ours_image(q)
    unet = q.models.get(q.base, "unet")
    packed = {n: (type(m), m.weight) for n, m in _quantized_layers(unet).items()}
    dense_bytes = sum(int(np.prod(m.dense_weight().shape)) * 4 for m in _quantized_layers(unet).values())
    mx.clear_cache()
    before = mx.get_active_memory()
    q.load_lora(path, 1.0)
    grown = mx.get_active_memory() - before
    layers = _quantized_layers(q.models.get(q.base, "unet"))
    assert {n: (type(m), m.weight) for n, m in layers.items()}.keys() == packed.keys()
    assert all(type(m) is packed[n][0] and m.weight is packed[n][1] for n, m in layers.items())
    sides = [m.side for m in layers.values() if m.side is not None]
    assert len(sides) > 50
    if fmt == "unet_only":  # rank-4 factors only: no (O, I) array anywhere
        assert all(s.dense is None and s.down.shape[0] == 4 and s.up.shape[1] == 4 for s in sides)
        assert grown < 0.5 * dense_bytes, (grown, dense_bytes)
    else:
        assert all(s.down is None and s.dense is not None for s in sides)
    q1 = ours_image(q)
    ours.load_lora(path, 1.0)
    d1 = ours_image(ours)
    dense_effect, q_effect = mad(d1, plain[0]), mad(q1, q0)
    assert dense_effect >= MOVES
    assert abs(q_effect - dense_effect) <= 0.1 * dense_effect, (q_effect, dense_effect)
    q.unload_lora()
    assert all(m.side is None for m in _quantized_layers(q.models.get(q.base, "unet")).values())
    np.testing.assert_array_equal(ours_image(q), q0)


# ---------------------------------------------------------------- bad files
def _save(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _sd15_lora(path):
    """kohya keys of an SD 1.5 LoRA: one text encoder (lora_te_), 768-wide cross-attention, attention in
    down_blocks.0 (SDXL's first level has none)."""
    rng = np.random.default_rng(0)
    t = {}
    for name, (o, i) in {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
                         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
                         "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}.items():
        t[f"{name}.lora_down.weight"] = rng.standard_normal((4, i))
        t[f"{name}.lora_up.weight"] = rng.standard_normal((o, 4))
        t[f"{name}.alpha"] = np.float32(4)
    return _save(path, t)


def _flux_lora(path):
    rng = np.random.default_rng(0)
    return _save(path, {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": rng.standard_normal((4, 64)),
                        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": rng.standard_normal((64, 4)),
                        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": rng.standard_normal((4, 64)),
                        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": rng.standard_normal((192, 4))})


def _dora(path, files):
    from safetensors.numpy import load_file

    t = load_file(str(files["kohya_diffusers"]))
    for k in [k for k in t if k.endswith(".lora_down.weight")][:3]:
        t[k.replace("lora_down.weight", "dora_scale")] = np.ones((1, t[k].shape[1]), np.float32)
    return _save(path, t)


def _truncated(path, files):
    data = files["kohya_sgm"].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD = {
    "sd15": (lambda p, f: _sd15_lora(p), r"SD 1\.x.*(lora_te_|768)"),
    "flux": (lambda p, f: _flux_lora(p), r"Flux"),
    "truncated": (_truncated, r"truncated"),
    "dora": (_dora, r"DoRA"),
    "pickle": (lambda p, f: (p.with_suffix(".ckpt").write_bytes(b"x"), p.with_suffix(".ckpt"))[1], r"pickle"),
    "missing": (lambda p, f: p.parent / "nope.safetensors", r"not found"),
    "checkpoint": (lambda p, f: _save(p, {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((4, 4))}),
                   r"not a LoRA file"),
}


@pytest.fixture(scope="module")
def with_good(ours, files):
    """The image with one good LoRA loaded, which a refused file must leave as it is."""
    ours.load_lora(files["kohya_sgm"], 0.5, name="good")
    image = ours_image(ours)
    ours.unload_lora()
    return image


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_refused_before_any_change(case, ours, with_good, files, tmp_path, clean):
    make, match = BAD[case]
    path = make(tmp_path / f"{case}.safetensors", files)
    ours.load_lora(files["kohya_sgm"], 0.5, name="good")
    with pytest.raises(WeightsError, match=match):
        ours.load_lora(path, 1.0)
    assert ours.loras == {"good": 0.5}
    np.testing.assert_array_equal(ours_image(ours), with_good)  # the pipeline still makes the same images


def test_bad_arguments(ours, files, clean):
    ours.load_lora(files["locon"], name="x")
    with pytest.raises(InputError, match="already loaded"):
        ours.load_lora(files["locon"], name="x")
    for scale in (float("nan"), "1", True):
        with pytest.raises(InputError, match="finite number"):
            ours.load_lora(files["locon"], scale, name="y")
        with pytest.raises(InputError, match="finite number"):
            ours.set_lora_scale("x", scale)
    with pytest.raises(InputError, match="no LoRA named 'z'"):
        ours.set_lora_scale("z", 1.0)
    with pytest.raises(InputError, match="no LoRA named"):
        ours.unload_lora("z")
    with pytest.raises(InputError, match="stage must be"):
        ours.load_lora(files["locon"], target="both")
    with pytest.raises(InputError, match="no refiner"):
        ours.load_lora(files["locon"], target="refiner")
    assert ours.loras == {"x": 1.0}


def test_partial_match_warns_once_with_count_and_names(ours, files, tmp_path, clean):
    from safetensors.numpy import load_file

    from mlx_sdxl.lora import LoraWarning

    t = load_file(str(files["kohya_diffusers"]))
    t["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = np.zeros((4, 64), np.float32)
    t["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = np.zeros((64, 4), np.float32)
    t["something_else.weight"] = np.zeros((2,), np.float32)
    path = _save(tmp_path / "partial.safetensors", t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours.load_lora(path)
    msgs = [str(w.message) for w in caught if issubclass(w.category, LoraWarning)]
    assert len(msgs) == 1 and "2 of its" in msgs[0] and "down_blocks_9" in msgs[0] and "something_else" in msgs[0]


# ---------------------------------------------------------------- compiled steps, low memory, sources
def test_compiled_and_low_memory_pipelines_apply_loras(tiny_sdxl, ours, files, clean):
    ours.load_lora(files["kohya_sgm"], 0.7)
    want = ours_image(ours)
    compiled = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32, compile=True)
    plain = ours_image(compiled)  # compiles the plain UNet first
    compiled.load_lora(files["kohya_sgm"], 0.7)
    np.testing.assert_allclose(ours_image(compiled), want, atol=2e-5)  # a fresh compiled forward
    compiled.unload_lora()
    np.testing.assert_allclose(ours_image(compiled), plain, atol=2e-6)
    lean = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32, low_memory=True)
    lean.load_lora(files["kohya_sgm"], 0.7)
    for _ in range(2):  # models are released after each call and the LoRA applied again as they load
        np.testing.assert_array_equal(ours_image(lean), want)
    assert lean.models.loaded() == [("vae", lean.base.fingerprints["vae"])]


def test_sources_folder_and_hub_cache(ours, files, tmp_path, monkeypatch, clean):
    from mlx_sdxl.lora import lora_path

    assert lora_path(files["peft"].parent) == files["peft"]  # diffusers' pytorch_lora_weights.safetensors
    folder = tmp_path / "two"
    folder.mkdir()
    for n in ("a", "b"):
        (folder / f"{n}.safetensors").write_bytes(files["locon"].read_bytes())
    with pytest.raises(WeightsError, match="holds 2 .safetensors files"):
        lora_path(folder)
    # a hub id from the offline cache (HF_HUB_OFFLINE=1 in the tests)
    snap = tmp_path / "hub" / "models--someone--tiny-lora" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "tiny.safetensors").write_bytes(files["locon"].read_bytes())
    (tmp_path / "hub" / "models--someone--tiny-lora" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-lora" / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert lora_path("someone/tiny-lora").name == "tiny.safetensors"
    assert lora_path("someone/tiny-lora/tiny.safetensors").name == "tiny.safetensors"
    assert ours.load_lora("someone/tiny-lora") == "tiny"
    with pytest.raises(WeightsError, match="not in the local cache"):
        lora_path("someone/other-lora")


def test_prompt_tags():
    from mlx_sdxl.lora import parse_lora_tags, strip_lora_tags

    text, tags = parse_lora_tags("a cat <lora:style:0.8>, <LORA:sub/char> and <lyco:x:-1.5>, BREAK (red:1.2)")
    assert text == "a cat ,  and , BREAK (red:1.2)"
    assert [(t.name, t.scale) for t in tags] == [("style", 0.8), ("sub/char", 1.0), ("x", -1.5)]
    assert strip_lora_tags("<lora:a:1>x") == "x" and strip_lora_tags("no tags") == "no tags"
    for bad, match in (("<lora:a:b>", "not a number"), ("<lora::1>", "no LoRA name"), ("<lora:a:1:0.5>", "separate"),
                       ("<lora:a:inf>", "finite")):
        with pytest.raises(InputError, match=match):
            parse_lora_tags(bad)


def test_a1111_syntax_keeps_lora_tags_from_the_text_encoders(tiny_sdxl):
    """In the Python API with prompt_syntax="a1111", <lora:...> tags never reach CLIP (as in A1111);
    in "plain" syntax the text is the text, as diffusers reads it."""
    from mlx_sdxl.prompt_tokens import tokenize_prompt
    from mlx_sdxl.sources import diffusers_folder

    tok = diffusers_folder(tiny_sdxl[0]).tokenizer("tokenizer")
    tagged = tokenize_prompt(tok, "a red cat <lora:style:0.8>", "a1111")
    clean = tokenize_prompt(tok, "a red cat ", "a1111")
    assert np.array_equal(tagged.ids, clean.ids) and np.array_equal(tagged.weights, clean.weights)
    assert not np.array_equal(tokenize_prompt(tok, "a red cat <lora:style:0.8>", "plain").ids,
                              tokenize_prompt(tok, "a red cat ", "plain").ids)


# ---------------------------------------------------------------- command line, metadata, convert
def _cli(*argv):
    import contextlib
    import io

    from mlx_sdxl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _pixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


@pytest.fixture(scope="module")
def lora_dir(files, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_dir")
    (d / "styles").mkdir()
    (d / "styles" / "ink.safetensors").write_bytes(files["te_only"].read_bytes())
    (d / "flagged.safetensors").write_bytes(files["locon"].read_bytes())
    return d


def test_cli_lora_flags_tags_metadata_and_from(tiny_sdxl, lora_dir, tmp_path):
    from mlx_sdxl.lora import short_hash
    from mlx_sdxl.metadata import read_metadata

    base = str(tiny_sdxl[0])
    common = ["--model", base, "--refiner", "none", "--width", "64", "--height", "64", "--dtype", "float32",
              "--steps", "4", "--seed", "3", "--lora-dir", lora_dir]
    prompt = f"{PROMPT} <lora:ink:0.6>"
    rc, out, err = _cli("generate", prompt, *common, "--lora", f"{lora_dir / 'flagged.safetensors'}:-0.8",
                        "--output", tmp_path / "a.png")
    assert rc == 0, err
    settings = read_metadata(tmp_path / "a.png")
    assert settings["prompt"] == prompt  # recorded as written
    assert settings["loras"] == [{"name": "ink", "scale": 0.6, "hash": short_hash(lora_dir / "styles" / "ink.safetensors")},
                                 {"name": "flagged", "scale": -0.8, "hash": short_hash(lora_dir / "flagged.safetensors")}]
    from PIL import Image

    with Image.open(tmp_path / "a.png") as im:
        infotext = im.info["parameters"]
    assert f"Lora hashes: \"ink: {settings['loras'][0]['hash']}, flagged: {settings['loras'][1]['hash']}\"" in infotext
    # the same image from Python, the tag removed from the text sent to CLIP
    pipe = SDXLPipeline.from_pretrained(base, dtype=mx.float32)
    pipe.load_lora(lora_dir / "styles" / "ink.safetensors", 0.6)
    pipe.load_lora(lora_dir / "flagged.safetensors", -0.8)
    want = pipe.generate(PROMPT + " ", num_inference_steps=4, height=64, width=64, seed=3, prompt_syntax="a1111")
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png"), np.asarray(want.images[0]))
    tagged = pipe.generate(prompt, num_inference_steps=4, height=64, width=64, seed=3, prompt_syntax="a1111")
    np.testing.assert_array_equal(np.asarray(tagged.images[0]), np.asarray(want.images[0]))  # tags never reach CLIP
    pipe.unload_lora()
    plain = pipe.generate(PROMPT + " ", num_inference_steps=4, height=64, width=64, seed=3, prompt_syntax="a1111")
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(want.images[0]))  # LoRAs change it
    # --from loads both again: the tag from the prompt, the other by name from the LoRA folder
    models = ["--models-dir", tiny_sdxl[0].parent]
    rc, out, err = _cli("generate", "--from", tmp_path / "a.png", "--lora-dir", lora_dir, *models,
                        "--output", tmp_path / "b.png")
    assert rc == 0, err
    np.testing.assert_array_equal(_pixels(tmp_path / "b.png"), _pixels(tmp_path / "a.png"))
    assert read_metadata(tmp_path / "b.png")["loras"] == settings["loras"]
    # a recorded LoRA that is not here: one clear error line, before any model loads
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ink.safetensors").write_bytes((lora_dir / "styles" / "ink.safetensors").read_bytes())
    rc, out, err = _cli("generate", "--from", tmp_path / "a.png", "--lora-dir", partial, *models,
                        "--output", tmp_path / "c.png")
    assert rc == 2 and "not in the LoRA folder" in err and not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("prompt, match", [(f"{PROMPT} <lora:missing:0.5>", "no missing.safetensors"),
                                           (f"{PROMPT} <lora:ink:x>", "not a number")])
def test_cli_bad_tags_exit_2_before_loading(prompt, match, lora_dir, tmp_path, monkeypatch):
    import mlx_sdxl.pipeline as pipeline

    monkeypatch.setattr(pipeline.SDXLPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    rc, out, err = _cli("generate", prompt, "--model", tmp_path, "--refiner", "none", "--lora-dir", lora_dir,
                        "--output", tmp_path / "x.png")
    assert rc == 2 and match in err and err.count("\n") == 1 and not (tmp_path / "x.png").exists()


def test_metadata_lora_hashes_round_trip():
    from mlx_sdxl.metadata import format_parameters, parse_parameters

    text = format_parameters({"prompt": "a <lora:ink:0.6>", "num_inference_steps": 4, "seed": 1,
                              "guidance_scale": 5.0, "loras": [{"name": "ink", "scale": 0.6, "hash": "abc123def456"},
                                                               {"name": "b", "scale": 1.0, "hash": "0123456789ab"}]})
    assert 'Lora hashes: "ink: abc123def456, b: 0123456789ab"' in text
    assert parse_parameters(text)["loras"] == [{"name": "ink", "hash": "abc123def456"},
                                               {"name": "b", "hash": "0123456789ab"}]


def test_convert_bakes_loras(tiny_sdxl, files, tmp_path):
    from convert import convert

    out = convert(tiny_sdxl[0], tmp_path / "baked", dtype="float32", log=None,
                  loras=[f"{files['kohya_sgm']}:0.7", f"{files['locon']}:-0.4"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["name"], e["scale"]) for e in manifest["loras"]] == [("kohya_sgm", 0.7), ("locon", -0.4)]
    assert all(len(e["hash"]) == 12 and e["source"].endswith(".safetensors") for e in manifest["loras"])
    live = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32)
    live.load_lora(files["kohya_sgm"], 0.7)
    live.load_lora(files["locon"], -0.4)
    baked = SDXLPipeline.from_pretrained(out, dtype=mx.float32)
    np.testing.assert_array_equal(ours_image(baked), ours_image(live))
    with pytest.raises(WeightsError, match="DoRA|not found"):
        convert(tiny_sdxl[0], tmp_path / "never", dtype="float32", log=None, loras=[str(tmp_path / "nope.safetensors")])
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- full size
@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").environ.get("MLX_SDXL_SLOW"), reason="set MLX_SDXL_SLOW=1 to run full-size checks")
def test_full_size_kohya_lora_maps_every_key(tmp_path):
    """A random rank-32 kohya LoRA (SGM names, fp16, ~170 MB) on every attention and feed-forward Linear of the
    full-size base UNet, plus both text encoders' layers: every key maps, no shape differs. SGM names come from
    tests/sgm_inverse.py (written independently of mlx_sdxl.single_file). About 30 s."""
    from diffusers import UNet2DConditionModel as TorchUNet
    from safetensors.torch import save_file

    from bench.models import FULL
    from mlx_sdxl.lora import RoleLayers, match_layers, read_lora_file
    from mlx_sdxl.models.unet import SDXL_BASE_CONFIG
    from sgm_inverse import unet_to_sgm

    with torch.device("meta"):
        unet = TorchUNet.from_config(SDXL_BASE_CONFIG)
    keys = list(unet.state_dict())
    sgm = dict(zip(keys, unet_to_sgm({k: torch.zeros(1) for k in keys})))
    pattern = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, module in unet.named_modules():
        if pattern.search(name):
            o, i = module.weight.shape
            kohya = "lora_unet_" + sgm[name + ".weight"][len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            sd[f"{kohya}.lora_down.weight"] = torch.randn(32, i, generator=gen).half()
            sd[f"{kohya}.lora_up.weight"] = torch.randn(o, 32, generator=gen).half()
            sd[f"{kohya}.alpha"] = torch.tensor(16.0).half()
    for prefix, cfg in (("lora_te1", FULL["base"]["text_encoder"]), ("lora_te2", FULL["base"]["text_encoder_2"])):
        for layer in range(cfg["num_hidden_layers"]):
            for proj, (o, i) in {"self_attn_q_proj": (1, 1), "mlp_fc1": (4, 1), "mlp_fc2": (1, 4)}.items():
                name = f"{prefix}_text_model_encoder_layers_{layer}_{proj}"
                sd[f"{name}.lora_down.weight"] = torch.zeros(8, i * cfg["hidden_size"]).half()
                sd[f"{name}.lora_up.weight"] = torch.zeros(o * cfg["hidden_size"], 8).half()
    path = tmp_path / "full.safetensors"
    save_file(sd, str(path))
    assert 150e6 < path.stat().st_size < 200e6
    lora = read_lora_file(path)
    matched = match_layers(lora, RoleLayers(FULL["base"]))
    assert matched.unmatched == [] and matched.mismatched == []
    assert len(matched.parts["unet"]) == 700 and matched.count == len(lora.layers) == 700 + 3 * (12 + 32)
    assert all(layer.scale == 0.5 for layer, _ in matched.parts["unet"].values())
