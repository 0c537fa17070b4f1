"""Prompts → what the UNets attend to: token embeddings, pooled embeddings, time ids.

The base reads CLIP-L and OpenCLIP bigG (penultimate states, concatenated to width
2048) and bigG's pooled projection; the refiner reads bigG alone. With no negative
prompt, a model whose `force_zeros_for_empty_prompt` is set (the base) guides against
zeros; otherwise (the refiner) it encodes "".

Prompt syntax (see prompt_syntax.py, prompt_tokens.py): "plain" encodes one 77-token
chunk per prompt, as diffusers does. "a1111" encodes each 77-token chunk on its own, as
AUTOMATIC1111 does for SDXL, for both text encoders: each token's state is multiplied by
its weight, then the chunk is rescaled so that its mean is the unweighted mean (A1111's
"Original" emphasis); the chunks' states are concatenated along the token axis; the
pooled embedding is the first chunk's, unweighted. Every prompt of a stage, negative
ones included, is padded with empty chunks to the same number of chunks, so the UNet's
context is 77 × chunks tokens for both halves of the guidance batch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import mlx.core as mx
import numpy as np

from ..conditioning import Prompt, as_list, broadcast, time_ids_rows
from ..embeddings import ENCODER_KEYS, EmbeddingSet
from ..errors import InputError
from ..prompt_tokens import PromptTokens, Special, tokenize_prompt
from ..sources import ModelSource
from ..spec import BASE, DEFAULT_PROMPT_SYNTAX, check_prompt_syntax
from ..tokenizer import PromptTruncatedWarning

LoadPart = Callable[[ModelSource, str], object]  # (source, part name) -> loaded model


@dataclass(frozen=True)
class PromptTexts:
    """The prompts of one request, as given (strings or lists), and their syntax."""

    prompt: Prompt
    negative_prompt: Optional[Prompt] = None
    prompt_2: Optional[Prompt] = None
    negative_prompt_2: Optional[Prompt] = None
    syntax: str = DEFAULT_PROMPT_SYNTAX


@dataclass(frozen=True)
class Conditioning:
    """One stage's conditioning, per image: with guidance also the negative branch."""

    prompt_embeds: mx.array            # (B, 77 × chunks, width)
    pooled_prompt_embeds: mx.array     # (B, pooled width)
    time_ids: mx.array                 # (B, 6) base, (B, 5) refiner
    negative_prompt_embeds: Optional[mx.array] = None
    negative_pooled_prompt_embeds: Optional[mx.array] = None
    negative_time_ids: Optional[mx.array] = None

    @property
    def guided(self) -> bool:
        return self.negative_prompt_embeds is not None

    def arrays(self) -> List[mx.array]:
        return [a for a in (self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids,
                            self.negative_prompt_embeds, self.negative_pooled_prompt_embeds,
                            self.negative_time_ids) if a is not None]

    def unet_batch(self) -> Tuple[mx.array, mx.array, mx.array]:
        """(embeds, pooled, time ids) as the UNet takes them: [negative; positive] when guided."""
        if not self.guided:
            return self.prompt_embeds, self.pooled_prompt_embeds, self.time_ids
        return (mx.concatenate([self.negative_prompt_embeds, self.prompt_embeds]),
                mx.concatenate([self.negative_pooled_prompt_embeds, self.pooled_prompt_embeds]),
                mx.concatenate([self.negative_time_ids, self.time_ids]))


@dataclass(frozen=True)
class _Part:
    """One text encoder's share of a stage: its model, and the prompts' tokens for it."""

    encoder: object
    special: Special
    tokens: List[PromptTokens]
    extra: Optional[mx.array]          # the loaded embeddings' vectors for this encoder
    need_pooled: bool


def _parts(stage: str, texts: List[str], texts_2: List[str]):
    """(tokenizer, encoder, texts) for each text encoder the stage's UNet reads."""
    if stage == BASE:
        return [("tokenizer", "text_encoder", texts), ("tokenizer_2", "text_encoder_2", texts_2)]
    return [("tokenizer_2", "text_encoder_2", texts)]


