"""CLIP text encoders: OpenAI CLIP-L (text_encoder) and OpenCLIP bigG (text_encoder_2).

Both are pre-LN transformers with causal self-attention and learned positions.
Parameter names are transformers' file keys without the `text_model.` prefix, so
`text_model.encoder.layers.3.mlp.fc1.weight` loads into `encoder.layers[3].mlp.fc1`;
bigG's `text_projection.weight` (Linear without bias) stays top-level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import ConfigError, InputError
from ..weights import Weights, apply_weights, load_folder_weights, parse_dtype, read_config

_ACTIVATIONS = {
    "quick_gelu": nn.gelu_fast_approx,  # exactly x * sigmoid(1.702 x)
    "gelu": nn.gelu,  # exact erf form
}


@dataclass
class CLIPTextConfig:
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    projection_dim: int = 512
    eos_token_id: int = 49407
    with_projection: bool = False

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"unsupported CLIP hidden_act {self.hidden_act!r}; accepted: {', '.join(_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIP hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_dict(cls, d: Mapping, with_projection: Optional[bool] = None) -> "CLIPTextConfig":
        """Read a transformers CLIPTextConfig config.json.

        The projection is used when `architectures` names CLIPTextModelWithProjection,
        unless `with_projection` says otherwise.
        """
        if "text_config" in d:
            raise ConfigError(
                "this is a full CLIPModel config (it has text_config); "
                "expected a text encoder config (model_type clip_text_model)"
            )
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ConfigError(f"unsupported text encoder model_type {d['model_type']!r}; accepted: clip_text_model")
        names = {f.name for f in fields(cls)} - {"with_projection"}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        if with_projection is None:
            with_projection = "CLIPTextModelWithProjection" in (d.get("architectures") or [])
        return cls(**kwargs, with_projection=bool(with_projection))


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        b, n, _ = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal")
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(b, n, -1))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act):
        super().__init__()
        self.act = act
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(d, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(d, config.intermediate_size, _ACTIVATIONS[config.hidden_act])

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array, extra: Optional[mx.array] = None) -> mx.array:
        n = input_ids.shape[1]
        return self.tokens(input_ids, extra) + self.position_embedding.weight[:n]

    def tokens(self, ids: mx.array, extra: Optional[mx.array]) -> mx.array:
        """Token vectors; with `extra` (k, width), ids vocab_size.. vocab_size+k-1 are its rows
        (textual-inversion vectors), so the vocabulary's own table stays as loaded."""
        if extra is None:
            return self.token_embedding(ids)
        vocab = self.vocab_size
        added = ids >= vocab
        known = self.token_embedding(mx.where(added, 0, ids))
        new = extra.astype(known.dtype)[mx.maximum(ids - vocab, 0)]
        return mx.where(added[..., None], new, known)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextModel(nn.Module):
    """CLIP text transformer, optionally with bigG's text_projection.

    `model(input_ids, clip_skip=None)` returns `(hidden, pooled)`, as the SDXL
    pipelines use them:
    - hidden = hidden_states[-(clip_skip + 2)] (clip_skip None or 0: the penultimate
      layer's output, without the final LayerNorm), shape (B, L, hidden_size);
    - pooled = final_layer_norm(last layer) at the EOS position, then text_projection
      when the model has one; shape (B, projection_dim or hidden_size). With
      `need_pooled=False` it is None and the layers after `hidden` are skipped.
    `extra_embeddings` (k, hidden_size), optional: vectors for the ids vocab_size..
    vocab_size+k-1 (textual-inversion tokens; see CLIPEmbeddings.tokens).
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.with_projection:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def _check_ids(self, input_ids, n_extra: int = 0) -> mx.array:
        ids = np.asarray(input_ids)
        c = self.config
        top = c.vocab_size + n_extra
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be a 2-D integer array (batch, tokens); got {ids.dtype} {ids.shape}")
        if not 1 <= ids.shape[1] <= c.max_position_embeddings:
            raise InputError(f"input_ids has {ids.shape[1]} tokens; accepted: 1 to {c.max_position_embeddings}")
        if ids.size and (ids.min() < 0 or ids.max() >= top):
            raise InputError(f"token ids must lie in [0, {top}); got {ids.min()}..{ids.max()}")
        return mx.array(ids.astype(np.int32))

    def _eos_positions(self, ids: mx.array) -> mx.array:
        # transformers' rule: configs with the legacy eos_token_id 2 take the first
        # position of the largest id; others the first position of eos_token_id.
        # Textual-inversion ids (past the vocabulary) never count as the largest: the end
        # token is meant (transformers would pick the added token; A1111 the end token).
        if self.config.eos_token_id == 2:
            return mx.argmax(mx.where(ids >= self.config.vocab_size, -1, ids), axis=-1)
        return mx.argmax((ids == self.config.eos_token_id).astype(mx.int32), axis=-1)

    def __call__(self, input_ids, clip_skip: Optional[int] = None, need_pooled: bool = True,
                 extra_embeddings: Optional[mx.array] = None) -> Tuple[mx.array, Optional[mx.array]]:
        n_layers = self.config.num_hidden_layers
        skip = clip_skip or 0
        if not 0 <= skip < n_layers:
            raise InputError(f"clip_skip must be None or in 0..{n_layers - 1}; got {clip_skip}")
        n_extra = 0 if extra_embeddings is None else extra_embeddings.shape[0]
        if extra_embeddings is not None and tuple(extra_embeddings.shape[1:]) != (self.config.hidden_size,):
            raise InputError(f"extra_embeddings must have shape (k, {self.config.hidden_size}); "
                             f"got {tuple(extra_embeddings.shape)}")
        ids = self._check_ids(input_ids, n_extra)
        stop = n_layers - 1 - skip  # hidden = output after `stop` layers
        layers = self.encoder.layers if need_pooled else self.encoder.layers[:stop]

        x = self.embeddings(ids, extra_embeddings)
        hidden = x if stop == 0 else None
        for i, layer in enumerate(layers, start=1):
            x = layer(x)
            if i == stop:
                hidden = x
        if not need_pooled:
            return hidden, None

        last = self.final_layer_norm(x)
        pooled = last[mx.arange(last.shape[0]), self._eos_positions(ids)]
        if "text_projection" in self:
            pooled = self.text_projection(pooled)
        return hidden, pooled


def _strip_prefix(weights: Mapping[str, mx.array]) -> Weights:
    """transformers file keys → module names: drop `text_model.` and `position_ids`."""
    out = {}
    for k, v in weights.items():
        if k.endswith("position_ids"):
            continue
        out[k[len("text_model."):] if k.startswith("text_model.") else k] = v
    return out


def clip_from_weights(config: CLIPTextConfig, weights: Mapping[str, mx.array], dtype=None,
                      what: str = "CLIP text encoder") -> CLIPTextModel:
    """Build a CLIPTextModel from tensors named as in transformers' files
    (with or without the `text_model.` prefix)."""
    model = CLIPTextModel(config)
    apply_weights(model, _strip_prefix(weights), what, dtype=parse_dtype(dtype))
    model.eval()
    return model


def load_text_encoder(path, dtype=None, variant: Optional[str] = None) -> CLIPTextModel:
    """Load a diffusers `text_encoder/` or `text_encoder_2/` folder
    (config.json + model[.fp16].safetensors, possibly sharded)."""
    path = Path(path)
    config = CLIPTextConfig.from_dict(read_config(path))
    weights = load_folder_weights(path, ["model"], variant)
    return clip_from_weights(config, weights, dtype, what=f"text encoder in {path}")
