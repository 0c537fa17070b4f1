"""A prompt → CLIP token chunks with one weight per token, for one tokenizer.

- "plain": one chunk [start, up to 75 tokens, end, pad...], as diffusers tokenizes;
  the rest of a longer prompt is cut, with a note saying what was dropped.
- "a1111": AUTOMATIC1111's chunking. The prompt's tokens fill chunks of 75 (each then
  wrapped in start and end tokens to CLIP's 77, and padded with the end token); when a
  chunk is full and its last comma is at most 20 tokens back, the tokens after that comma
  move to the next chunk; BREAK closes the current chunk; an embedding's vectors never
  straddle two chunks. At most MAX_PROMPT_CHUNKS chunks are kept (a note says what was cut).
Tokenizers whose pad token is not the end token (bigG's "!") pad after the first end token.
Loaded embeddings (see embeddings.py) replace their token's ids by the ids of their vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .embeddings import Matcher
from .lora.tags import strip_lora_tags
from .prompt_syntax import parse_prompt
from .spec import CHUNK_TOKENS, COMMA_BACKTRACK, MAX_PROMPT_CHUNKS

CLIP_LENGTH = CHUNK_TOKENS + 2


@dataclass(frozen=True)
class Special:
    """A tokenizer's start, end and pad ids, and its comma (None when it has none)."""

    start: int
    end: int
    pad: int
    comma: Optional[int]

    @classmethod
    def of(cls, tokenizer) -> "Special":
        comma = tokenizer.convert_tokens_to_ids(",</w>")  # the unknown token's id when there is none
        return cls(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                   None if comma == tokenizer.unk_token_id else comma)

    def wrap(self, ids: List[int]) -> List[int]:
        """75 prompt ids → CLIP's 77: start + ids + end, then pad after the first end token."""
        row = [self.start] + ids + [self.end]
        first_end = row.index(self.end)
        return row[:first_end + 1] + [self.pad] * (len(row) - first_end - 1)


@dataclass(frozen=True)
class PromptTokens:
    """One prompt's chunks: ids and weights (chunks, 77); the embedding tokens it used; and a
    note when part of it was cut."""

    ids: np.ndarray
    weights: np.ndarray
    used: Tuple[str, ...] = ()
    note: Optional[str] = None

    @property
    def chunks(self) -> int:
        return self.ids.shape[0]

    def padded(self, chunks: int, special: Special) -> "PromptTokens":
        """The same prompt followed by empty chunks up to `chunks` (as A1111 pads a batch)."""
        extra = chunks - self.chunks
        if extra <= 0:
            return self
        empty = np.array([special.wrap([special.end] * CHUNK_TOKENS)] * extra, np.int32)
        return PromptTokens(np.concatenate([self.ids, empty]),
                            np.concatenate([self.weights, np.ones((extra, CLIP_LENGTH), np.float32)]),
                            self.used, self.note)


class _Chunks:
    """A1111's chunk builder: 75 ids per chunk, with the comma back-off."""

    def __init__(self, special: Special):
        self.special = special
        self.done: List[Tuple[List[int], List[float]]] = []
        self.ids: List[int] = []
        self.weights: List[float] = []
        self.last_comma = -1       # where the current chunk's last comma is, -1 for none
        self.count = 0             # prompt tokens placed, for the length note

    def close(self) -> None:
        pad = CHUNK_TOKENS - len(self.ids)
        self.done.append((self.ids + [self.special.end] * pad, self.weights + [1.0] * pad))
        self.ids, self.weights, self.last_comma = [], [], -1

    def make_room(self, token: int) -> None:
        """Before placing `token`: note a comma, or close a full chunk (after its last comma if near)."""
        full = len(self.ids) == CHUNK_TOKENS
        if token == self.special.comma:
            self.last_comma = len(self.ids)
        elif full and self.last_comma != -1 and len(self.ids) - self.last_comma <= COMMA_BACKTRACK:
            cut = self.last_comma + 1
            moved = self.ids[cut:], self.weights[cut:]
            self.ids, self.weights = self.ids[:cut], self.weights[:cut]
            self.close()
            self.ids, self.weights = list(moved[0]), list(moved[1])
        if len(self.ids) == CHUNK_TOKENS:
            self.close()

    def place(self, ids: List[int], weight: float, whole: bool = False) -> None:
        """Append ids at `weight`; `whole` ids (an embedding's) go to the next chunk if they do not fit."""
        if whole and len(self.ids) + len(ids) > CHUNK_TOKENS:
            self.close()
        self.ids += ids
        self.weights += [weight] * len(ids)
        self.count += len(ids)

    def finish(self) -> List[Tuple[List[int], List[float]]]:
        if self.ids or not self.done:
            self.close()
        return self.done


