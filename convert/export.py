"""Writing an MLX-native SDXL folder.

Layout:
    DIR/manifest.json           source, dtype, quantization, package version
    DIR/base/                   model_index.json, scheduler/, tokenizer*/, and per model part
    DIR/refiner/                  <part>/config.json + model[-0000k-of-0000n].safetensors (≤ 2 GB
                                  shards, MLX layout) [+ quantization.json]
The folder appears under its final name only when complete: everything is
written to a hidden sibling first, then renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_sdxl.errors import InputError
from mlx_sdxl.signals import deferred
from mlx_sdxl.sources import MLX_FORMAT, QUANT_FILE, open_source, vae_source
from mlx_sdxl.spec import BASE, DEFAULT_GROUP_SIZE, MODEL_PARTS, REFINER, TEXT_ENCODERS, TOKENIZERS
from mlx_sdxl.tempfiles import old_path, partial_path, remove_path, remove_stale
from mlx_sdxl.version import __version__
from mlx_sdxl.weights import parse_dtype

SHARD_BYTES = 2_000_000_000
QUANTIZABLE = ("unet", *TEXT_ENCODERS)


def _say(log: Optional[Callable], msg: str) -> None:
    if log is not None:
        log(msg)


def _open_output(path: Path):
    """The file object a shard is written through (a test replaces it to simulate a full disk)."""
    return open(path, "wb")


def save_weights(params: dict, folder: Path, max_bytes: int = SHARD_BYTES) -> int:
    """Save a flat name → array dict as ≤ max_bytes safetensors shards (+ index when sharded).

    Arrays are evaluated one shard at a time and dropped after writing, so memory
    stays near one shard even for lazily loaded multi-GB models."""
    names = list(params)
    shards, current, size = [], [], 0
    for name in names:
        nbytes = params[name].nbytes
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    total = 0
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: params.pop(n) for n in shard}
        with _open_output(folder / fname) as f:  # Python writes: a full disk is an OSError with its errno
            mx.save_safetensors(f, tensors, metadata={"format": "mlx"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({n: fname for n in shard})
        del tensors
        mx.clear_cache()
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def _write_pipeline(source, dest: Path, dtype, bits: Optional[int], group_size: int, convs: bool, vae,
                    log) -> dict:
    from mlx_sdxl.quantize import quantization_info, quantize_model

    dest.mkdir(parents=True)
    summary = {}
    index = {"_format": MLX_FORMAT, "_class_name": "StableDiffusionXLPipeline" if source.role == BASE
             else "StableDiffusionXLImg2ImgPipeline",
             "force_zeros_for_empty_prompt": source.force_zeros_for_empty_prompt,
             "requires_aesthetics_score": source.requires_aesthetics_score}
    (dest / "model_index.json").write_text(json.dumps(index, indent=1))
    (dest / "scheduler").mkdir()
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(source.scheduler_config, indent=1))
    for name in TOKENIZERS:
        if source.has(name):
            source.tokenizer(name).save_pretrained(str(dest / name))
    for name in MODEL_PARTS:
        src = vae if name == "vae" and vae is not None else source
        if not src.has(name):
            continue
        t0 = time.perf_counter()
        model = src.load(name, dtype)
        folder = dest / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(src.configs[name], indent=1))
        if bits and name == "unet":
            quantize_model(model, bits=bits, group_size=group_size, convs=convs)
            (folder / QUANT_FILE).write_text(json.dumps(quantization_info(model), indent=1))
        params = dict(tree_flatten(model.parameters()))
        del model
        nbytes = save_weights(params, folder)
        summary[name] = nbytes
        _say(log, f"  {dest.name}/{name}: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return summary


def _manifest(base, refiner, vae, dt) -> dict:
    return {
        "format": MLX_FORMAT, "format_version": 1, "mlx_sdxl_version": __version__, "mlx_version": mx.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dt).replace("mlx.core.", ""),
        "source": {BASE: str(base), REFINER: None if refiner is None else str(refiner),
                   "vae": None if vae is None else str(vae)},
        "quantization": {},
        "bytes": {},
    }


def _swap_into_place(tmp: Path, out: Path, log) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` goes aside as `.NAME.old-<pid>` and is
    removed. Signals wait until this is done, so a signal leaves either the old folder or the new one,
    and no `.old-` copy; if the second rename fails, the old folder is put back."""
    with deferred():
        if not (out.exists() or out.is_symlink()):
            os.replace(tmp, out)
            return
        old = old_path(out)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        try:
            remove_path(old)
        except OSError as e:
            _say(log, f"warning: could not remove the replaced folder {old} ({e.strerror or e}); "
                      "the next convert into this folder removes it")


