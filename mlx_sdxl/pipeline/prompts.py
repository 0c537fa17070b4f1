"""Prompts → what the UNets attend to: token embeddings, pooled embeddings, time ids.

The base reads CLIP-L and OpenCLIP bigG (penultimate states, concatenated to width
2048) and bigG's pooled projection; the refiner reads bigG alone. With no negative
prompt, a model whose `force_zeros_for_empty_prompt` is set (the base) guides against
zeros; otherwise (the refiner) it encodes "".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import mlx.core as mx

from ..conditioning import Prompt, as_list, broadcast, time_ids_rows
from ..errors import InputError
from ..sources import ModelSource
from ..spec import BASE
from ..tokenizer import tokenize

LoadPart = Callable[[ModelSource, str], object]  # (source, part name) -> loaded model


@dataclass(frozen=True)
class PromptTexts:
    """The prompts of one request, as given (strings or lists)."""

    prompt: Prompt
    negative_prompt: Optional[Prompt] = None
    prompt_2: Optional[Prompt] = None
    negative_prompt_2: Optional[Prompt] = None


@dataclass(frozen=True)
class Conditioning:
    """One stage's conditioning, per image: with guidance also the negative branch."""

    prompt_embeds: mx.array            # (B, 77, width)
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


def _parts(stage: str, texts: List[str], texts_2: List[str]):
    """(tokenizer, encoder, texts) for each text encoder the stage's UNet reads."""
    if stage == BASE:
        return [("tokenizer", "text_encoder", texts), ("tokenizer_2", "text_encoder_2", texts_2)]
    return [("tokenizer_2", "text_encoder_2", texts)]


def _encode(load: LoadPart, source: ModelSource, parts, clip_skip) -> Tuple[mx.array, mx.array]:
    hiddens, pooled = [], None
    for tok_name, enc_name, texts in parts:
        ids = mx.array(tokenize(source.tokenizer(tok_name), texts))
        need_pooled = enc_name == "text_encoder_2"
        hidden, pool = load(source, enc_name)(ids, clip_skip=clip_skip, need_pooled=need_pooled)
        hiddens.append(hidden)
        if need_pooled:
            pooled = pool
    return (mx.concatenate(hiddens, axis=-1) if len(hiddens) > 1 else hiddens[0]), pooled


def encode_prompt(load: LoadPart, source: ModelSource, texts: PromptTexts, *, dtype, num_images_per_prompt: int = 1,
                  clip_skip: Optional[int] = None, do_cfg: bool = True):
    """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled), as diffusers' encode_prompt;
    the negative pair is None without guidance. The refiner reads `prompt` only (as diffusers)."""
    stage = source.role
    prompts = as_list(texts.prompt, "prompt")
    prompts_2 = as_list(texts.prompt_2, "prompt_2") if texts.prompt_2 is not None and stage == BASE else prompts
    if len(prompts_2) != len(prompts):
        raise InputError(f"prompt_2 has {len(prompts_2)} entries but prompt has {len(prompts)}")
    embeds, pooled = _encode(load, source, _parts(stage, prompts, prompts_2), clip_skip)
    if not do_cfg:
        neg_embeds = neg_pooled = None
    elif texts.negative_prompt is None and source.force_zeros_for_empty_prompt:
        neg_embeds, neg_pooled = mx.zeros_like(embeds), mx.zeros_like(pooled)
    else:
        neg = broadcast(as_list(texts.negative_prompt if texts.negative_prompt is not None else "",
                                "negative_prompt"), len(prompts), "negative_prompt")
        neg_2 = neg if texts.negative_prompt_2 is None else broadcast(
            as_list(texts.negative_prompt_2, "negative_prompt_2"), len(prompts), "negative_prompt_2")
        neg_embeds, neg_pooled = _encode(load, source, _parts(stage, neg, neg_2), None)

    def per_image(x):
        return None if x is None else mx.repeat(x, num_images_per_prompt, axis=0).astype(dtype)

    return tuple(per_image(x) for x in (embeds, neg_embeds, pooled, neg_pooled))


def encode_conditioning(load: LoadPart, source: ModelSource, texts: PromptTexts, time_ids: Tuple[list, list], *,
                        dtype, num_images_per_prompt: int, clip_skip: Optional[int], guided: bool) -> Conditioning:
    """A stage's Conditioning, evaluated (so the text encoders can be released afterwards)."""
    pe, npe, pp, npp = encode_prompt(load, source, texts, dtype=dtype, num_images_per_prompt=num_images_per_prompt,
                                     clip_skip=clip_skip, do_cfg=guided)
    batch = pe.shape[0]
    pos, neg = time_ids
    ids = time_ids_rows(pos, batch).astype(dtype)
    cond = Conditioning(pe, pp, ids)
    if guided:
        cond = Conditioning(pe, pp, ids, npe, npp, time_ids_rows(neg, batch).astype(dtype))
    mx.eval(cond.arrays())
    return cond
