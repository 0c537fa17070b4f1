"""Prompts → CLIP token chunks: diffusers' layout for "plain", A1111's chunking for "a1111"
(75 tokens per chunk, the comma back-off, BREAK, empty-chunk padding, the chunk limit)."""

import warnings

import numpy as np
import pytest

from mlx_sdxl.prompt_tokens import CLIP_LENGTH, tokenize_prompt
from mlx_sdxl.spec import MAX_PROMPT_CHUNKS
from mlx_sdxl.tokenizer import PromptTruncatedWarning, load_tokenizer, tokenize
from tiny import WORDS, make_tokenizer_dir, tiny_vocab

VOCAB = tiny_vocab()[0]
BOS, EOS, COMMA = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"], VOCAB[",</w>"]
ONE = [w for w in WORDS if w not in ("green", "tree")]   # the tiny vocabulary's one-token words


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return (load_tokenizer(make_tokenizer_dir(root / "tokenizer")),
            load_tokenizer(make_tokenizer_dir(root / "tokenizer_2", pad_token="!")))


def words(n, start=0):
    """n one-token words."""
    return " ".join(ONE[(start + i) % len(ONE)] for i in range(n))


def ids(*ws):
    return [VOCAB[w + "</w>"] for w in ws]


def content(row):
    """A chunk's prompt tokens: between the start token and the first end token."""
    row = list(row)
    return row[1:row.index(EOS)]


def test_one_token_words(toks):
    assert all(len(toks[0](w, add_special_tokens=False).input_ids) == 1 for w in ONE)


def test_plain_is_diffusers_layout(toks):
    t1, t2 = toks
    for t in toks:
        for text in ["a photo of a cat", "", words(80), "(a:1.5) BREAK [b]"]:
            got = tokenize_prompt(t, text, "plain")
            assert got.ids.shape == (1, CLIP_LENGTH) and np.all(got.weights == 1)
            with warnings.catch_warnings():  # tokenize() warns about the 80-token prompt itself
                warnings.simplefilter("ignore", PromptTruncatedWarning)
                np.testing.assert_array_equal(got.ids, tokenize(t, [text]))
    assert "85 tokens" in tokenize_prompt(t1, words(83), "plain").note


def test_a1111_short_prompt_equals_plain(toks):
    for t in toks:
        text = "a photo of a cat, red car"
        a, p = tokenize_prompt(t, text, "a1111"), tokenize_prompt(t, text, "plain")
        np.testing.assert_array_equal(a.ids, p.ids)
        np.testing.assert_array_equal(a.weights, p.weights)


def test_weights_follow_the_parser(toks):
    t = toks[0]
    got = tokenize_prompt(t, "a (red car:1.5) [snow]", "a1111")
    assert content(got.ids[0]) == ids("a", "red", "car", "snow")
    np.testing.assert_allclose(got.weights[0, :6], [1, 1, 1.5, 1.5, 1 / 1.1, 1])
    assert np.all(got.weights[0, 6:] == 1)  # end and padding at 1


def test_75_tokens_fit_76_make_two_chunks(toks):
    t = toks[0]
    one = tokenize_prompt(t, words(75), "a1111")
    assert one.chunks == 1 and len(content(one.ids[0])) == 75 and one.ids[0, 76] == EOS
    two = tokenize_prompt(t, words(76), "a1111")
    assert two.chunks == 2 and content(two.ids[1]) == ids(ONE[75 % len(ONE)])


def test_comma_back_off(toks):
    t = toks[0]
    # a comma 6 tokens before the boundary: the chunk ends after it
    got = tokenize_prompt(t, words(69) + ", " + words(10, 69), "a1111")
    assert [len(content(r)) for r in got.ids] == [70, 10]
    assert content(got.ids[0])[-1] == COMMA and content(got.ids[1]) == ids(*words(10, 69).split())
    # exactly 20 back still moves; 21 back does not
    assert [len(content(r)) for r in tokenize_prompt(t, words(55) + ", " + words(30), "a1111").ids] == [56, 30]
    assert [len(content(r)) for r in tokenize_prompt(t, words(54) + ", " + words(30), "a1111").ids] == [75, 10]
    # a comma as the 76th token starts the next chunk (and is not a back-off point there)
    got = tokenize_prompt(t, words(75) + ", " + words(3), "a1111")
    assert content(got.ids[0]) == ids(*words(75).split()) and content(got.ids[1])[0] == COMMA


def test_weights_move_with_their_tokens(toks):
    t = toks[0]
    got = tokenize_prompt(t, words(65) + ", (" + words(12, 65) + ":1.4)", "a1111")
    assert got.chunks == 2
    assert np.all(got.weights[0, 1:67] == 1)                           # up to the comma
    np.testing.assert_allclose(got.weights[1, 1:13], 1.4)             # the moved words keep 1.4


def test_break(toks):
    t1, t2 = toks
    a = tokenize_prompt(t1, "red car BREAK snow", "a1111")
    assert [content(r) for r in a.ids] == [ids("red", "car"), ids("snow")]
    lead = tokenize_prompt(t1, "BREAK snow", "a1111")                  # an empty chunk first
    assert [content(r) for r in lead.ids] == [[], ids("snow")]
    trail = tokenize_prompt(t1, "snow BREAK", "a1111")                 # nothing after: no chunk
    assert [content(r) for r in trail.ids] == [ids("snow")]
    double = tokenize_prompt(t1, "red BREAK BREAK snow", "a1111")
    assert [content(r) for r in double.ids] == [ids("red"), [], ids("snow")]
    glued = tokenize_prompt(t1, "snowBREAK red", "a1111")
    assert glued.chunks == 1
    only = tokenize_prompt(t2, "BREAK", "a1111")                       # the empty prompt's tokens
    np.testing.assert_array_equal(only.ids, tokenize(t2, [""]))
    full = tokenize_prompt(t1, words(75) + " BREAK snow", "a1111")     # a full chunk: no empty one
    assert full.chunks == 2


def test_bigg_pads_after_the_first_end_token(toks):
    t2 = toks[1]
    got = tokenize_prompt(t2, "red car BREAK snow", "a1111").padded(3, _special(t2))
    for row in got.ids:
        row = list(row)
        end = row.index(EOS)
        assert row[0] == BOS and row[end + 1:] == [0] * (CLIP_LENGTH - end - 1)
    assert list(got.ids[2, :2]) == [BOS, EOS] and np.all(got.weights[2] == 1)


def _special(t):
    from mlx_sdxl.prompt_tokens import Special

    return Special.of(t)


def test_chunk_limit_cuts_with_one_note(toks):
    t = toks[0]
    got = tokenize_prompt(t, words(5000), "a1111")
    assert got.chunks == MAX_PROMPT_CHUNKS
    assert got.note.startswith(f"prompt is 5000 tokens long, 67 chunks of 75; at most {MAX_PROMPT_CHUNKS} chunks")
    assert f"{5000 - 75 * MAX_PROMPT_CHUNKS} tokens were dropped" in got.note
    assert tokenize_prompt(t, words(75 * MAX_PROMPT_CHUNKS), "a1111").note is None
