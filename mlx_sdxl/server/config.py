"""What a server is configured with: models, folders, limits, security. Checked once, at start."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..errors import InputError
from ..spec import (DEFAULT_MAX_MEGAPIXELS, DEFAULT_METADATA, MAX_IMAGES, METADATA_MODES, SERVER_HOST,
                    SERVER_MAX_BODY_MB, SERVER_MAX_IMAGES, SERVER_MAX_QUEUE, SERVER_MAX_STEPS, SERVER_PORT,
                    SERVER_PREVIEW_EVERY)

VAE_DECODERS = ("full", "taesd")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is a `mlx-sdxl serve` flag."""

    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_steps: int = SERVER_MAX_STEPS
    max_images: int = SERVER_MAX_IMAGES        # batch_size × n_iter
    max_body_mb: float = SERVER_MAX_BODY_MB
    max_queue: int = SERVER_MAX_QUEUE

    def __post_init__(self):
        for name, low, high in (("max_steps", 1, 10_000), ("max_images", 1, MAX_IMAGES), ("max_queue", 1, 100_000)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InputError(f"--{name.replace('_', '-')} must be an integer in [{low}, {high}], got {value!r}")
        for name in ("max_megapixels", "max_body_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True)
class ModelOptions:
    """The models and how they load (the memory and precision flags of `generate`)."""

    model: str
    refiner: Optional[str]
    vae: Optional[str] = None
    dtype: str = "float32"
    refiner_bits: Optional[int] = None
    low_memory: bool = False
    compile: bool = False
    taesd: Optional[str] = None          # a folder, file or hub id; None: the local hub cache, if it has TAESDXL
    vae_decoder: str = "full"            # "taesd": final images decoded by TAESDXL too

    def __post_init__(self):
        if self.vae_decoder not in VAE_DECODERS:
            raise InputError(f"--vae-decoder must be one of {', '.join(VAE_DECODERS)}, got {self.vae_decoder!r}")


@dataclass(frozen=True)
class ServerConfig:
    models: ModelOptions
    host: str = SERVER_HOST
    port: int = SERVER_PORT
    credentials: Dict[str, str] = field(default_factory=dict)    # user → password; empty: no auth
    models_dir: Optional[Path] = None
    lora_dir: Optional[Path] = None
    embedding_dir: Optional[Path] = None
    outputs: Optional[Path] = None
    cors_origins: Tuple[str, ...] = ()
    limits: Limits = Limits()
    preview_every: int = SERVER_PREVIEW_EVERY
    metadata: str = DEFAULT_METADATA

    def __post_init__(self):
        if self.metadata not in METADATA_MODES:
            raise InputError(f"--metadata must be one of {', '.join(METADATA_MODES)}, got {self.metadata!r}")
        if isinstance(self.preview_every, bool) or not isinstance(self.preview_every, int) or self.preview_every < 1:
            raise InputError(f"--preview-every must be an integer >= 1, got {self.preview_every!r}")
        for name in ("models_dir", "lora_dir", "embedding_dir"):
            folder = getattr(self, name)
            if folder is not None and not Path(folder).is_dir():
                raise InputError(f"--{name.replace('_', '-')} {folder}: no such folder")


def parse_credentials(text: Optional[str]) -> Dict[str, str]:
    """'user:pass[,user:pass...]' (A1111's --api-auth) → {user: password}. The password may hold ':'."""
    if not text:
        return {}
    credentials = {}
    for pair in text.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise InputError("--api-auth must be USER:PASSWORD[,USER:PASSWORD...], each with a non-empty user "
                             "and password")
        credentials[user] = password
    return credentials


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, credentials: Dict[str, str]) -> Optional[str]:
    """A warning when the server listens beyond this machine without --api-auth, else None."""
    if is_loopback(host) or credentials:
        return None
    return (f"warning: listening on {host}, beyond this machine, without --api-auth: anyone who can reach this "
            "port can generate images, read the model list and use this computer's time; pass --api-auth "
            "USER:PASSWORD, or --host 127.0.0.1")
