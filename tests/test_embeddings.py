"""SDXL textual-inversion embeddings: end to end against diffusers' load_textual_inversion
(clip_l into text_encoder/tokenizer, clip_g into text_encoder_2/tokenizer_2), in both
prompt syntaxes, and the files and tokens that are refused."""

import hashlib

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.embeddings import named_in, read_embedding
from mlx_sdxl.errors import InputError, SDXLError, WeightsError
from tiny import TE1_WIDTH, TE2_WIDTH, tiny_vocab

torch.set_grad_enabled(False)
EOS = tiny_vocab()[0]["<|endoftext|>"]
PROMPT = "a photo of foxstyle in snow"
NEGATIVE = "blurry"
STEPS, FRAC = 10, 0.8


def write_embedding(path, n=3, w1=TE1_WIDTH, w2=TE2_WIDTH, seed=0, **extra):
    """An SDXL embedding file; its vectors have the tiny token tables' scale (std 0.2)."""
    rng = np.random.default_rng(seed)
    tensors = {"clip_l": (0.2 * rng.standard_normal((n, w1))).astype(np.float32),
               "clip_g": (0.2 * rng.standard_normal((n, w2))).astype(np.float32), **extra}
    save_file({k: v for k, v in tensors.items() if v is not None}, str(path))
    return path


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def emb_path(tmp_path_factory):
    return write_embedding(tmp_path_factory.mktemp("emb") / "foxstyle.safetensors")


@pytest.fixture(scope="module")
def ours(tiny_sdxl, emb_path):
    pipe = SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32)
    pipe.load_embedding(emb_path)
    return pipe


@pytest.fixture(scope="module")
def diffusers_pipes(tiny_sdxl, emb_path):
    """Fresh diffusers pipelines (the session's are shared) with the embedding loaded. The tiny
    encoders carry SDXL's legacy eos_token_id 2, with which transformers pools at the largest id,
    i.e. at the added token; A1111 and mlx_sdxl pool at the end token, so the reference is told
    the end token's id."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl[0]), add_watermarker=False)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_sdxl[1]), add_watermarker=False)
    state = load_file(str(emb_path))
    base.load_textual_inversion(state["clip_l"], token="foxstyle", text_encoder=base.text_encoder,
                                tokenizer=base.tokenizer)
    for pipe in (base, refiner):
        pipe.load_textual_inversion(state["clip_g"], token="foxstyle", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def _fix_eos(pipes, eos):
    for pipe in pipes:
        for enc in (pipe.text_encoder, pipe.text_encoder_2):
            if enc is not None:  # transformers 5 keeps it on the model, 4 on its text_model
                getattr(enc, "text_model", enc).eos_token_id = eos


def diffusers_run(base, refiner, noise, prompt):
    lat = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous()
    common = dict(prompt=prompt, negative_prompt=NEGATIVE, num_inference_steps=STEPS)
    handoff = base(latents=lat, denoising_end=FRAC, output_type="latent", height=64, width=64, **common).images
    return refiner(image=handoff, denoising_start=FRAC, output_type="np", **common).images


def ours_run(pipe, noise, prompt, syntax="plain", output_type="np"):
    return np.array(pipe(prompt, NEGATIVE, latents=mx.array(noise), num_inference_steps=STEPS, high_noise_frac=FRAC,
                         height=64, width=64, output_type=output_type, prompt_syntax=syntax))


def test_matches_diffusers_load_textual_inversion(ours, diffusers_pipes):
    base, refiner = diffusers_pipes
    _fix_eos(diffusers_pipes, EOS)
    noise = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    want = diffusers_run(base, refiner, noise, PROMPT)
    for syntax in ("plain", "a1111"):
        got = ours_run(ours, noise, PROMPT, syntax)
        assert np.abs(got - want).mean() <= 2e-3, syntax
    pe, npe, pp, npp = ours.encode_prompt(PROMPT, NEGATIVE)
    ref = base.encode_prompt(PROMPT, negative_prompt=NEGATIVE, device="cpu", num_images_per_prompt=1,
                             do_classifier_free_guidance=True)
    for g, w in zip((pe, npe, pp, npp), ref):
        assert rel(np.array(g), w.numpy()) <= 1e-5


def test_embedding_changes_the_output(ours, tiny_sdxl):
    """The embedding's vectors, not the letters of its token, reach the UNets (latents against
    the pipeline parity bound, rel L2 1e-4)."""
    noise = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    without = SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32)
    with_emb = ours_run(ours, noise, PROMPT, output_type="latent")
    assert rel(with_emb, ours_run(without, noise, PROMPT, output_type="latent")) > 10 * 1e-4
    weighted = ours_run(ours, noise, "a photo of (foxstyle:1.4) in snow", "a1111", "latent")
    assert rel(weighted, with_emb) > 10 * 1e-4
    pe, *_ = ours.encode_prompt("FoxStyle", prompt_syntax="a1111")  # found ignoring case, as CLIP lowercases
    np.testing.assert_array_equal(np.array(pe), np.array(ours.encode_prompt("foxstyle", prompt_syntax="a1111")[0]))


def test_pooled_at_the_end_token_with_the_legacy_config(ours, diffusers_pipes):
    """transformers with eos_token_id 2 pools at the added token; we pool at the end token."""
    base, _ = diffusers_pipes
    _fix_eos(diffusers_pipes, 2)
    try:
        legacy = base.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[2].numpy()
    finally:
        _fix_eos(diffusers_pipes, EOS)
    fixed = base.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                               do_classifier_free_guidance=False)[2].numpy()
    got = np.array(ours.encode_prompt(PROMPT, do_cfg=False)[2])
    assert rel(got, fixed) <= 1e-5 and rel(got, legacy) > 1e-2


def test_embedding_in_a_long_prompt_stays_whole(ours):
    """An embedding's 3 vectors never straddle a chunk boundary: they move to the next chunk."""
    from mlx_sdxl.prompt_tokens import tokenize_prompt

    tok = ours.base.tokenizer("tokenizer")
    matcher = ours.embeddings.matcher(tok, "clip_l", 10_000)
    got = tokenize_prompt(tok, " ".join(["cat"] * 73) + " (foxstyle:1.2) dog", "a1111", matcher)
    assert got.chunks == 2 and got.used == ("foxstyle",)
    assert list(got.ids[1, 1:4]) == [10_000, 10_001, 10_002]
    np.testing.assert_allclose(got.weights[1, 1:4], 1.2)


