"""What LoRAs cost on the full-size base UNet (random weights), as issue 16 asks:

    fuse   loading + fusing a random rank-R kohya LoRA (SGM names, fp16) that covers every
           attention and feed-forward Linear: the file read, the mapping and checks, the fusing
           (through the pipeline's ModelCache), and taking it off again (the changed tensors
           read back from the model's source)
    side   step time of the 4-bit UNet with that LoRA as side paths against without, and of the
           dense UNet with it fused against without; A B A B interleaved in one process

    python -m bench.lora fuse --dtype float16 --json fuse.json
    python -m bench.lora side --size 512 --batch 2 --json side.json      (fp32, eager, K/V once per stage)

Run with OpenBLAS preloaded on Linux CPUs (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_sdxl.lora import open_lora
from mlx_sdxl.lora.keys import part_targets
from mlx_sdxl.models.unet import UNet2DConditionModel, UNetConfig
from mlx_sdxl.pipeline.cache import ModelCache
from mlx_sdxl.quantize import QConv2d, QLinear, quantize_model
from mlx_sdxl.sources import ModelSource
from mlx_sdxl.spec import BASE
from mlx_sdxl.weights import apply_weights, parse_dtype

from .ab import inputs
from .machine import machine_info
from .models import FULL, TINY, build_random
from .run import free, stats

ATTN_FF = re.compile(r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")


def sgm_path(path: str, layers_per_block: int) -> str:
    """A UNet transformer layer's SGM name (what kohya writes for SDXL)."""
    n = layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path):
        return f"input_blocks.{1 + int(m[1]) * n + int(m[2])}.1.{m[3]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", path):
        return f"middle_block.1.{m[1]}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    return f"output_blocks.{int(m[1]) * n + int(m[2])}.1.{m[3]}"


