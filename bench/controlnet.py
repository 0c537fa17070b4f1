"""The cost of one SDXL ControlNet per sampler step: the base UNet step alone against the base
step with the ControlNet's residuals, full-size random weights, in one process.

    python -m bench.controlnet --size 512 --repeats 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx

from mlx_sdxl.control import Control, control_residuals, prepare_controls
from mlx_sdxl.models.controlnet import ControlNetConfig, ControlNetModel
from mlx_sdxl.models.unet import UNet2DConditionModel, UNetConfig
from mlx_sdxl.spec import BASE

from .models import unet_inputs


def _timed(fn, repeats: int):
    fn()  # warm-up: builds kernels
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs


def measure(size: int, repeats: int, dtype) -> dict:
    mx.random.seed(0)
    unet = UNet2DConditionModel(UNetConfig.sdxl_base())
    net = ControlNetModel(ControlNetConfig.sdxl())
    for model in (unet, net):
        model.set_dtype(dtype)
        model.eval()
        mx.eval(model.parameters())
    inp = unet_inputs(unet.config, BASE, size, size, batch=2)
    t = 500.0
    kv = unet.cross_attention_kv(inp["encoder_hidden_states"])
    image = mx.random.uniform(shape=(size, size, 3))
    prepared = prepare_controls([Control("cn", image)], {"cn": net}, size, size, 1, True)

    def plain():
        mx.eval(unet(inp["sample"], t, inp["encoder_hidden_states"], text_embeds=inp["text_embeds"],
                     time_ids=inp["time_ids"], cross_kv=kv))

    def controlled():
        down, mid = control_residuals(prepared, {"cn": net}, inp["sample"], t, inp["encoder_hidden_states"],
                                      inp["text_embeds"], inp["time_ids"], 0, 10, True)
        mx.eval(unet(inp["sample"], t, inp["encoder_hidden_states"], text_embeds=inp["text_embeds"],
                     time_ids=inp["time_ids"], cross_kv=kv, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid))

    out = {"size": size, "batch": 2, "dtype": str(dtype).replace("mlx.core.", ""), "device": str(mx.default_device())}
    for name, fn in (("base_step", plain), ("base_plus_controlnet_step", controlled)):
        mx.reset_peak_memory()
        median, runs = _timed(fn, repeats)
        out[name] = {"median_s": median, "runs_s": runs, "peak_bytes": mx.get_peak_memory()}
    out["ratio"] = out["base_plus_controlnet_step"]["median_s"] / out["base_step"]["median_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.controlnet", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    result = measure(args.size, args.repeats, getattr(mx, args.dtype))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