def test_embeddings_used_are_recorded_with_a1111_hashes(ours, emb_path):
    digest = hashlib.sha256(emb_path.read_bytes()).hexdigest()[:12]  # A1111: the file's SHA-256, 12 digits
    kw = dict(num_inference_steps=2, height=64, width=64, seed=0, output_type="latent")
    assert ours.generate(PROMPT, **kw).settings[0]["embeddings"] == {"foxstyle": digest}
    assert ours.generate("a cat", "foxstyle", **kw).settings[0]["embeddings"] == {"foxstyle": digest}
    assert "embeddings" not in ours.generate("a cat", **kw).settings[0]
    assert read_embedding(emb_path).shorthash == digest


def test_clip_extra_rows_equal_a_grown_token_table(tiny_sdxl, tmp_path):
    """Ids past the vocabulary read `extra_embeddings`, as transformers reads rows appended to
    its token table (resize_token_embeddings)."""
    from transformers import CLIPTextModelWithProjection

    from mlx_sdxl.models.clip import load_text_encoder

    ref = CLIPTextModelWithProjection.from_pretrained(str(tiny_sdxl[0] / "text_encoder_2")).eval()
    ours = load_text_encoder(tiny_sdxl[0] / "text_encoder_2")
    vocab = ref.config.vocab_size
    extra = (0.2 * np.random.default_rng(2).standard_normal((3, TE2_WIDTH))).astype(np.float32)
    ref.resize_token_embeddings(vocab + 3)
    ref.get_input_embeddings().weight[vocab:] = torch.from_numpy(extra)
    getattr(ref, "text_model", ref).eos_token_id = EOS
    ids = np.full((2, 77), 0, np.int64)
    ids[0, :8] = [EOS - 1, 320, vocab, vocab + 1, vocab + 2, 518, EOS, 0]
    ids[1, :5] = [EOS - 1, vocab + 2, 320, vocab, EOS]
    out = ref(torch.from_numpy(ids), output_hidden_states=True)
    hidden, pooled = ours(ids, extra_embeddings=mx.array(extra))
    assert rel(np.array(hidden), out.hidden_states[-2].numpy()) <= 1e-5
    assert rel(np.array(pooled), out.text_embeds.numpy()) <= 1e-5
    with pytest.raises(InputError, match=r"token ids must lie in \[0, %d\)" % (vocab + 2)):
        ours(ids, extra_embeddings=mx.array(extra[:2]))
    with pytest.raises(InputError, match=r"extra_embeddings must have shape \(k, 64\)"):
        ours(ids, extra_embeddings=mx.zeros((3, 32)))


