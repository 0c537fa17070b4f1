"""A1111 prompts end to end: encodings against a torch reference of A1111's algorithm on
transformers' CLIP (same tiny weights), and what the UNets and images get from them."""

import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.errors import InputError
from mlx_sdxl.models.blocks import Attention
from mlx_sdxl.prompt_syntax import parse_prompt_attention
from mlx_sdxl.spec import MAX_PROMPT_CHUNKS
from mlx_sdxl.tokenizer import PromptTruncatedWarning
from tiny import WORDS

torch.set_grad_enabled(False)
ONE = [w for w in WORDS if w not in ("green", "tree")]   # one token each in the tiny vocabulary


def segments(lengths, start=0):
    """Comma-separated runs of one-token words, `lengths` words each."""
    it = iter(ONE * 100)
    for _ in range(start):
        next(it)
    return [" ".join(next(it) for _ in range(k)) for k in lengths]


# 230 tokens: a comma every 10th token, so every chunk boundary moves back to a comma (chunks of 70)
LONG = ", ".join(segments([9] * 22 + [10]))
# weights, nesting, a weight across a chunk boundary, BREAK, escapes
parts = segments([9] * 16)
WEIGHTED = (", ".join(parts[:3]) + ", (" + parts[3] + ":1.3), [" + parts[4] + "], ((" + parts[5] + ", "
            + parts[6] + ", " + parts[7] + ")), " + ", ".join(parts[8:12]) + " BREAK (" + parts[12]
            + ":0.6), \\(" + parts[13] + "\\)")
SHORT_WEIGHTED = "a photo of a (cat:1.5), [blurry] (red car:0.8)"
NEGATIVE = "blurry, (ugly:1.2)"       # one chunk, against the positive's several


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- the torch reference
def ref_chunks(text, tokenizer):
    """A1111's chunking written out again: (ids, weights) lists of 77 per chunk."""
    comma, bos, eos = tokenizer.get_vocab()[",</w>"], tokenizer.bos_token_id, tokenizer.eos_token_id
    chunks, cur, cur_w, last_comma = [], [], [], -1

    def flush():
        nonlocal cur, cur_w, last_comma
        fill = 75 - len(cur)
        chunks.append(([bos] + cur + [eos] * (fill + 1), [1.0] + cur_w + [1.0] * (fill + 1)))
        cur, cur_w, last_comma = [], [], -1

    for piece, weight in parse_prompt_attention(text):
        if weight is None:
            flush()
            continue
        for tok in tokenizer(piece, add_special_tokens=False).input_ids:
            if tok == comma:
                last_comma = len(cur)
            elif len(cur) == 75 and last_comma >= 0 and 75 - last_comma <= 20:
                keep_t, keep_w = cur[last_comma + 1:], cur_w[last_comma + 1:]
                cur, cur_w = cur[:last_comma + 1], cur_w[:last_comma + 1]
                flush()
                cur, cur_w = keep_t, keep_w
            if len(cur) == 75:
                flush()
            cur.append(tok)
            cur_w.append(weight)
    if cur or not chunks:
        flush()
    return chunks


def ref_encode_one(encoder, tokenizer, chunks, n_chunks):
    """Per chunk: penultimate states × weights, rescaled to the unweighted mean; concatenated;
    pooled (text_embeds, when the encoder has a projection) of the first chunk."""
    empty = ([tokenizer.bos_token_id] + [tokenizer.eos_token_id] * 76, [1.0] * 77)
    states, pooled = [], None
    for i, (ids, weights) in enumerate(chunks + [empty] * (n_chunks - len(chunks))):
        ids = list(ids)
        first_end = ids.index(tokenizer.eos_token_id)
        ids[first_end + 1:] = [tokenizer.pad_token_id] * (76 - first_end)
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
        z = out.hidden_states[-2][0]
        zw = z * torch.tensor(weights)[:, None]
        states.append(zw * (z.mean() / zw.mean()))
        if i == 0 and hasattr(out, "text_embeds"):
            pooled = out.text_embeds[0]
    return torch.cat(states), pooled


