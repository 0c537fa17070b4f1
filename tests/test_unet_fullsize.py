"""The full-size SDXL UNets: parameter names/shapes/counts against diffusers, without allocating them.

The opt-in slow test runs the real-size base UNet once against diffusers (about 11 GB peak RSS,
plus 10 GB of temporary disk; ~10 minutes on 2 CPU cores):
    MLX_SDXL_SLOW=1 python3 -m pytest tests/test_unet_fullsize.py -m slow
"""

import gc
import json
import os

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from mlx.utils import tree_flatten

from mlx_sdxl.models.unet import SDXL_BASE_CONFIG, SDXL_REFINER_CONFIG, UNet2DConditionModel, UNetConfig, load_unet

torch.set_grad_enabled(False)


def torch_shapes(config):
    with torch.device("meta"):
        model = TorchUNet.from_config(config)
    return {k: tuple(v.shape[i] for i in (0, 2, 3, 1)) if v.ndim == 4 else tuple(v.shape)
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,config,count,tensors", [
    ("base", SDXL_BASE_CONFIG, 2_567_463_684, 1680),
    ("refiner", SDXL_REFINER_CONFIG, 2_259_526_660, 1220),
])
def test_full_size_parameters_match_diffusers(name, config, count, tensors):
    before = mx.get_active_memory()
    model = UNet2DConditionModel(UNetConfig.from_dict(config))
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert sum(int(np.prod(s)) for s in ours.values()) == count
    assert len(ours) == tensors
    assert mx.get_active_memory() - before < 1 << 20  # nothing was materialized
    assert ours == torch_shapes(config)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MLX_SDXL_SLOW"), reason="set MLX_SDXL_SLOW=1 to run full-size checks")
def test_full_size_base_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    model = TorchUNet.from_config(SDXL_BASE_CONFIG).eval()
    for name, p in model.named_parameters():  # default init leaves norms at 1/0: perturb them
        if "norm" in name:
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 77, 2048, generator=g)
    pooled = torch.randn(1, 1280, generator=g)
    ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]])
    ref = model(sample, 801.0, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    ref = ref.permute(0, 2, 3, 1).numpy()
    model.save_pretrained(tmp_path, max_shard_size="2GB")  # shards keep the serialization copy small
    del model
    gc.collect()
    assert json.loads((tmp_path / "config.json").read_text())["cross_attention_dim"] == 2048

    ours = load_unet(tmp_path)
    out = ours(mx.array(sample.permute(0, 2, 3, 1).numpy()), 801.0, mx.array(context.numpy()),
               text_embeds=mx.array(pooled.numpy()), time_ids=mx.array(ids.numpy()))
    err = float(np.linalg.norm(np.array(out) - ref) / np.linalg.norm(ref))
    print(f"full-size base UNet, 16x16 latents, fp32: rel L2 {err:.3e}")
    assert err <= 1e-4
