"""CLIP tokenizers for SDXL's two text encoders, read offline from diffusers folders.

`tokenizer/` (CLIP-L) pads with <|endoftext|> = 49407 and `tokenizer_2/` (bigG)
pads with "!" = 0; both settings come from the folder's own config files.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Sequence

import numpy as np

from .errors import InputError, WeightsError

CLIP_MAX_LENGTH = 77


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's 77 tokens and was cut."""


def load_tokenizer(folder):
    """A transformers CLIPTokenizer from a `tokenizer/` or `tokenizer_2/` folder
    (vocab.json + merges.txt + tokenizer_config.json, or a tokenizer.json)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"tokenizer folder not found: {folder}")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise WeightsError(
            f"{folder} is not a CLIP tokenizer folder: expected vocab.json and merges.txt "
            f"(or tokenizer.json); found: {present}"
        )
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds for broken files
        raise WeightsError(f"could not read the tokenizer in {folder}: {e}") from None
    if tokenizer.model_max_length > 10_000:  # not set in the folder's config
        tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


def tokenize(tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """Token ids (B, 77) int32 laid out as [bos, tokens..., eos, pad...].

    Prompts longer than the model's length are truncated (keeping the final eos),
    with a PromptTruncatedWarning that shows the dropped text.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"prompts must be a list of strings; got {prompts!r:.200}")
    prompts: List[str] = list(prompts)
    if not prompts:
        raise InputError("prompts is empty; give at least one prompt (\"\" for an empty one)")
    n = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True,
                    return_tensors="np").input_ids
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False).input_ids
    for prompt, f in zip(prompts, full):
        if len(f) > n:
            dropped = tokenizer.decode(f[n - 1:-1])
            warnings.warn(
                f"prompt is {len(f)} tokens long, CLIP takes {n}: {len(f) - n} tokens were dropped: "
                f"{dropped!r} (from prompt {prompt[:60]!r}...)",
                PromptTruncatedWarning,
                stacklevel=2,
            )
    return ids.astype(np.int32)