def write_kohya_lora(path: Path, config: dict, rank: int, seed: int = 0) -> dict:
    """A random fp16 kohya LoRA on every attention and feed-forward Linear of the UNet `config`."""
    lpb = config["layers_per_block"]
    lpb = lpb[0] if isinstance(lpb, list) else lpb
    keys = iter(mx.random.split(mx.random.key(seed), 2 * len(part_targets("unet", config))))
    tensors: Dict[str, mx.array] = {}
    for p, target in sorted(part_targets("unet", config).items()):
        if not ATTN_FF.search(p):
            continue
        o, n_in = target.shape
        name = "lora_unet_" + sgm_path(p, lpb).replace(".", "_")
        k1, k2 = next(keys), next(keys)
        tensors[f"{name}.lora_down.weight"] = (0.02 * mx.random.normal((rank, n_in), key=k1)).astype(mx.float16)
        tensors[f"{name}.lora_up.weight"] = (0.02 * mx.random.normal((o, rank), key=k2)).astype(mx.float16)
        tensors[f"{name}.alpha"] = mx.array(rank / 2, dtype=mx.float16)
    mx.save_safetensors(str(path), tensors, metadata={"format": "pt"})
    return {"layers": len(tensors) // 3, "bytes": path.stat().st_size, "rank": rank}


def file_source(config: dict, folder: Path, seed: int = 1) -> ModelSource:
    """The UNet with random fp16 weights saved to `folder` (once) and read from there lazily, as a
    converted folder is: "reading back" a tensor reads the file (the page cache, here)."""
    path = folder / f"unet-random-{seed}.safetensors"
    if not path.is_file():
        model = build_random("unet", config, mx.float16, seed)
        mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
        del model
        free()

    def load(dtype=None):
        model = UNet2DConditionModel(UNetConfig.from_dict(config))
        apply_weights(model, mx.load(str(path)), "UNet", dtype=dtype)
        return model

    return ModelSource(role=BASE, description=str(path), configs={"unet": config}, loaders={"unet": load},
                       fingerprints={"unet": f"random:{seed}"})


def _timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_fuse(config: dict, dtype, rank: int, folder: Path) -> dict:
    path = folder / f"lora_r{rank}.safetensors"
    written = write_kohya_lora(path, config, rank)
    source, cache = file_source(config, folder), ModelCache(dtype)
    model = cache.get(source, "unet")
    mx.eval(model.parameters())
    read = _timed(lambda: mx.eval(list(mx.load(str(path)).values())))  # the file's tensors, from the page cache
    box = {}
    opened = _timed(lambda: box.setdefault("lora", open_lora(path, source)))
    fused = _timed(lambda: cache.add_lora(box["lora"], source))
    rescaled = _timed(lambda: cache.set_lora_scale(box["lora"].name, 0.5, source))
    removed = _timed(lambda: cache.remove_lora(None, [source]))
    return {"file": written, "dtype": str(dtype), "read_seconds": read, "open_seconds": opened,
            "fuse_seconds": fused, "load_and_fuse_seconds": opened + fused, "set_scale_seconds": rescaled,
            "unload_seconds": removed}


def _interleave(variants: List[tuple], args, repeats: int, warmup: int) -> List[dict]:
    """Each variant is (prepare, step): prepare() runs untimed before each of its timed steps. Wall
    seconds and this process's CPU seconds (all threads) per step: on a shared machine the CPU
    seconds are the steadier measure of the work done."""
    runs = [([], []) for _ in variants]
    for r in range(warmup + repeats):
        for i, (prepare, step) in enumerate(variants):
            prepare()
            t0, c0 = time.perf_counter(), time.process_time()
            mx.eval(step(*args))
            if r >= warmup:
                runs[i][0].append(time.perf_counter() - t0)
                runs[i][1].append(time.process_time() - c0)
    return [dict(stats(wall), cpu_seconds=stats(cpu)) for wall, cpu in runs]


def _step(model, kv: Dict[str, object], which: str, context) -> Callable:
    """A sampler-style step: the cross-attention K/V made once (per variant), then the UNet."""
    def step(x, t, c, te, ids):
        if which not in kv:
            kv[which] = model.cross_attention_kv(context)
            mx.eval(kv[which])
        return model(x, t, c, text_embeds=te, time_ids=ids, cross_kv=kv[which])
    return step


def measure_side(config: dict, a) -> dict:
    """4-bit UNet with the side paths on and off in turn; then the dense UNet, the LoRA fused and
    taken off in turn (the fusing and unfusing run outside the timed steps)."""
    dtype = parse_dtype(a.dtype)
    folder = Path(a.folder or tempfile.mkdtemp(prefix="bench-lora-"))
    path = folder / f"lora_r{a.rank}.safetensors"
    write_kohya_lora(path, config, a.rank)
    args = inputs(UNetConfig.from_dict(config), BASE, a.size, a.batch, dtype)
    source, cache = file_source(config, folder), ModelCache(dtype)
    model = cache.get(source, "unet")
    quantize_model(model, bits=a.bits)
    free()
    cache.add_lora(open_lora(path, source), source)
    layers = [m for _, m in model.named_modules() if isinstance(m, (QLinear, QConv2d)) and m.side is not None]
    sides = [m.side for m in layers]
    kv: Dict[str, object] = {}

    def toggle(on: bool) -> Callable:
        def set_sides():
            for m, s in zip(layers, sides):
                m.side = s if on else None
        return set_sides

    q_plain, q_side = _interleave([(toggle(False), _step(model, kv, "plain", args[2])),
                                   (toggle(True), _step(model, kv, "side", args[2]))], args, a.repeats, a.warmup)
    out = {"side_layers": len(layers), "side_bytes": sum(s.nbytes for s in sides),
           f"q{a.bits}_plain": q_plain, f"q{a.bits}_lora_side": q_side}
    kv.clear()
    cache.release(source, "unet")
    free()
    if not a.quantized_only:
        out.update(_dense_fused(source, a, dtype, path, args))
    return out


def _dense_fused(source, a, dtype, path: Path, args) -> dict:
    cache = ModelCache(dtype)
    model = cache.get(source, "unet")
    mx.eval(model.parameters())
    lora = open_lora(path, source)

    def plain():
        if len(cache.loras):
            cache.remove_lora(None, [source])

    def fused():
        if not len(cache.loras):
            cache.add_lora(lora, source)

    def step(x, t, c, te, ids):
        return cache.get(source, "unet")(x, t, c, text_embeds=te, time_ids=ids)

    d_plain, d_fused = _interleave([(plain, step), (fused, step)], args, a.repeats, a.warmup)
    return {"dense_plain": d_plain, "dense_lora_fused": d_fused}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["fuse", "side"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="the tiny UNet (a smoke test)")
    p.add_argument("--quantized-only", action="store_true", help="side: time the 4-bit UNet only")
    p.add_argument("--folder", help="where the random UNet and the LoRA file are written (kept for reuse)")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    config = (TINY if a.tiny else FULL)[BASE]["unet"]
    out = {"machine": machine_info(measure_blas=False), "settings": vars(a)}
    if a.what == "fuse":
        folder = Path(a.folder or tempfile.mkdtemp(prefix="bench-lora-"))
        out["results"] = measure_fuse(config, parse_dtype(a.dtype), a.rank, folder)
    else:
        out["results"] = measure_side(config, a)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["results"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