def _as_write_error(e: OSError, tmp: Path, out: Path) -> OSError:
    """An OSError while writing the temporary folder, reported against `out` (the path the user gave)."""
    if e.filename is None or str(e.filename).startswith(str(tmp)):
        return OSError(e.errno, f"could not write the converted folder ({e.strerror or e}); nothing was kept",
                       str(out))
    return e


def _write_all(tmp: Path, sources: dict, manifest: dict, dt, bits: dict, group_size: int, convs: bool,
               log) -> None:
    """Write every pipeline of `sources` ({role: ModelSource, "vae": ...}) and the manifest into `tmp`."""
    tmp.mkdir()
    for role in (BASE, REFINER):
        if sources.get(role) is None:
            continue
        if role == REFINER:
            _say(log, f"converting refiner {manifest['source'][REFINER]}")
        manifest["bytes"][role] = _write_pipeline(sources[role], tmp / role, dt, bits[role], group_size, convs,
                                                  sources["vae"], log)
        if bits[role]:
            manifest["quantization"][f"{role}/unet"] = {"bits": bits[role], "group_size": group_size,
                                                        "convs": convs}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def convert(base, out, *, refiner=None, vae=None, dtype="float16", refiner_bits: Optional[int] = None,
            base_bits: Optional[int] = None, group_size: int = DEFAULT_GROUP_SIZE, convs: bool = True,
            overwrite: bool = False, config=None, refiner_config=None, tokenizer=None, tokenizer_2=None,
            log: Optional[Callable] = print, loras=()) -> Path:
    """Convert `base` (and `refiner`) into an MLX folder at `out`; returns the path.

    `loras`: "PATH[:SCALE]" LoRAs fused into the base's UNet and text encoders before any
    quantization (checked before anything is written); the manifest lists them.

    Everything is written to `.NAME.partial-<pid>` beside `out` and renamed when complete; on any
    error or interruption (SIGTERM/SIGHUP too, inside signals.terminate_as_interrupt) it is removed.
    Temporaries of earlier, killed conversions in that folder are removed first.
    """
    out = Path(out).expanduser()
    dt = parse_dtype(dtype)
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the folder {out.parent} does not exist")
    remove_stale(out.parent)  # first: it may put back a folder an earlier, killed --overwrite had moved aside
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise InputError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    sources = {BASE: open_source(base, BASE, config=config, tokenizer=tokenizer, tokenizer_2=tokenizer_2),
               REFINER: open_source(refiner, REFINER, config=refiner_config, tokenizer=tokenizer or base,
                                    tokenizer_2=tokenizer_2) if refiner is not None else None,
               "vae": vae_source(vae) if vae is not None else None}
    manifest = _manifest(base, refiner, vae, dt)
    if loras:
        from mlx_sdxl.lora.bake import baked_source, manifest_entries

        sources[BASE], baked = baked_source(sources[BASE], loras, [sources[REFINER]])
        manifest["loras"] = manifest_entries(baked, loras)
    if refiner_bits or base_bits:
        from mlx_sdxl.quantize import check_settings

        for bits in filter(None, (refiner_bits, base_bits)):
            check_settings(bits, group_size)
    tmp = partial_path(out)
    if tmp.exists() or tmp.is_symlink():  # left by an earlier process that had our pid
        remove_path(tmp)
    t0 = time.perf_counter()
    _say(log, f"converting {base} -> {out}")
    try:
        _write_all(tmp, sources, manifest, dt, {BASE: base_bits, REFINER: refiner_bits},
                   group_size, convs, log)
        _swap_into_place(tmp, out, log)
    except BaseException as e:
        _discard(tmp)
        if isinstance(e, OSError):
            raise _as_write_error(e, tmp, out) from None
        raise
    _say(log, f"done in {time.perf_counter() - t0:.1f} s: {out}")
    return out


def _discard(tmp: Path) -> None:
    """Remove the partial folder after a failure; signals wait, so the removal is never cut short."""
    with deferred():
        shutil.rmtree(tmp, ignore_errors=True)
