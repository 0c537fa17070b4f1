"""The models the server owns: one pipeline at a time, the checkpoints it may switch to, the
embeddings it has loaded, and TAESDXL.

Only the queue's worker thread builds or switches pipelines (`pipeline`, `select`); request
handlers read listings and names, which never touch MLX.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import SDXLError
from ..spec import DEFAULT_HIGH_NOISE_FRAC
from .config import ServerConfig
from .folders import Entry, NotInFolder, find, list_entries

NO_REFINER = "none"


@dataclass(frozen=True)
class Checkpoint:
    title: str              # what clients see and send back
    spec: str               # what from_pretrained loads
    entry: Optional[Entry]  # None for the server's own --model / --refiner


@dataclass(frozen=True)
class Choice:
    """The models one request runs on: a base, a refiner (or none) and the hand-off fraction."""

    base: Checkpoint
    refiner: Optional[Checkpoint]
    high_noise_frac: float


class ModelManager:
    def __init__(self, config: ServerConfig):
        """Opens the server's own --model and --refiner (configs only; weights load on first use)."""
        self.config = config
        self._lock = threading.Lock()
        self.embeddings_loaded: Dict[str, dict] = {}
        self.embeddings_skipped: Dict[str, dict] = {}
        opts = config.models
        self._pipe = self._build(opts.model, opts.refiner)
        self._loaded: Optional[Tuple[str, Optional[str]]] = (opts.model, opts.refiner)
        self.default = Checkpoint(self._pipe.base.name, opts.model, None)
        refiner = self._pipe.refiner
        self.default_refiner = Checkpoint(refiner.name, opts.refiner, None) if refiner is not None else None
        self._selected = self.default     # what options say (POST /options switches it)

    # ---------------------------------------------------------------- listings (any thread)
    def checkpoints(self) -> List[Checkpoint]:
        own = [self.default] + ([self.default_refiner] if self.default_refiner else [])
        listed = [Checkpoint(e.name, str(e.path), e) for e in list_entries(self.config.models_dir, models=True)]
        return own + [c for c in listed if c.title not in {o.title for o in own}]

    def checkpoint(self, name: str) -> Checkpoint:
        """The checkpoint a request names (title, or a models-dir name with or without extension)."""
        for own in filter(None, (self.default, self.default_refiner)):
            if name == own.title:
                return own
        entries = list_entries(self.config.models_dir, models=True)
        entry = find(entries, name, "checkpoint", "--models-dir" if self.config.models_dir else
                     "the server (no --models-dir was given)")
        return Checkpoint(entry.name, str(entry.path), entry)

    @property
    def selected(self) -> Checkpoint:
        with self._lock:
            return self._selected

    def choose(self, checkpoint: Optional[str], refiner: Optional[str], switch_at: Optional[float]) -> Choice:
        """A request's models, checked now (names resolved only in the configured folders)."""
        base = self.checkpoint(checkpoint) if checkpoint else self.selected
        frac = DEFAULT_HIGH_NOISE_FRAC if switch_at is None else switch_at
        if refiner is None or refiner == "":
            chosen = self.default_refiner
        elif refiner.lower() == NO_REFINER:
            chosen = None
        else:
            chosen = self.checkpoint(refiner)
        return Choice(base, chosen, frac if chosen is not None else 1.0)

    # ---------------------------------------------------------------- the worker
    def select(self, checkpoint: Checkpoint) -> None:
        """Make `checkpoint` the model requests use by default, and load it (POST /options)."""
        with self._lock:
            self._selected = checkpoint
        self.pipeline(Choice(checkpoint, None, 1.0))

    def pipeline(self, choice: Choice):
        """The pipeline for `choice`, built (lazily, from configs) when it differs from the loaded one.
        A request that wants no refiner runs on the loaded pipeline with the hand-off at 1 (no reload)."""
        if choice.refiner is not None:
            refiner = choice.refiner.spec
        elif self._loaded is not None and self._loaded[0] == choice.base.spec:
            refiner = self._loaded[1]
        else:  # the default refiner loads only when a request uses it
            refiner = self.default_refiner.spec if self.default_refiner else None
        key = (choice.base.spec, refiner)
        if self._pipe is None or key != self._loaded:
            self._pipe = None  # free the old models first: one pipeline's weights at a time
            import mlx.core as mx

            mx.clear_cache()
            self._pipe = self._build(*key)
            self._loaded = key
        return self._pipe

    def _build(self, base: str, refiner: Optional[str]):
        import mlx.core as mx

        from ..pipeline import SDXLPipeline

        opts = self.config.models
        pipe = SDXLPipeline.from_pretrained(base, refiner if refiner else False, dtype=getattr(mx, opts.dtype),
                                            refiner_bits=opts.refiner_bits if refiner else None,
                                            low_memory=opts.low_memory, vae=opts.vae, compile=opts.compile)
        self._load_embeddings(pipe)
        return pipe

    def _load_embeddings(self, pipe) -> None:
        """Every SDXL embedding in --embedding-dir, as A1111 loads them; the ones that do not fit
        this model are listed as skipped, with the reason."""
        loaded, skipped = {}, {}
        for entry in list_entries(self.config.embedding_dir):
            try:
                emb = pipe.load_embedding(entry.path)
            except SDXLError as e:
                skipped[entry.title] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                        "shape": 0, "vectors": 0, "error": str(e)}
                continue
            shape = sum(v.shape[1] for v in emb.vectors.values())
            loaded[emb.token] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": shape,
                                 "vectors": emb.length}
        self.embeddings_loaded, self.embeddings_skipped = loaded, skipped

    def release(self) -> None:
        """Drop the pipeline (the server is stopping): its weights are freed with it."""
        self._pipe, self._loaded = None, None

    def loaded_hash(self, checkpoint: Checkpoint) -> Optional[str]:
        """The short hash of `checkpoint` when it is the loaded base (hashing other files would read them)."""
        pipe, loaded = self._pipe, self._loaded
        if pipe is not None and loaded is not None and loaded[0] == checkpoint.spec:
            return pipe.base.short_hash
        if pipe is not None and pipe.refiner is not None and loaded[1] == checkpoint.spec:
            return pipe.refiner.short_hash
        return None


def loras(folder: Optional[Path]) -> List[dict]:
    """GET /sdapi/v1/loras: A1111's shape; paths relative to --lora-dir (no local paths leave the server)."""
    return [{"name": e.title, "alias": e.title, "path": e.name, "metadata": {}} for e in list_entries(folder)]


__all__ = ["ModelManager", "Checkpoint", "Choice", "NotInFolder", "loras"]