def reference(pipe, prompt, negative):
    """(embeds, negative embeds, pooled, negative pooled) of the SDXL base, as A1111 computes them."""
    pairs = [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]
    per_text = {t: [ref_chunks(t, tok) for _, tok in pairs] for t in (prompt, negative)}
    n = max(len(c) for chunks in per_text.values() for c in chunks)
    out = {}
    for t in (prompt, negative):
        encoded = [ref_encode_one(enc, tok, c, n) for (enc, tok), c in zip(pairs, per_text[t])]
        out[t] = (torch.cat([e[0] for e in encoded], dim=-1).numpy(), encoded[1][1].numpy())
    return out[prompt][0], out[negative][0], out[prompt][1], out[negative][1]


@pytest.fixture(scope="module")
def pipes(tiny_sdxl):
    base_dir, refiner_dir, base, refiner = tiny_sdxl
    return SDXLPipeline.from_pretrained(base_dir, refiner_dir, dtype=mx.float32), base, refiner


@pytest.mark.parametrize("prompt", [LONG, WEIGHTED, SHORT_WEIGHTED], ids=["230_tokens", "weighted_break", "short"])
def test_encodings_match_torch_reference(pipes, prompt):
    ours, base, _ = pipes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under the chunk limit: no warning
        got = ours.encode_prompt(prompt, NEGATIVE, prompt_syntax="a1111")
    want = reference(base, prompt, NEGATIVE)
    for g, w in zip(got, want):
        assert g.shape[1:] == w.shape if g.ndim == 3 else g.shape == (1, *w.shape)
        assert rel(np.array(g)[0], w) <= 1e-5
    chunks = got[0].shape[1] // 77
    assert got[0].shape == got[1].shape == (1, 77 * chunks, 128)  # the negative padded to the same length
    if prompt == LONG:
        assert chunks == 4  # 230 tokens in chunks of 70 (each moved back to its last comma)
        assert len(base.tokenizer(LONG, add_special_tokens=False).input_ids) == 230
        assert [len(ids) - ids.count(base.tokenizer.eos_token_id) - 1 for ids, _ in
                ref_chunks(LONG, base.tokenizer)] == [70, 70, 70, 20]


def test_pooled_is_the_first_chunk_unweighted(pipes):
    ours, _, _ = pipes
    weighted = ours.encode_prompt("a photo of a (cat:1.5)", prompt_syntax="a1111")
    plain = ours.encode_prompt("a photo of a cat", prompt_syntax="a1111")
    np.testing.assert_array_equal(np.array(weighted[2]), np.array(plain[2]))
    assert rel(np.array(weighted[0]), np.array(plain[0])) > 1e-2  # the states did move


def test_refiner_reads_chunks_too(pipes):
    ours, _, refiner = pipes
    pe, npe, pp, npp = ours.encode_prompt(LONG, NEGATIVE, stage="refiner", prompt_syntax="a1111")
    assert pe.shape == npe.shape == (1, 4 * 77, 64)
    chunks = ref_chunks(LONG, refiner.tokenizer_2)
    states, pooled = ref_encode_one(refiner.text_encoder_2, refiner.tokenizer_2, chunks, 4)
    assert rel(np.array(pe)[0], states.numpy()) <= 1e-5 and rel(np.array(pp)[0], pooled.numpy()) <= 1e-5


# ---------------------------------------------------------------- images
KW = dict(num_inference_steps=6, height=64, width=64, seed=3, output_type="np")


def test_a1111_without_syntax_is_plain_exactly(pipes):
    ours, _, _ = pipes
    for prompt, negative in [("a photo of a cat", None), ("a red car, snow", "blurry ugly")]:
        plain = ours(prompt, negative, prompt_syntax="plain", **KW)
        a1111 = ours(prompt, negative, prompt_syntax="a1111", **KW)
        np.testing.assert_array_equal(a1111, plain)