def _tokenize(load: LoadPart, source: ModelSource, parts, syntax: str, embeddings: Optional[EmbeddingSet],
              tokenizers: Dict[str, object]) -> List[_Part]:
    out = []
    for tok_name, enc_name, texts in parts:
        if tok_name not in tokenizers:
            tokenizers[tok_name] = source.tokenizer(tok_name)
        tokenizer, encoder = tokenizers[tok_name], load(source, enc_name)
        matcher = embeddings.matcher(tokenizer, ENCODER_KEYS[enc_name], encoder.config.vocab_size) \
            if embeddings else None
        out.append(_Part(encoder, Special.of(tokenizer), [tokenize_prompt(tokenizer, t, syntax, matcher)
                                                          for t in texts],
                         None if matcher is None else matcher.table, enc_name == "text_encoder_2"))
    return out


def emphasize(hidden: mx.array, weights: mx.array) -> mx.array:
    """A1111's "Original" emphasis per chunk (rows of `hidden`, (N, 77, width)): z·w, rescaled
    so that the chunk's mean stays the unweighted mean."""
    z = hidden.astype(mx.float32)
    weighted = z * weights[..., None]
    restore = z.mean(axis=(1, 2), keepdims=True) / weighted.mean(axis=(1, 2), keepdims=True)
    return (weighted * restore).astype(hidden.dtype)


def _encode_part(part: _Part, chunks: int, clip_skip) -> Tuple[mx.array, Optional[mx.array]]:
    """(B, 77 × chunks, width) states and the first chunks' pooled embeddings (B, pooled width)."""
    tokens = [t.padded(chunks, part.special) for t in part.tokens]
    ids = np.concatenate([t.ids for t in tokens])
    weights = np.concatenate([t.weights for t in tokens])
    hidden, pooled = part.encoder(ids, clip_skip=clip_skip, need_pooled=part.need_pooled,
                                  extra_embeddings=part.extra)
    if not np.all(weights == 1):
        hidden = emphasize(hidden, mx.array(weights))
    batch = len(tokens)
    hidden = hidden.reshape(batch, chunks * hidden.shape[1], hidden.shape[2])
    return hidden, None if pooled is None else pooled[::chunks]


def _encode(parts: List[_Part], chunks: int, clip_skip) -> Tuple[mx.array, mx.array]:
    hiddens, pooled = [], None
    for part in parts:
        hidden, pool = _encode_part(part, chunks, clip_skip)
        hiddens.append(hidden)
        pooled = pool if pool is not None else pooled
    return (mx.concatenate(hiddens, axis=-1) if len(hiddens) > 1 else hiddens[0]), pooled


def _warn(parts: List[_Part], warned: Set[str]) -> None:
    """One PromptTruncatedWarning per cut prompt, however many encoders and stages read it."""
    for note in dict.fromkeys(t.note for part in parts for t in part.tokens if t.note):
        if note not in warned:
            warned.add(note)
            warnings.warn(note, PromptTruncatedWarning, stacklevel=4)


def _negatives(texts: PromptTexts, n: int) -> Tuple[List[str], List[str]]:
    neg = broadcast(as_list(texts.negative_prompt if texts.negative_prompt is not None else "",
                            "negative_prompt"), n, "negative_prompt")
    neg_2 = neg if texts.negative_prompt_2 is None else broadcast(
        as_list(texts.negative_prompt_2, "negative_prompt_2"), n, "negative_prompt_2")
    return neg, neg_2