def test_quantized_text_encoders_take_embeddings(tiny_sdxl, emb_path):
    pipe = SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32, text_encoder_bits=8)
    pipe.load_embedding(emb_path)
    pe, _, pp, _ = pipe.encode_prompt(PROMPT, do_cfg=False, prompt_syntax="a1111")
    assert pe.shape == (1, 77, 128) and np.isfinite(np.array(pe)).all() and np.isfinite(np.array(pp)).all()


# ---------------------------------------------------------------- refused
@pytest.fixture()
def fresh(tiny_sdxl):
    return SDXLPipeline.from_pretrained(tiny_sdxl[0], dtype=mx.float32)


@pytest.mark.parametrize("make, error, match", [
    (lambda p: write_embedding(p / "sd15.safetensors", clip_l=None, clip_g=None,
                               emb_params=np.zeros((2, 768), np.float32)),
     WeightsError, r"not an SDXL embedding \(an SD 1.x/2.x embedding has one tensor.*emb_params \(2, 768\).*"
                   r"clip_l \(n x 768\) and clip_g \(n x 1280\)"),
    (lambda p: write_embedding(p / "half.safetensors", clip_g=None), WeightsError, "it has clip_l"),
    (lambda p: write_embedding(p / "wide.safetensors", w1=32), WeightsError,
     "its clip_l vectors are 32 wide, but this model's text encoder takes 64"),
    (lambda p: write_embedding(p / "cat.safetensors"), InputError, "'cat' is already a word of CLIP's vocabulary"),
    (lambda p: write_embedding(p / "many.safetensors", n=76), WeightsError, "1 <= n <= 75"),
    (lambda p: write_embedding(p / "odd.safetensors", clip_g=np.zeros((2, 64), np.float32)), WeightsError,
     "both with the same n"),
    (lambda p: write_embedding(p / "nan.safetensors", clip_l=np.full((1, 64), np.nan, np.float32),
                               clip_g=np.zeros((1, 64), np.float32)), WeightsError, "NaN"),
    (lambda p: write_embedding(p / "my style.safetensors"), InputError, "without spaces"),
    (lambda p: p / "missing.safetensors", WeightsError, "embedding file not found"),
    (lambda p: (p / "x.pt").write_bytes(b"0") and p / "x.pt", WeightsError, "read from .safetensors files"),
    (lambda p: (p / "junk.safetensors").write_bytes(b"not a file") and p / "junk.safetensors", WeightsError,
     "not a safetensors file"),
], ids=["sd15", "one_tensor", "wrong_width", "in_vocab", "too_long", "n_differs", "nan", "space", "missing",
        "pickle", "junk"])
def test_bad_embeddings_refused_before_any_model_loads(fresh, tmp_path, make, error, match):
    path = make(tmp_path)
    with pytest.raises(error, match=match) as e:
        fresh.load_embedding(path)
    assert "\n" not in str(e.value) and len(fresh.embeddings) == 0
    assert fresh.models.loaded() == []


def test_tokens_taken_and_reloaded(fresh, tmp_path):
    a = write_embedding(tmp_path / "foxstyle.safetensors")
    fresh.load_embedding(a)
    fresh.load_embedding(a)  # the same file again: nothing changes
    assert len(fresh.embeddings) == 1
    other = write_embedding(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(InputError, match="'FoxStyle' is already taken by .*foxstyle.safetensors"):
        fresh.load_embedding(other, token="FoxStyle")
    fresh.load_embedding(other, token="fox-style-2")
    assert [e.token for e in fresh.embeddings] == ["foxstyle", "fox-style-2"]
    with pytest.raises(InputError, match="embedding token 'a:b'"):
        fresh.load_embedding(other, token="a:b")


def test_named_in_finds_files_the_prompts_use(tmp_path):
    (tmp_path / "sub").mkdir()
    for path in ("foxstyle", "unused", "sub/EasyNeg"):
        write_embedding(tmp_path / f"{path}.safetensors")
    found = named_in(tmp_path, ["a (foxstyle:1.2) photo", "easyneg, blurry", None])
    assert sorted(p.name for p in found) == ["EasyNeg.safetensors", "foxstyle.safetensors"]
    assert named_in(tmp_path, ["foxstyles unusedword"]) == []  # whole words only
    with pytest.raises(InputError, match="embedding folder not found"):
        named_in(tmp_path / "nope", ["x"])


def test_errors_are_sdxl_errors():
    assert issubclass(WeightsError, SDXLError) and issubclass(InputError, SDXLError)
