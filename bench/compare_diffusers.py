"""`--compare diffusers`: the same stages in diffusers / transformers on PyTorch, in the same
run, with the same weights (taken from the MLX model just measured) and the same inputs.

Each stage runs in a child process (`python -m bench.compare_diffusers DIR`):
- PyTorch gets a clean process: an LD_PRELOAD'ed OpenBLAS, which MLX's CPU backend
  needs, slows PyTorch's own MKL kernels (1.7x on a diffusers UNet here), so the
  child starts without LD_PRELOAD;
- memory: the weights go to a temporary safetensors file one tensor at a time,
  leaving the MLX model as they go, so one copy of a model is resident at a time.

PyTorch runs on the device matching MLX's backend (mps for Metal, cuda for CUDA, else
cpu with its default thread count) in the dtype the MLX stage computed in.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

NEEDED = ("torch", "diffusers", "transformers", "safetensors")


class DiffusersUnavailable(RuntimeError):
    pass


def _version(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _stats(runs: List[float]) -> dict:
    from .run import stats

    return stats(runs)


class DiffusersComparison:
    """Parent side: exports weights and inputs, runs the child, attaches its timings."""

    def __init__(self, repeats: int, warmup: int):
        from .machine import backend

        missing = [n for n in NEEDED if _version(n) is None]
        if missing:
            raise DiffusersUnavailable(f"--compare diffusers needs {', '.join(NEEDED)}; missing: "
                                       f"{', '.join(missing)} (pip install {' '.join(missing)})")
        self.repeats, self.warmup, self.backend = repeats, warmup, backend()
        self.device = {"metal": "mps", "cuda": "cuda"}.get(self.backend, "cpu")
        self.info = {"device": self.device, "torch_version": _version("torch"),
                     "diffusers_version": _version("diffusers"), "transformers_version": _version("transformers"),
                     "process": "child process without LD_PRELOAD"}

    # ------------------------------------------------------------------ stages
    def unet(self, rec: dict, model, inputs: dict, ours) -> None:
        arrays = {"sample": _nchw(inputs["sample"]), "encoder_hidden_states": _np(inputs["encoder_hidden_states"]),
                  "text_embeds": _np(inputs["text_embeds"]), "time_ids": _np(inputs["time_ids"])}
        self._run(rec, {"kind": "unet", "config": _unet_config(model), "dtype": rec["dtype"]}, [model], arrays,
                  ours)

    def vae(self, rec: dict, model, z, ours) -> None:
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()}
        # in the dtype our decode computes in (the fp16 SDXL VAE upcasts, as diffusers' pipelines do)
        self._run(rec, {"kind": "vae", "config": config, "dtype": rec["compute_dtype"]}, [model],
                  {"latents": _nchw(z)}, ours)

    def text(self, rec: dict, encoders: list, ids: list, ours) -> None:
        configs = [{k: getattr(e.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                     "intermediate_size", "hidden_act", "layer_norm_eps",
                                                     "max_position_embeddings", "vocab_size", "projection_dim",
                                                     "eos_token_id", "with_projection")} for e in encoders]
        self._run(rec, {"kind": "text", "configs": configs, "dtype": rec["dtype"]}, encoders,
                  {"ids_1": np.array(ids[0]), "ids_2": np.array(ids[1])}, ours[0])

    # ------------------------------------------------------------------ plumbing
    def _run(self, rec: dict, spec: dict, models: list, arrays: Dict[str, np.ndarray], ours) -> None:
        import mlx.core as mx

        work = Path(tempfile.mkdtemp(prefix="mlx_sdxl_bench_"))
        try:
            for i, model in enumerate(models):
                _export_weights(model, work / f"weights_{i}.safetensors")
            mx.clear_cache()
            np.savez(work / "inputs.npz", **arrays)
            spec.update(device=self.device, repeats=self.repeats, warmup=self.warmup)
            (work / "spec.json").write_text(json.dumps(spec))
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
            root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
            done = subprocess.run([sys.executable, "-m", "bench.compare_diffusers", str(work)], env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the diffusers run for {rec['name']} failed:\n{done.stderr[-3000:]}")
            result = json.loads((work / "result.json").read_text())
            theirs = np.load(work / "output.npy")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        a = np.asarray(ours.astype(mx.float32), dtype=np.float64)
        b = theirs.astype(np.float64)
        if b.ndim == 4 and a.shape != b.shape:
            b = b.transpose(0, 2, 3, 1)  # NCHW → NHWC
        runs = result["runs"]
        rec["diffusers"] = {"seconds": _stats(runs), "device": result["device"], "dtype": spec["dtype"],
                            "mlx_over_diffusers": rec["seconds"]["median"] / statistics.median(runs),
                            "output_rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))}
        self.info.setdefault("torch_threads", result.get("torch_threads"))
        d = rec["diffusers"]
        print(f"  {rec['name']:<22} diffusers median {d['seconds']['median']:.4g} s; MLX / diffusers "
              f"{d['mlx_over_diffusers']:.3f}; output rel L2 {d['output_rel_l2']:.2e}", file=sys.stderr, flush=True)


def _np(a) -> np.ndarray:
    import mlx.core as mx

    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def _nchw(a) -> np.ndarray:
    return np.ascontiguousarray(_np(a).transpose(0, 3, 1, 2))


def _export_weights(model, path: Path) -> None:
    """Save our parameters (convs OHWI → OIHW; bf16 as fp32) and empty `model` as they go."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from safetensors.numpy import save_file

    flat = tree_flatten(model.parameters())
    model.update(tree_map(lambda v: mx.zeros((0,), v.dtype), model.parameters()))
    out = {}
    while flat:
        name, value = flat.pop()
        a = _np(value)
        del value
        out[name] = np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if a.ndim == 4 else a
    save_file(out, str(path))