def encode_prompt(load: LoadPart, source: ModelSource, texts: PromptTexts, *, dtype, num_images_per_prompt: int = 1,
                  clip_skip: Optional[int] = None, do_cfg: bool = True, embeddings: Optional[EmbeddingSet] = None,
                  warned: Optional[Set[str]] = None):
    """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled), as diffusers' encode_prompt;
    the negative pair is None without guidance. The refiner reads `prompt` only (as diffusers)."""
    stage, syntax = source.role, check_prompt_syntax(texts.syntax)
    prompts = as_list(texts.prompt, "prompt")
    prompts_2 = as_list(texts.prompt_2, "prompt_2") if texts.prompt_2 is not None and stage == BASE else prompts
    if len(prompts_2) != len(prompts):
        raise InputError(f"prompt_2 has {len(prompts_2)} entries but prompt has {len(prompts)}")
    zeros = do_cfg and texts.negative_prompt is None and source.force_zeros_for_empty_prompt
    tokenizers: Dict[str, object] = {}
    positive = _tokenize(load, source, _parts(stage, prompts, prompts_2), syntax, embeddings, tokenizers)
    negative = _tokenize(load, source, _parts(stage, *_negatives(texts, len(prompts))), syntax, embeddings,
                         tokenizers) if do_cfg and not zeros else []
    _warn(positive + negative, set() if warned is None else warned)
    chunks = max(t.chunks for part in positive + negative for t in part.tokens)
    embeds, pooled = _encode(positive, chunks, clip_skip)
    if not do_cfg:
        neg_embeds = neg_pooled = None
    elif zeros:
        neg_embeds, neg_pooled = mx.zeros_like(embeds), mx.zeros_like(pooled)
    else:
        neg_embeds, neg_pooled = _encode(negative, chunks, None)

    def per_image(x):
        return None if x is None else mx.repeat(x, num_images_per_prompt, axis=0).astype(dtype)

    return tuple(per_image(x) for x in (embeds, neg_embeds, pooled, neg_pooled))


def encode_conditioning(load: LoadPart, source: ModelSource, texts: PromptTexts, time_ids: Tuple[list, list], *,
                        dtype, num_images_per_prompt: int, clip_skip: Optional[int], guided: bool,
                        embeddings: Optional[EmbeddingSet] = None,
                        warned: Optional[Set[str]] = None) -> Conditioning:
    """A stage's Conditioning, evaluated (so the text encoders can be released afterwards).
    `warned`, shared by a request's stages, keeps each prompt-length warning to one."""
    pe, npe, pp, npp = encode_prompt(load, source, texts, dtype=dtype, num_images_per_prompt=num_images_per_prompt,
                                     clip_skip=clip_skip, do_cfg=guided, embeddings=embeddings, warned=warned)
    batch = pe.shape[0]
    pos, neg = time_ids
    ids = time_ids_rows(pos, batch).astype(dtype)
    cond = Conditioning(pe, pp, ids)
    if guided:
        cond = Conditioning(pe, pp, ids, npe, npp, time_ids_rows(neg, batch).astype(dtype))
    mx.eval(cond.arrays())
    return cond


def encoder_flags(cond: Conditioning, source: ModelSource) -> Dict[str, mx.array]:
    """{text encoder: lazy scalar bool}, true when that encoder's share of `cond` holds NaN/inf.
    The base's states are CLIP-L's width then bigG's; the pooled embeddings are bigG's."""
    from .health import nonfinite

    states = [cond.prompt_embeds, cond.negative_prompt_embeds]
    pooled = [cond.pooled_prompt_embeds, cond.negative_pooled_prompt_embeds]
    if source.role != BASE:
        return {"text_encoder_2": nonfinite(*states, *pooled)}
    w1 = source.configs["text_encoder"]["hidden_size"]
    first = [s[..., :w1] for s in states if s is not None]
    second = [s[..., w1:] for s in states if s is not None]
    return {"text_encoder": nonfinite(*first), "text_encoder_2": nonfinite(*second, *pooled)}


def embeddings_used(source: ModelSource, texts: Sequence[str], syntax: str,
                    embeddings: Optional[EmbeddingSet]) -> Dict[str, str]:
    """{token: short hash} of the loaded embeddings that `texts` use (A1111's "TI hashes")."""
    if not embeddings:
        return {}
    tokenizer = source.tokenizer("tokenizer_2")
    matcher = embeddings.matcher(tokenizer, "clip_g", len(tokenizer))
    used = [token for text in texts for token in tokenize_prompt(tokenizer, text, syntax, matcher).used]
    return {token: embeddings.get(token).shorthash for token in dict.fromkeys(used)}