def test_weights_move_the_image_and_weight_one_does_not(pipes):
    """Measured on the final latents against the pipeline parity bound (rel L2 1e-4): the tiny
    random UNet hardly reads its text (another prompt altogether moves the decoded image by
    ~1e-3 mean abs), so the latents are where a weight's effect shows."""
    ours, _, _ = pipes
    kw = dict(KW, output_type="latent")
    plain = np.array(ours("a photo of a cat", **kw))
    weighted = np.array(ours("a photo of a (cat:1.5)", prompt_syntax="a1111", **kw))
    assert rel(weighted, plain) > 10 * 1e-4
    one = ours("a photo of a (cat:1.0)", prompt_syntax="a1111", **KW)
    np.testing.assert_array_equal(one, ours("a photo of a cat", **KW))
    literal = np.array(ours("a photo of a (cat:1.5)", prompt_syntax="plain", **kw))  # brackets are text
    assert rel(literal, weighted) > 10 * 1e-4


def test_long_context_reaches_both_unets_once_per_stage(pipes, monkeypatch):
    ours, _, _ = pipes
    seen = []
    real_kv = Attention.kv

    def kv(self, context):
        seen.append((id(self), context.shape))
        return real_kv(self, context)

    monkeypatch.setattr(Attention, "kv", kv)
    for prompt, tokens in [(", ".join(segments([9] * 14)), 154), (LONG, 308), (WEIGHTED, 231)]:
        seen.clear()
        result = ours.generate(prompt, NEGATIVE, prompt_syntax="a1111", **KW)
        assert np.isfinite(result.images).all()
        for source in (ours.base, ours.refiner):
            blocks = ours.models.get(source, "unet").transformer_blocks()
            cross = [shape for i, shape in seen if i in {id(b.attn2) for b in blocks}]
            assert len(cross) == len(blocks)  # made once per stage
            assert all(s[:2] == (2, tokens) for s in cross)  # [negative; positive], same length


def test_prompt_syntax_is_recorded_and_checked(pipes):
    ours, _, _ = pipes
    result = ours.generate("a (cat:1.2)", prompt_syntax="a1111", **KW)
    assert result.settings[0]["prompt_syntax"] == "a1111" and result.settings[0]["prompt"] == "a (cat:1.2)"
    assert ours.generate("a cat", **KW).settings[0]["prompt_syntax"] == "plain"
    with pytest.raises(InputError, match="prompt_syntax must be one of 'plain', 'a1111', got 'compel'"):
        ours("a cat", prompt_syntax="compel", **KW)
    image = np.random.default_rng(0).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    refined = ours.refine(image, LONG, NEGATIVE, strength=0.5, num_inference_steps=4, seed=1, output_type="np",
                          prompt_syntax="a1111")
    assert refined.shape == (1, 64, 64, 3) and np.isfinite(refined).all()


# ---------------------------------------------------------------- odd prompts
def test_5000_token_prompt_works_warns_once_bounded(pipes):
    ours, _, _ = pipes
    huge = " ".join(ONE[i % len(ONE)] for i in range(5000))
    for syntax, tokens in [("a1111", 77 * MAX_PROMPT_CHUNKS), ("plain", 77)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ours.generate(huge, huge, prompt_syntax=syntax, **KW)  # base (2 encoders) + refiner
        notes = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
        assert len(notes) == 1, [str(w.message) for w in caught]
        message = str(notes[0].message)
        assert ("5000 tokens long" if syntax == "a1111" else "5002 tokens long") in message
        assert len(message) < 400  # the dropped text is shown cut short
        assert np.isfinite(result.images).all()
        with pytest.warns(PromptTruncatedWarning):
            assert ours.encode_prompt(huge, prompt_syntax=syntax)[0].shape[1] == tokens


def test_break_only_prompt_is_the_empty_prompt(pipes):
    ours, _, _ = pipes
    empty = ours.encode_prompt("", "", prompt_syntax="a1111")
    for text in ["BREAK", " BREAK ", "BREAK\n"]:
        got = ours.encode_prompt(text, "", prompt_syntax="a1111")
        for g, e in zip(got, empty):
            np.testing.assert_array_equal(np.array(g), np.array(e))
    two = ours.encode_prompt("BREAK BREAK", prompt_syntax="a1111")
    assert two[0].shape[1] == 154
    assert np.isfinite(ours("BREAK", prompt_syntax="a1111", **KW)).all()
