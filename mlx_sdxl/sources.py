"""Where a pipeline's components come from.

A `ModelSource` describes one SDXL pipeline (a base or a refiner): which
components it has, their configs, and how to load each one. Every way users
keep weights (a diffusers folder, a hub id, a single-file checkpoint, a folder
written by `convert/`) becomes a ModelSource, so the pipeline needs no special
cases.
"""

from __future__ import annotations

import errno
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional

from .errors import SDXLError, WeightsError
from .schedulers import SDXL_SCHEDULER_CONFIG
from .spec import BASE, MODEL_PARTS, REFINER, TOKENIZERS
from .weights import find_weights, read_config, read_json_object


@dataclass
class ModelSource:
    """One SDXL pipeline's parts.

    `loaders[name](dtype)` builds the MLX module for a model part;
    `configs[name]` is its diffusers-style config dict; `tokenizers[name]()`
    returns a tokenizer; `fingerprints[name]` identifies identical weights so a
    refiner that shares text_encoder_2 and the VAE with the base loads them once.
    """

    role: str
    description: str
    configs: Dict[str, dict]
    loaders: Dict[str, Callable]
    tokenizers: Dict[str, Callable] = field(default_factory=dict)
    fingerprints: Dict[str, str] = field(default_factory=dict)
    scheduler_config: dict = field(default_factory=lambda: dict(SDXL_SCHEDULER_CONFIG))
    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False
    quantization: Dict[str, dict] = field(default_factory=dict)  # part → {"bits", "group_size", "convs"}
    name: str = ""  # what image metadata records: the hub id, or the file or folder name (no path)

    def __post_init__(self):
        if not self.name:
            self.name = _display_name(Path(self.description))

    @property
    def short_hash(self) -> str:
        """10 hex digits identifying the weights (from the parts' fingerprints)."""
        text = "".join(f"{k}={self.fingerprints[k]};" for k in sorted(self.fingerprints))
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def has(self, name: str) -> bool:
        return name in self.loaders or name in self.tokenizers

    def load(self, name: str, dtype=None):
        if name not in self.loaders:
            raise WeightsError(f"the {self.role} model ({self.description}) has no {name}")
        with self.reading_config(name):
            return self.loaders[name](dtype)

    @contextmanager
    def reading_config(self, name: str):
        """Within: a config field that is missing or of the wrong type is a WeightsError naming the part."""
        try:
            yield
        except (KeyError, TypeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise WeightsError(f"the {self.role} {name} config in {self.description} does not describe an SDXL "
                               f"{name} ({what})") from None

    def tokenizer(self, name: str):
        if name not in self.tokenizers:
            raise WeightsError(f"the {self.role} model ({self.description}) has no {name}")
        return self.tokenizers[name]()


def _display_name(path: Path) -> str:
    """A converted folder's base/ or refiner/ is named after the folder holding it."""
    if path.name in (BASE, REFINER) and (path.parent / "manifest.json").is_file():
        return path.parent.name
    return path.name


def check_not_a_loop(path: Path) -> None:
    """A symlink loop is reported as one (pathlib would just say it does not exist)."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise WeightsError(f"{path} is a symlink loop (it links back to itself)") from None


def role_of(unet_config: dict, pooled_dim: int) -> str:
    """An SDXL refiner conditions on 5 time ids (with the aesthetic score), the base on 6."""
    width = unet_config.get("addition_time_embed_dim") or 256
    total = unet_config.get("projection_class_embeddings_input_dim")
    if unet_config.get("addition_embed_type") != "text_time" or total is None:
        raise WeightsError("the UNet has no SDXL text_time conditioning; is this an SD 1.x/2.x model?")
    n_ids = (total - pooled_dim) / width
    if n_ids == 6:
        return BASE
    if n_ids == 5:
        return REFINER
    raise WeightsError(
        f"the UNet's added conditioning ({total} = pooled {pooled_dim} + {n_ids:g} x {width}) fits neither "
        "the SDXL base (6 time ids) nor the refiner (5 time ids)"
    )


def file_fingerprint(files) -> str:
    """Cheap identity of weight files: size, header, and bytes sampled at 16 offsets."""
    h = hashlib.sha256()
    for f in files:
        f = Path(f)
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
            for i in range(1, 16):
                fh.seek(size * i // 16)
                h.update(fh.read(1 << 12))
    return h.hexdigest()


def _check_role(source: ModelSource, role: str) -> None:
    if role == BASE and source.role == REFINER:
        raise WeightsError(
            f"{source.description} is an SDXL refiner (its UNet takes 5 time ids incl. the aesthetic score); "
            "pass it as refiner=..., and give an SDXL base model as the first argument"
        )
    if role == REFINER and source.role == BASE:
        raise WeightsError(
            f"{source.description} is an SDXL base model, not a refiner; pass it as the base (first argument)"
        )


def diffusers_folder(path, role: Optional[str] = None, variant: Optional[str] = None) -> ModelSource:
    """A local folder in diffusers layout (model_index.json, unet/, vae/, ...)."""
    from .models.clip import load_text_encoder
    from .models.unet import load_unet
    from .models.vae import load_vae
    from .tokenizer import load_tokenizer

    path = Path(path)
    for name in (*MODEL_PARTS, *TOKENIZERS):
        check_not_a_loop(path / name)
    if not (path / "unet").is_dir():
        present = ", ".join(sorted(p.name for p in path.iterdir())) if path.is_dir() else "nothing"
        raise WeightsError(f"{path} is not a diffusers SDXL folder: it has no unet/ (found: {present})")
    index = {}
    if (path / "model_index.json").is_file():
        index = read_config(path, "model_index.json")
    stems = {"unet": ["diffusion_pytorch_model"], "vae": ["diffusion_pytorch_model"],
             "text_encoder": ["model"], "text_encoder_2": ["model"]}
    load_fns = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder,
                "text_encoder_2": load_text_encoder}
    configs, loaders, fps = {}, {}, {}
    for name in MODEL_PARTS:
        folder = path / name
        entry = index.get(name, [None, None])
        listed_as_null = bool(index) and (entry is None or isinstance(entry, list) and entry[:1] == [None])
        if not folder.is_dir() or listed_as_null:
            continue
        configs[name] = read_config(folder)
        files = find_weights(folder, stems[name], variant)
        fps[name] = file_fingerprint(files)
        loaders[name] = partial(load_fns[name], folder, variant=variant)  # loader(dtype)
    tokenizers = {name: partial(load_tokenizer, path / name) for name in TOKENIZERS if (path / name).is_dir()}
    sched = dict(SDXL_SCHEDULER_CONFIG)
    if (path / "scheduler" / "scheduler_config.json").is_file():
        sched = read_config(path / "scheduler", "scheduler_config.json")
    if "text_encoder_2" not in configs:
        raise WeightsError(f"{path}: the SDXL pipeline is missing text_encoder_2")
    te2 = configs["text_encoder_2"]
    actual = role_of(configs["unet"], te2.get("projection_dim") or te2["hidden_size"])
    source = ModelSource(
        role=actual, description=str(path), configs=configs, loaders=loaders, tokenizers=tokenizers,
        fingerprints=fps, scheduler_config=sched,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", actual == BASE)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", actual == REFINER)),
    )
    if role is not None:
        _check_role(source, role)
    _check_complete(source)
    return source


def _check_complete(source: ModelSource) -> None:
    need = ["unet", "vae", "text_encoder_2", "tokenizer_2"]
    if source.role == BASE:
        need += ["text_encoder", "tokenizer"]
    missing = [n for n in need if not source.has(n)]
    if missing:
        raise WeightsError(f"{source.description}: the SDXL {source.role} is missing {', '.join(missing)}")


# ----------------------------------------------------------------------------- model parts


def _part_builders():
    from .models.clip import CLIPTextConfig, CLIPTextModel, clip_from_weights
    from .models.unet import UNet2DConditionModel, UNetConfig, unet_from_weights
    from .models.vae import AutoencoderKL, VAEConfig, vae_from_weights

    return {
        "unet": (UNetConfig.from_dict, UNet2DConditionModel, unet_from_weights),
        "vae": (VAEConfig.from_dict, AutoencoderKL, vae_from_weights),
        "text_encoder": (CLIPTextConfig.from_dict, CLIPTextModel, clip_from_weights),
        "text_encoder_2": (CLIPTextConfig.from_dict, CLIPTextModel, clip_from_weights),
    }


def _torch_layout_loader(name: str, config: dict, weights: dict):
    """A loader for tensors in diffusers naming and PyTorch layout (single-file checkpoints)."""

    def load(dtype=None):
        parse, _, from_weights = _part_builders()[name]
        return from_weights(parse(config), weights, dtype)

    return load


# ----------------------------------------------------------------------------- tokenizers

TOKENIZER_REPOS = {
    "tokenizer": [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"), ("openai/clip-vit-large-patch14", "")],
    "tokenizer_2": [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
                    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "")],
}
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "vocab.json").is_file() or (path / "tokenizer.json").is_file())


def resolve_tokenizers(role: str, near: Optional[Path] = None, tokenizer=None, tokenizer_2=None) -> Dict[str, Callable]:
    """Find tokenizer folders, in order: `tokenizer=` as a folder holding tokenizer/ and
    tokenizer_2/; `tokenizer=` / `tokenizer_2=` as tokenizer folders themselves; folders
    beside the checkpoint; the local Hugging Face cache."""
    from . import hub
    from .tokenizer import load_tokenizer

    names = list(TOKENIZERS) if role == BASE else ["tokenizer_2"]
    given = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    found = {}
    for name in names:
        candidates = []
        if tokenizer is not None:
            candidates.append(Path(tokenizer).expanduser() / name)
        if given[name] is not None:
            candidates.append(Path(given[name]).expanduser())
        if near is not None:
            candidates += [near / name, near.parent / name]
        path = next((c for c in candidates if _is_tokenizer_dir(c)), None)
        if path is None:
            for repo, sub in TOKENIZER_REPOS[name]:
                patterns = [f"{sub}/{f}" if sub else f for f in _TOKENIZER_FILES]
                snap = hub.cached_snapshot(repo, patterns)
                if snap is not None and _is_tokenizer_dir(snap / sub if sub else snap):
                    path = snap / sub if sub else snap
                    break
        if path is None:
            raise WeightsError(
                f"no {name} found for {near or 'the checkpoint'}: single-file checkpoints carry no tokenizer. "
                f"Pass tokenizer=<a diffusers or converted SDXL folder holding tokenizer/ and tokenizer_2/>, "
                f"or tokenizer=/tokenizer_2= tokenizer folders, or put {name}/ beside the checkpoint"
            )
        found[name] = partial(load_tokenizer, path)
    return found


# ----------------------------------------------------------------------------- single files


def _config_override(config) -> Optional[dict]:
    if config is None or isinstance(config, dict):
        return config
    path = Path(config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        return read_json_object(path, "a UNet config.json")
    except WeightsError as e:
        raise WeightsError(f"config override {config}: {e}") from None


def single_file_source(path, role: Optional[str] = None, *, config=None, tokenizer=None,
                       tokenizer_2=None) -> ModelSource:
    """A single-file SGM checkpoint (sd_xl_base_1.0.safetensors and fine-tunes in that layout)."""
    import warnings

    from .single_file import load_single_file

    path = Path(path)
    override = _config_override(config)
    ckpt = load_single_file(path, overrides={"unet": override} if override else None)
    if ckpt.unused:
        shown = ", ".join(ckpt.unused[:8]) + (f", ... ({len(ckpt.unused) - 8} more)" if len(ckpt.unused) > 8 else "")
        warnings.warn(f"{path.name}: {len(ckpt.unused)} checkpoint keys were not used: {shown}", stacklevel=3)
    configs = {name: cfg for name, (cfg, _) in ckpt.components.items()}
    loaders = {name: _torch_layout_loader(name, cfg, w) for name, (cfg, w) in ckpt.components.items()}
    fp = file_fingerprint([path])
    source = ModelSource(
        role=ckpt.role, description=str(path), configs=configs, loaders=loaders,
        tokenizers={}, fingerprints={name: f"{fp}:{name}" for name in loaders},
        force_zeros_for_empty_prompt=ckpt.role == BASE, requires_aesthetics_score=ckpt.role == REFINER,
        scheduler_config={**SDXL_SCHEDULER_CONFIG, **ckpt.schedule},  # no config in the file: SDXL's + markers
    )
    if role is not None:
        _check_role(source, role)
    source.tokenizers = resolve_tokenizers(source.role, path.parent, tokenizer, tokenizer_2)
    _check_complete(source)
    return source


# ----------------------------------------------------------------------------- converted folders

MLX_FORMAT = "mlx-sdxl"
QUANT_FILE = "quantization.json"


def is_converted(path: Path) -> bool:
    """A folder written by convert/: DIR/manifest.json, or one of its pipeline folders."""
    if (path / "manifest.json").is_file():
        return True
    index = path / "model_index.json"
    return index.is_file() and MLX_FORMAT in str(read_json_object(index, "a model_index.json").get("_format", ""))


def _mlx_layout_loader(name: str, folder: Path, config: dict):
    def load(dtype=None):
        from .weights import apply_weights, load_folder_weights

        parse, model_cls, _ = _part_builders()[name]
        model = model_cls(parse(config))
        if (folder / QUANT_FILE).is_file():
            from .quantize import check_settings, prepare_quantized

            q = read_config(folder, QUANT_FILE)
            try:
                check_settings(q.get("bits"), q.get("group_size"))
            except SDXLError as e:
                raise WeightsError(f"{folder / QUANT_FILE}: {e}") from None
            prepare_quantized(model, bits=q["bits"], group_size=q["group_size"], convs=q.get("convs", True))
        apply_weights(model, load_folder_weights(folder, ["model"]), name, dtype=dtype)
        if hasattr(model, "eval"):
            model.eval()
        return model

    return load


def converted_folder(path: Path, role: Optional[str] = None) -> ModelSource:
    """One pipeline folder written by convert/ (MLX layout, no key mapping, no torch)."""
    from .tokenizer import load_tokenizer

    index = read_config(path, "model_index.json")
    configs, loaders, fps, tokenizers = {}, {}, {}, {}
    for name in MODEL_PARTS:
        folder = path / name
        if (folder / "config.json").is_file():
            configs[name] = read_config(folder)
            fps[name] = file_fingerprint(find_weights(folder, ["model"]))
            loaders[name] = _mlx_layout_loader(name, folder, configs[name])
    for name in TOKENIZERS:
        if (path / name).is_dir():
            tokenizers[name] = partial(load_tokenizer, path / name)
    sched = read_config(path / "scheduler", "scheduler_config.json") if (path / "scheduler").is_dir() \
        else dict(SDXL_SCHEDULER_CONFIG)
    if "unet" not in configs or "text_encoder_2" not in configs:
        raise WeightsError(f"{path}: incomplete converted folder (no unet/ or text_encoder_2/)")
    te2 = configs["text_encoder_2"]
    actual = role_of(configs["unet"], te2.get("projection_dim") or te2["hidden_size"])
    source = ModelSource(role=actual, description=str(path), configs=configs, loaders=loaders,
                         tokenizers=tokenizers, fingerprints=fps, scheduler_config=sched,
                         force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", actual == BASE)),
                         requires_aesthetics_score=bool(index.get("requires_aesthetics_score", actual == REFINER)))
    source.quantization = {n: read_config(path / n, QUANT_FILE) for n in loaders if (path / n / QUANT_FILE).is_file()}
    if role is not None:
        _check_role(source, role)
    _check_complete(source)
    return source


# ----------------------------------------------------------------------------- VAE overrides


def vae_source(spec) -> ModelSource:
    """`vae=`: a diffusers vae/ folder, a model folder holding vae/, or a single VAE .safetensors file."""
    from .models.vae import load_vae
    from .weights import load_safetensors

    path = Path(str(spec)).expanduser()
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        config = read_config(folder)
        fp = file_fingerprint(find_weights(folder, ["diffusion_pytorch_model"]))
        loader = partial(load_vae, folder)
    elif path.is_file():
        from .single_file import VAE_PREFIX, infer_vae_config, ldm_vae_to_diffusers

        weights = load_safetensors(path)
        if any(k.startswith(("encoder.down.", "decoder.up.", VAE_PREFIX)) for k in weights):
            # original (LDM) naming, as in sdxl_vae.safetensors: the single-file VAE rules apply
            weights = ldm_vae_to_diffusers({k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v
                                            for k, v in weights.items()})
        config = infer_vae_config(weights)
        fp = file_fingerprint([path])
        loader = _torch_layout_loader("vae", config, weights)
    else:
        raise WeightsError(f"VAE not found: {spec} (expected a vae/ folder or a .safetensors file)")
    return ModelSource(role="vae", description=str(path), configs={"vae": config}, loaders={"vae": loader},
                       fingerprints={"vae": fp})


# ----------------------------------------------------------------------------- entry point


ACCEPTED = ("Accepted: a diffusers folder, a hub id such as stabilityai/stable-diffusion-xl-base-1.0, a single-file "
            ".safetensors checkpoint, or a folder written by `mlx-sdxl convert`")


def is_local_spec(text: str) -> bool:
    """Decided up front: a path that exists, or starts with '.', '/' or '~', or has more
    separators than a hub id's owner/name, is local; anything else may be a hub id."""
    if os.path.lexists(os.path.expanduser(text)) or text.startswith((".", "/", "~")):
        return True
    if os.altsep and os.altsep in text:
        return True
    return text.strip(os.sep).count(os.sep) > 1


def _local_folder(path: Path, role: str, text: str) -> ModelSource:
    if is_converted(path):
        if (path / "manifest.json").is_file():
            path = path / role
            if not path.is_dir():
                raise WeightsError(f"{text} holds no converted {role} (no {role}/ folder)")
        return converted_folder(path, role)
    return diffusers_folder(path, role)


def open_source(spec, role: str, *, config=None, tokenizer=None, tokenizer_2=None) -> ModelSource:
    """Turn what the user gave into a ModelSource: a diffusers folder, a hub repo id,
    a single-file .safetensors checkpoint, or a folder written by convert/."""
    try:
        return _open_source(spec, role, config=config, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    except (KeyError, TypeError) as e:  # a config object with a missing or wrongly typed field
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise WeightsError(f"{spec}: a config file there does not describe an SDXL model ({what})") from None


def _open_source(spec, role: str, *, config=None, tokenizer=None, tokenizer_2=None) -> ModelSource:
    from . import hub

    if isinstance(spec, ModelSource):
        _check_role(spec, role)
        return spec
    text = str(spec)
    path = Path(text).expanduser()
    check_not_a_loop(path)
    if is_local_spec(text):
        if path.is_dir():
            return _local_folder(path, role, text)
        if path.is_file():
            return single_file_source(path, role, config=config, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
        raise WeightsError(f"model not found: no such file or folder {text}. {ACCEPTED}")
    if hub.looks_like_repo_id(text):
        try:
            snap = hub.snapshot(text)
        except WeightsError as e:
            raise WeightsError(f"no such file or folder {text}, and {e}") from None
        source = diffusers_folder(snap, role, variant="fp16")
        source.name = text
        return source
    raise WeightsError(f"model not found: {spec!r}. {ACCEPTED}")
