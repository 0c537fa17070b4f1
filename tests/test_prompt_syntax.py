"""The A1111 prompt parser: A1111's own docstring examples, then nesting, weights, escapes,
unbalanced brackets and BREAK, each with the output A1111's parse_prompt_attention gives
(its BREAK marker ["BREAK", -1] written as ("BREAK", None), its empty fragments left out)."""

import pytest

from mlx_sdxl.errors import InputError
from mlx_sdxl.prompt_syntax import BREAK, parse_prompt, parse_prompt_attention

R, S = 1.1, 1 / 1.1   # one round bracket, one square bracket

DOCSTRING = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

NESTING = [
    ("((a))", [("a", R * R)]),
    ("[[a]]", [("a", S * S)]),
    ("([a])", [("a", S * R)]),
    ("((a:1.5))", [("a", 1.5 * R)]),
    ("(a (b:2) c)", [("a ", R), ("b", 2 * R), (" c", R)]),
    ("[a (b) c]", [("a ", S), ("b", R * S), (" c", S)]),
    ("(a:1.2) (b:0.8)", [("a", 1.2), (" ", 1.0), ("b", 0.8)]),
    ("((a:1.2) b:1.5)", [("a", 1.2 * 1.5), (" b", 1.5)]),
    ("masterpiece, (red fox:1.3), [blurry], snow",
     [("masterpiece, ", 1.0), ("red fox", 1.3), (", ", 1.0), ("blurry", S), (", snow", 1.0)]),
]

WEIGHTS = [
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:1e-1)", [("a:1e-1", R)]),        # "e" is not part of a weight: text, then ")" at 1.1
    ("(a:.5)", [("a", 0.5)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:1.)", [("a", 1.0)]),
    ("(a: 1.5)", [("a: 1.5", R)]),        # a space after ":" makes it text
    ("(a:1.5 )", [("a:1.5 ", R)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),         # no "(" open: all of it is text
    ("time 10:30", [("time 10:30", 1.0)]),
    ("[a:1.5]", [("a:1.5", S)]),          # only ")" takes a weight
    ("(a:1.0)", [("a", 1.0)]),
]

ESCAPES = [
    ("\\(a\\)", [("(a)", 1.0)]),
    ("\\[a\\]", [("[a]", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("(\\(a\\))", [("(a)", R)]),
    ("a\\b", [("ab", 1.0)]),               # a lone backslash is dropped
    ("smile \\(face\\) (happy:1.2)", [("smile (face) ", 1.0), ("happy", 1.2)]),
    ("\\(a:1.5\\)", [("(a:1.5)", 1.0)]),
]

UNBALANCED = [
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("(a]", [("a]", R)]),
    ("[a)", [("a)", S)]),
    ("((a)", [("a", R * R)]),
    ("a (b", [("a ", 1.0), ("b", R)]),
    ("[a", [("a", S)]),
    (")(", [(")", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("a [b (c", [("a ", 1.0), ("b ", S), ("c", R * S)]),
]

BREAKS = [
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("BREAK a", [BREAK, ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), BREAK]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
    ("BREAK", [BREAK]),
    ("aBREAK b", [("aBREAK b", 1.0)]),    # glued to a word: not a BREAK
    ("a BREAKb", [("a BREAKb", 1.0)]),
    ("a,BREAK,b", [("a,", 1.0), BREAK, (",b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),  # only in capitals
    ("(a) BREAK (b)", [("a", R), BREAK, ("b", R)]),
    ("a\nBREAK\nb", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("masterpiece, (red fox:1.3) BREAK 35mm photo",
     [("masterpiece, ", 1.0), ("red fox", 1.3), BREAK, ("35mm photo", 1.0)]),
]

CASES = DOCSTRING + NESTING + WEIGHTS + ESCAPES + UNBALANCED + BREAKS


@pytest.mark.parametrize("text, expected", CASES, ids=[repr(t) for t, _ in CASES])
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, w), (_, e) in zip(got, expected):
        assert (w is None and e is None) or w == pytest.approx(e, rel=1e-12, abs=0)


def test_docstring_weights_are_bit_exact():
    """Multiplied in A1111's order, so the floats are A1111's to the last bit."""
    assert parse_prompt_attention(DOCSTRING[-1][0]) == DOCSTRING[-1][1]


def test_case_count():
    assert len(CASES) - len(DOCSTRING) >= 30


def test_deliberate_differences_from_a1111():
    # A1111 raises ValueError on a weight that is not a number; here it stays text
    assert parse_prompt_attention("(a:1.2.3)") == [("a:1.2.3", R)]
    # A1111 multiplies its BREAK marker too, turning it into the word "BREAK" at weight -1.1
    assert parse_prompt_attention("(a BREAK b)") == [("a", R), BREAK, ("b", R)]


def test_plain_syntax_is_the_text_at_weight_one():
    text = "(a:1.5) BREAK \\(b"
    assert parse_prompt(text, "plain") == [(text, 1.0)]
    assert parse_prompt(text, "a1111") == [("a", 1.5), BREAK, ("(b", 1.0)]
    with pytest.raises(InputError, match="prompt_syntax must be one of 'plain', 'a1111'"):
        parse_prompt(text, "compel")