def _a1111_chunks(fragments, token_lists, special: Special, matcher: Optional[Matcher]):
    chunks, used = _Chunks(special), []
    for (_, weight), tokens in zip(fragments, token_lists):
        if weight is None:  # BREAK
            chunks.close()
            continue
        pos = 0
        while pos < len(tokens):
            chunks.make_room(tokens[pos])
            hit = matcher.at(tokens, pos) if matcher is not None else None
            if hit is None:
                chunks.place([tokens[pos]], weight)
                pos += 1
            else:
                matched, ids, token = hit
                chunks.place(ids, weight, whole=True)
                used.append(token)
                pos += matched
    return chunks.finish(), chunks.count, used


def _substitute(tokens: Sequence[int], matcher: Optional[Matcher]) -> Tuple[List[int], List[str]]:
    """Plain syntax: the ids with each embedding token replaced by its vectors' ids."""
    out, used, pos = [], [], 0
    while pos < len(tokens):
        hit = matcher.at(tokens, pos) if matcher is not None else None
        if hit is None:
            out.append(tokens[pos])
            pos += 1
        else:
            out += hit[1]
            used.append(hit[2])
            pos += hit[0]
    return out, used


def _dropped_text(tokenizer, ids: Sequence[int], limit: int = 120) -> str:
    """The dropped tokens as text (embedding vectors left out), its first `limit` characters quoted."""
    text = tokenizer.decode([i for i in ids[:limit] if i < len(tokenizer)], skip_special_tokens=True)
    return repr(text[:limit]) + ("..." if len(text) > limit or len(ids) > limit else "")


def _plain_tokens(tokenizer, text, token_lists, special: Special, matcher) -> PromptTokens:
    ids, used = _substitute(token_lists[0], matcher)
    note = None
    if len(ids) > CHUNK_TOKENS:
        note = (f"prompt is {len(ids) + 2} tokens long, CLIP takes {CLIP_LENGTH}: {len(ids) - CHUNK_TOKENS} "
                f"tokens were dropped: {_dropped_text(tokenizer, ids[CHUNK_TOKENS:])} "
                f"(from prompt {text[:60]!r}...)")
    ids = ids[:CHUNK_TOKENS]
    row = special.wrap(ids + [special.end] * (CHUNK_TOKENS - len(ids)))
    return PromptTokens(np.array([row], np.int32), np.ones((1, CLIP_LENGTH), np.float32), tuple(used), note)


def _a1111_tokens(tokenizer, text, fragments, token_lists, special: Special, matcher) -> PromptTokens:
    chunks, count, used = _a1111_chunks(fragments, token_lists, special, matcher)
    note = None
    if len(chunks) > MAX_PROMPT_CHUNKS:
        cut = [i for ids, _ in chunks[MAX_PROMPT_CHUNKS:] for i in ids if i != special.end]
        note = (f"prompt is {count} tokens long, {len(chunks)} chunks of {CHUNK_TOKENS}; at most "
                f"{MAX_PROMPT_CHUNKS} chunks are used, so {len(cut)} tokens were dropped: "
                f"{_dropped_text(tokenizer, cut)} (from prompt {text[:60]!r}...)")
        chunks = chunks[:MAX_PROMPT_CHUNKS]
    ids = np.array([special.wrap(c) for c, _ in chunks], np.int32)
    weights = np.array([[1.0] + w + [1.0] for _, w in chunks], np.float32)
    return PromptTokens(ids, weights, tuple(dict.fromkeys(used)), note)


def tokenize_prompt(tokenizer, text: str, syntax: str, matcher: Optional[Matcher] = None) -> PromptTokens:
    """`text`'s chunks in `syntax` ("plain" or "a1111") for `tokenizer`; `matcher` finds the
    loaded embeddings' tokens."""
    special = Special.of(tokenizer)
    if syntax != "plain":
        text = strip_lora_tags(text)  # <lora:NAME:SCALE> selects a LoRA; A1111 never shows it to CLIP
    fragments = parse_prompt(text, syntax)
    texts = [t for t, w in fragments if w is not None]
    lists = iter(tokenizer(texts, add_special_tokens=False, verbose=False).input_ids if texts else [])
    token_lists = [[] if w is None else next(lists) for _, w in fragments]  # A1111 tokenizes each fragment
    if syntax == "plain":
        return _plain_tokens(tokenizer, text, token_lists, special, matcher)
    return _a1111_tokens(tokenizer, text, fragments, token_lists, special, matcher)
