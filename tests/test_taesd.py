"""TAESDXL in MLX against diffusers' AutoencoderTiny (random weights, the real layout), and the
server using it: live previews at full size, and `--vae-decoder taesd` for final images."""

import httpx
import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sdxl.errors import ConfigError, WeightsError
from mlx_sdxl.models.taesd import TinyConfig, load_taesd
from serve_harness import TINY, RunningServer, decode_png, info_of, make_config
from tiny import _randomize


def _rel_l2(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def taesdxl(tmp_path_factory):
    """diffusers' AutoencoderTiny with TAESDXL's config and random weights, saved as diffusers saves it."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    ref = _randomize(AutoencoderTiny().eval(), seed=7, std=0.06)
    folder = tmp_path_factory.mktemp("taesdxl")
    ref.save_pretrained(str(folder))
    return ref, folder


def test_taesdxl_matches_diffusers(taesdxl):
    ref, folder = taesdxl
    ours = load_taesd(folder)
    z = np.random.default_rng(0).standard_normal((2, 4, 6, 5)).astype(np.float32) * 2
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.array(ours.decode(mx.array(z.transpose(0, 2, 3, 1))))
    assert got.shape == (2, 48, 40, 3) and want.std() > 0.05     # a non-trivial output
    decode_error = _rel_l2(got, want)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 40, 48)).astype(np.float32)
    with torch.no_grad():
        want_latents = ref.encode(torch.from_numpy(x)).latents.numpy().transpose(0, 2, 3, 1)
    encode_error = _rel_l2(np.array(ours.encode(mx.array(x.transpose(0, 2, 3, 1)))), want_latents)
    print(f"\nTAESDXL vs diffusers AutoencoderTiny: decode rel L2 {decode_error:.2e}, encode {encode_error:.2e}")
    assert decode_error <= 1e-4 and encode_error <= 1e-4


def test_taesd_loading_refusals(taesdxl, tmp_path):
    _, folder = taesdxl
    assert load_taesd(folder / "diffusion_pytorch_model.safetensors").config == TinyConfig()  # a bare file
    (tmp_path / "taesd.pth").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="safetensors only"):
        load_taesd(tmp_path / "taesd.pth")
    with pytest.raises(ConfigError, match="act_fn='silu' is not supported"):
        TinyConfig(act_fn="silu")
    with pytest.raises(WeightsError, match="not a hub id"):
        load_taesd("no/such/place")


@pytest.fixture(scope="module")
def narrow_taesd(tmp_path_factory):
    """A narrow AutoencoderTiny (same layout, 8 channels): fast enough for the server tests on a CPU."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    ref = _randomize(AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                     num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).eval(),
                     seed=3, std=0.2)
    folder = tmp_path_factory.mktemp("narrow_taesd")
    ref.save_pretrained(str(folder))
    return folder


def _previews_while(client, payload):
    """(the previews progress returned while `payload` ran, its response)."""
    from concurrent.futures import ThreadPoolExecutor

    seen = []
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(client.post, "/sdapi/v1/txt2img", json=payload)
        while not job.done():
            seen.append(client.get("/sdapi/v1/progress").json()["current_image"])
    assert job.result().status_code == 200
    return [decode_png(b64) for b64 in seen if b64], job.result()


@pytest.mark.parametrize("decoder", ["full", "taesd"])
def test_server_previews_and_decodes_with_taesd(tiny_sdxl, narrow_taesd, decoder):
    server = RunningServer(make_config(tiny_sdxl[0], tiny_sdxl[1],
                                       models=dict(taesd=str(narrow_taesd), vae_decoder=decoder)))
    try:
        with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as c:
            assert c.get("/sdapi/v1/options").json()["show_progress_type"] == "taesd"
            previews, r = _previews_while(c, dict(TINY, prompt="a cat", steps=12, seed=2, refiner_checkpoint="None"))
            assert previews and all(p.size == (64, 64) for p in previews)   # TAESD: full size (linear: 8x8)
            image = decode_png(r.json()["images"][0])
            assert image.size == (64, 64) and "Seed: 2," in info_of(r)["infotexts"][0]
            assert ('"vae_decoder": "taesd"' in image.info["mlx_sdxl"]) == (decoder == "taesd")
    finally:
        server.stop()
