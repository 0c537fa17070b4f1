"""Textual-inversion embeddings for SDXL: new words whose input vectors were learned.

An SDXL embedding file (.safetensors) holds `clip_l` (n × 768) and `clip_g` (n × 1280):
n vectors for the token tables of `text_encoder` and `text_encoder_2`. Loaded under a
token (the file's stem by default), the token stands for those n vectors in any prompt,
in either prompt syntax, for the base and the refiner (which reads `clip_g`).

As in A1111, a token is found by its CLIP tokens (so case does not matter, and it may sit
inside weights, "(mytoken:1.2)"), and it takes n of a chunk's 75 places. Its vectors reach
the text encoders as extra rows after the vocabulary: row `vocab_size + k` is the k-th
vector loaded, so the vocabulary itself is never touched.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .errors import InputError, WeightsError
from .spec import CHUNK_TOKENS

# the text encoder each tensor of an SDXL embedding belongs to
ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
_SDXL_SHAPE = "clip_l (n x 768) and clip_g (n x 1280) tensors, 1 <= n <= 75"
_BAD_TOKEN = re.compile(r"[\s()\[\]:,\\]")   # characters the a1111 syntax would read as syntax


@dataclass(frozen=True)
class Embedding:
    """One loaded embedding: its token, vectors per tensor name, and file identity."""

    token: str
    vectors: Dict[str, np.ndarray]     # "clip_l" / "clip_g" -> (n, width) float32
    path: Path
    sha256: str

    @property
    def length(self) -> int:
        return self.vectors["clip_g"].shape[0]

    @property
    def shorthash(self) -> str:
        """The first 12 hex digits of the file's SHA-256, as A1111's "TI hashes" lists it."""
        return self.sha256[:12]


def check_token(token) -> str:
    if not isinstance(token, str) or not token or _BAD_TOKEN.search(token) or token == "BREAK":
        raise InputError(f"embedding token {token!r} is not usable: give a non-empty word without spaces, "
                         "brackets, ':', ',' or '\\' (and not BREAK), e.g. token='my-style'")
    return token


def _tensors(path: Path) -> Dict[str, np.ndarray]:
    """The file's clip_l and clip_g vectors as float32 (n, width), their shapes checked first."""
    from .weights import load_safetensors

    if path.suffix.lower() != ".safetensors":
        raise WeightsError(f"{path}: embeddings are read from .safetensors files with {_SDXL_SHAPE}; "
                           f"got a {path.suffix or 'suffix-less'} file")
    tensors = load_safetensors(path)
    found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()) or "no tensors"
    missing = [k for k in ENCODER_KEYS.values() if k not in tensors]
    if missing:
        kind = " (an SD 1.x/2.x embedding has one tensor for one text encoder)" if len(tensors) == 1 else ""
        raise WeightsError(f"{path} is not an SDXL embedding{kind}: it has {found}; "
                           f"an SDXL embedding has {_SDXL_SHAPE}")
    vectors = {k: tensors[k].reshape(1, -1) if tensors[k].ndim == 1 else tensors[k] for k in ENCODER_KEYS.values()}
    shapes = {k: tuple(v.shape) for k, v in vectors.items()}
    if any(len(s) != 2 for s in shapes.values()) or len({s[0] for s in shapes.values()}) != 1 \
            or not 1 <= shapes["clip_g"][0] <= CHUNK_TOKENS:
        raise WeightsError(f"{path}: shapes {shapes} do not fit an SDXL embedding: expected {_SDXL_SHAPE}, "
                           "both with the same n")
    return {k: np.array(v.astype(mx.float32)) for k, v in vectors.items()}  # read only once checked


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_embedding(path, token: Optional[str] = None) -> Embedding:
    """Read and check an SDXL embedding file; the token defaults to the file's stem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"embedding file not found: {path}")
    vectors = _tensors(path)
    if not all(np.isfinite(v).all() for v in vectors.values()):
        raise WeightsError(f"{path}: the embedding holds NaN or infinite values")
    return Embedding(check_token(path.stem if token is None else token), vectors, path, _sha256(path))


def named_in(folder, texts: Sequence[Optional[str]]) -> List[Path]:
    """The .safetensors files under `folder` (searched recursively) whose stem appears in one
    of `texts` as a word of its own, ignoring case."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"embedding folder not found: {folder}")
    text = "\n".join(t for t in texts if t)
    return [path for path in sorted(folder.rglob("*.safetensors"))
            if re.search(rf"(?<!\w){re.escape(path.stem)}(?!\w)", text, re.IGNORECASE)]


def _token_ids(tokenizer, text: str) -> Tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


class Matcher:
    """Finds loaded tokens in a list of token ids, for one tokenizer and text encoder."""

    def __init__(self, tokenizer, embeddings: Sequence[Embedding], key: str, first_id: int):
        rows, self._by_first = 0, {}
        for emb in embeddings:
            name = _token_ids(tokenizer, emb.token)
            ids = list(range(first_id + rows, first_id + rows + emb.length))
            self._by_first.setdefault(name[0], []).append((name, ids, emb.token))
            rows += emb.length
        for options in self._by_first.values():
            options.sort(key=lambda o: -len(o[0]))  # the longest name wins
        self.table = mx.array(np.concatenate([e.vectors[key] for e in embeddings])) if embeddings else None

    def at(self, ids: Sequence[int], pos: int) -> Optional[Tuple[int, List[int], str]]:
        """(tokens matched, the ids that stand for the vectors, token) when a token starts at `pos`."""
        for name, placeholder, token in self._by_first.get(ids[pos], ()):
            if tuple(ids[pos:pos + len(name)]) == name:
                return len(name), placeholder, token
        return None


class EmbeddingSet:
    """The embeddings a pipeline has loaded, in load order."""

    def __init__(self):
        self._items: List[Embedding] = []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Embedding]:
        return iter(list(self._items))

    def get(self, token: str) -> Optional[Embedding]:
        return next((e for e in self._items if e.token == token), None)

    def add(self, emb: Embedding, widths: Dict[str, int], tokenizer) -> Embedding:
        """Check `emb` against the text encoders' `widths` and the vocabulary, then keep it.
        Loading the same file under the same token again changes nothing."""
        for key, width in widths.items():
            got = emb.vectors[key].shape[1]
            if got != width:
                raise WeightsError(f"{emb.path}: its {key} vectors are {got} wide, but this model's text encoder "
                                   f"takes {width}; is it an embedding for another model?")
        name = _token_ids(tokenizer, emb.token)
        if not name:
            raise InputError(f"embedding token {emb.token!r} reads as no CLIP token at all; load it under "
                             "another token (load_embedding(path, token=...))")
        if len(name) == 1:
            raise InputError(f"embedding token {emb.token!r} is already a word of CLIP's vocabulary, so it would "
                             "replace that word in every prompt; load it under another token "
                             "(load_embedding(path, token=...))")
        for other in self._items:
            if other.token == emb.token and other.sha256 == emb.sha256:
                return other
            if other.token.lower() == emb.token.lower() or _token_ids(tokenizer, other.token) == name:
                raise InputError(f"embedding token {emb.token!r} is already taken by {other.path} "
                                 f"(loaded as {other.token!r}); load {emb.path.name} under another token")
        self._items.append(emb)
        return emb

    def matcher(self, tokenizer, key: str, first_id: int) -> Optional[Matcher]:
        """A Matcher for the text encoder whose vectors are `key` ("clip_l" / "clip_g") and whose
        vocabulary ends at `first_id`; None when nothing is loaded."""
        return Matcher(tokenizer, self._items, key, first_id) if self._items else None