def _unet_config(model) -> dict:
    from mlx_sdxl.models.unet import SDXL_BASE_CONFIG

    c = model.config
    d = dict(SDXL_BASE_CONFIG)
    d.update(block_out_channels=list(c.block_out_channels), down_block_types=list(c.down_block_types),
             up_block_types=list(c.up_block_types), layers_per_block=list(c.layers_per_block),
             transformer_layers_per_block=list(c.transformer_layers_per_block),
             attention_head_dim=list(c.num_attention_heads), cross_attention_dim=c.cross_attention_dim,
             in_channels=c.in_channels, out_channels=c.out_channels, norm_num_groups=c.norm_num_groups,
             norm_eps=c.norm_eps, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift,
             conv_in_kernel=c.conv_in_kernel, conv_out_kernel=c.conv_out_kernel,
             downsample_padding=c.downsample_padding, addition_time_embed_dim=c.addition_time_embed_dim,
             projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim)
    return d


# ----------------------------------------------------------------------------- child process

def _child(work: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.set_grad_enabled(False)
    spec = json.loads((work / "spec.json").read_text())
    device = spec["device"]
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
    inputs = {k: torch.from_numpy(v) for k, v in np.load(work / "inputs.npz").items()}

    def build(make: Callable[[], torch.nn.Module], weights: Path) -> torch.nn.Module:
        state = {k: v.to(dtype) for k, v in load_file(str(weights)).items()}
        with torch.device("meta"):
            module = make()
        want = set(module.state_dict())
        if not set(state) <= want:  # transformers < 5.6 keeps CLIP under text_model.
            state = {(k if k in want else "text_model." + k): v for k, v in state.items()}
        module.load_state_dict(state, strict=True, assign=True)
        for name, buf in list(module.named_buffers()):
            if buf.is_meta:  # non-persistent buffers: CLIP's position_ids
                owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
                owner.register_buffer(name.rsplit(".", 1)[-1], torch.arange(buf.shape[-1]).expand(1, -1),
                                      persistent=False)
        return module.to(device).eval()

    def put(x, floating=True):
        return x.to(device=device, dtype=dtype) if floating else x.to(device)

    kind = spec["kind"]
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        model = build(lambda: UNet2DConditionModel.from_config(spec["config"]), work / "weights_0.safetensors")
        sample, ctx = put(inputs["sample"]), put(inputs["encoder_hidden_states"])
        added = {"text_embeds": put(inputs["text_embeds"]), "time_ids": put(inputs["time_ids"])}
        t = torch.full((sample.shape[0],), 500.0, device=device)
        fn = lambda: model(sample, t, ctx, added_cond_kwargs=added).sample  # noqa: E731
    elif kind == "vae":
        from diffusers import AutoencoderKL

        model = build(lambda: AutoencoderKL.from_config(spec["config"]), work / "weights_0.safetensors")
        latents = put(inputs["latents"])
        fn = lambda: model.decode(latents).sample  # noqa: E731
    else:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        models = []
        for i, c in enumerate(spec["configs"]):
            c = dict(c)
            cls = CLIPTextModelWithProjection if c.pop("with_projection") else CLIPTextModel
            models.append(build(lambda: cls(CLIPTextConfig(**c)), work / f"weights_{i}.safetensors"))
        ids = [put(inputs["ids_1"].long(), False), put(inputs["ids_2"].long(), False)]

        def fn():
            h1 = models[0](ids[0], output_hidden_states=True).hidden_states[-2]
            h2 = models[1](ids[1], output_hidden_states=True).hidden_states[-2]
            return torch.cat([h1, h2], dim=-1)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    for _ in range(spec["warmup"]):
        fn()
        sync()
    runs = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        out = fn()
        sync()
        runs.append(time.perf_counter() - t0)
    np.save(work / "output.npy", out.float().cpu().numpy())
    (work / "result.json").write_text(json.dumps({"runs": runs, "device": device,
                                                  "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
