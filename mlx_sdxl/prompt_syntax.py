"""AUTOMATIC1111's prompt syntax: text → (text, weight) fragments and BREAKs.

    (x)       x's weight × 1.1            [x]      x's weight ÷ 1.1
    (x:1.5)   x's weight × 1.5            nesting  the factors multiply
    \\( \\) \\[ \\]  literal brackets         \\\\       a literal backslash
    BREAK     (a word of its own, in capitals) ends the current 75-token chunk

The rules follow A1111's `parse_prompt_attention`, so prompts copied from A1111 or
Civitai weigh the same here:
- an unmatched ")" or "]" is literal text; a "(" or "[" still open at the end applies
  its factor to everything after it;
- ":w)" sets a weight only as a number made of digits and dots (so "(x:1e-1)" is the
  text "x:1e-1" at 1.1); a number that does not parse ("(x:1.2.3)") stays text,
  where A1111 would fail;
- a lone backslash before any other character is dropped;
- neighbouring fragments of equal weight are joined (CLIP then reads them as one text).
One deliberate difference: A1111 marks a BREAK with weight -1 inside its list, so a
BREAK written inside brackets gets multiplied and turns into the word "BREAK" with a
negative weight. Here a BREAK is a break wherever it is written.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

from .spec import check_prompt_syntax

Fragment = Tuple[str, Optional[float]]   # (text, weight); weight None marks a BREAK
BREAK: Fragment = ("BREAK", None)

ROUND, SQUARE = 1.1, 1 / 1.1

_PIECE = re.compile(r"""
      \\[()\[\]\\]?            # an escaped bracket or backslash; a lone backslash
    | \( | \[                  # openers
    | :([+-]?[.\d]+)\)         # ":1.3)" closes a round bracket with that weight
    | \) | \]                  # closers
    | [^\\()\[\]:]+            # plain text
    | :                        # a colon that sets no weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)   # BREAK eats the whitespace around it


def _weight(text: Optional[str]) -> Optional[float]:
    try:
        return None if text is None else float(text)
    except ValueError:  # "1.2.3", "." and the like: not a number
        return None


def _text(out: list, text: str) -> None:
    """Append plain text, split at each BREAK."""
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            out.append(["BREAK", None])
        out.append([part, 1.0])


def _scale(out: list, start: int, factor: float) -> None:
    for entry in out[start:]:
        if entry[1] is not None:
            entry[1] *= factor


def _join_equal(out: list) -> List[Fragment]:
    """Join neighbours of equal weight, then drop empty text (it tokenizes to nothing)."""
    joined: list = []
    for text, weight in out:
        if joined and weight is not None and joined[-1][1] == weight:
            joined[-1][0] += text
        else:
            joined.append([text, weight])
    fragments = [(t, w) for t, w in joined if w is None or t]
    return fragments or [("", 1.0)]


def parse_prompt_attention(text: str) -> List[Fragment]:
    """A1111 prompt → fragments [(text, weight), ...], BREAK marked as ("BREAK", None)."""
    out: list = []
    rounds: List[int] = []    # where each open "(" started, innermost last
    squares: List[int] = []
    for m in _PIECE.finditer(text):
        piece, weight = m.group(0), _weight(m.group(1))
        if piece.startswith("\\"):
            out.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(out))
        elif piece == "[":
            squares.append(len(out))
        elif weight is not None and rounds:
            _scale(out, rounds.pop(), weight)
        elif m.group(1) is not None and rounds:  # ":1.2.3)": the number is text, the ")" closes
            _text(out, piece[:-1])
            _scale(out, rounds.pop(), ROUND)
        elif piece == ")" and rounds:
            _scale(out, rounds.pop(), ROUND)
        elif piece == "]" and squares:
            _scale(out, squares.pop(), SQUARE)
        else:
            _text(out, piece)
    for start in rounds:  # brackets never closed apply to the rest of the prompt
        _scale(out, start, ROUND)
    for start in squares:
        _scale(out, start, SQUARE)
    return _join_equal(out)


def parse_prompt(text: str, syntax: str) -> List[Fragment]:
    """The fragments of `text` in `syntax`: "plain" is the whole text at weight 1."""
    if check_prompt_syntax(syntax) == "plain":
        return [(text, 1.0)]
    return parse_prompt_attention(text)
