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
from mlx_sdxl.sources import MLX_FORMAT, QUANT_FILE, open_source, vae_source
from mlx_sdxl.spec import BASE, DEFAULT_GROUP_SIZE, MODEL_PARTS, REFINER, TEXT_ENCODERS, TOKENIZERS
from mlx_sdxl.version import __version__
from mlx_sdxl.weights import parse_dtype

SHARD_BYTES = 2_000_000_000
QUANTIZABLE = ("unet", *TEXT_ENCODERS)


def _say(log: Optional[Callable], msg: str) -> None:
    if log is not None:
        log(msg)


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
        mx.save_safetensors(str(folder / fname), tensors, metadata={"format": "mlx"})
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


def convert(base, out, *, refiner=None, vae=None, dtype="float16", refiner_bits: Optional[int] = None,
            base_bits: Optional[int] = None, group_size: int = DEFAULT_GROUP_SIZE, convs: bool = True,
            overwrite: bool = False, config=None, refiner_config=None, tokenizer=None, tokenizer_2=None,
            log: Optional[Callable] = print) -> Path:
    """Convert `base` (and `refiner`) into an MLX folder at `out`; returns the path."""
    out = Path(out).expanduser()
    dt = parse_dtype(dtype)
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: the folder {out.parent} does not exist")
    base_src = open_source(base, BASE, config=config, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    refiner_src = open_source(refiner, REFINER, config=refiner_config, tokenizer=tokenizer or base,
                              tokenizer_2=tokenizer_2) if refiner is not None else None
    vae_src = vae_source(vae) if vae is not None else None
    if refiner_bits or base_bits:
        from mlx_sdxl.quantize import check_settings

        for bits in filter(None, (refiner_bits, base_bits)):
            check_settings(bits, group_size)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    try:
        tmp.mkdir()
        manifest = {
            "format": MLX_FORMAT, "format_version": 1, "mlx_sdxl_version": __version__, "mlx_version": mx.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dtype": str(dt).replace("mlx.core.", ""),
            "source": {BASE: str(base), REFINER: None if refiner is None else str(refiner),
                       "vae": None if vae is None else str(vae)},
            "quantization": {},
            "bytes": {},
        }
        _say(log, f"converting {base} -> {out}")
        manifest["bytes"][BASE] = _write_pipeline(base_src, tmp / BASE, dt, base_bits, group_size, convs,
                                                  vae_src, log)
        if base_bits:
            manifest["quantization"][f"{BASE}/unet"] = {"bits": base_bits, "group_size": group_size, "convs": convs}
        if refiner_src is not None:
            _say(log, f"converting refiner {refiner}")
            manifest["bytes"][REFINER] = _write_pipeline(refiner_src, tmp / REFINER, dt, refiner_bits,
                                                       group_size, convs, vae_src, log)
            if refiner_bits:
                manifest["quantization"][f"{REFINER}/unet"] = {"bits": refiner_bits, "group_size": group_size,
                                                               "convs": convs}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(log, f"done in {time.perf_counter() - t0:.1f} s: {out}")
    return out
