"""Weights from everywhere: single files, converted folders, the offline hub cache, VAE overrides."""

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.errors import WeightsError
from sgm_inverse import vae_to_sgm, write_sgm_checkpoint

PROMPT = "a photo of a cat"
RUN = dict(num_inference_steps=5, height=64, width=64, seed=3, output_type="np")


@pytest.fixture(scope="module")
def folders(tiny_sdxl):
    return tiny_sdxl[0], tiny_sdxl[1]


@pytest.fixture(scope="module")
def reference(folders):
    """Images from the diffusers folders: what every other source must reproduce."""
    pipe = SDXLPipeline.from_pretrained(*folders, dtype=mx.float32)
    return pipe(PROMPT, **RUN)


@pytest.fixture(scope="module")
def single_files(tiny_sdxl, tmp_path_factory):
    _, _, base, refiner = tiny_sdxl
    d = tmp_path_factory.mktemp("single")
    write_sgm_checkpoint(d / "sdxl_base_tiny.safetensors", base.unet.state_dict(), base.vae.state_dict(),
                         base.text_encoder.state_dict(), base.text_encoder_2.state_dict(),
                         extra={"denoiser.sigmas": torch.ones(1000)})
    write_sgm_checkpoint(d / "sdxl_refiner_tiny.safetensors", refiner.unet.state_dict(), refiner.vae.state_dict(),
                         None, refiner.text_encoder_2.state_dict())
    return d / "sdxl_base_tiny.safetensors", d / "sdxl_refiner_tiny.safetensors"


def test_single_files_match_diffusers_folders(folders, reference, single_files):
    base_dir, refiner_dir = folders
    pipe = SDXLPipeline.from_pretrained(
        single_files[0], single_files[1], dtype=mx.float32, tokenizer=base_dir,
        config=base_dir / "unet" / "config.json", refiner_config=refiner_dir / "unet" / "config.json")
    np.testing.assert_allclose(pipe(PROMPT, **RUN), reference, atol=1e-6)


def test_single_file_tokenizers_beside_the_checkpoint(folders, single_files, tmp_path):
    base_dir, _ = folders
    ckpt = tmp_path / "model.safetensors"
    os.link(single_files[0], ckpt)
    with pytest.raises(WeightsError, match="tokenizer="):
        SDXLPipeline.from_pretrained(ckpt, config=base_dir / "unet")
    shutil.copytree(base_dir / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(base_dir / "tokenizer_2", tmp_path / "tokenizer_2")
    pipe = SDXLPipeline.from_pretrained(ckpt, config=base_dir / "unet", dtype=mx.float32)
    assert pipe.base.has("tokenizer") and pipe.base.has("tokenizer_2")


def _populate_cache(cache: Path, repo: str, files_from: Path, sub: str = "") -> None:
    """Lay out a Hugging Face hub cache entry by hand (what a download would leave)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit / sub
    shutil.copytree(files_from, snap, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def test_offline_hub_cache(folders, reference, monkeypatch, tmp_path):
    base_dir, refiner_dir = folders
    cache = tmp_path / "hub"
    _populate_cache(cache, "tiny-org/sdxl-base", base_dir)
    _populate_cache(cache, "tiny-org/sdxl-refiner", refiner_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = SDXLPipeline.from_pretrained("tiny-org/sdxl-base", "tiny-org/sdxl-refiner", dtype=mx.float32)
    np.testing.assert_allclose(pipe(PROMPT, **RUN), reference, atol=1e-6)
    with pytest.raises(WeightsError, match="not in the local cache"):
        SDXLPipeline.from_pretrained("tiny-org/missing")


def test_tokenizers_from_hub_cache(folders, single_files, monkeypatch, tmp_path):
    base_dir, _ = folders
    cache = tmp_path / "hub"
    _populate_cache(cache, "openai/clip-vit-large-patch14", base_dir / "tokenizer")
    _populate_cache(cache, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", base_dir / "tokenizer_2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "lonely.safetensors"
    os.link(single_files[0], ckpt)
    pipe = SDXLPipeline.from_pretrained(ckpt, config=base_dir / "unet", dtype=mx.float32)
    assert pipe.base.tokenizer("tokenizer_2").pad_token_id == 0
    assert pipe.base.tokenizer("tokenizer").pad_token_id == pipe.base.tokenizer("tokenizer").eos_token_id


def test_vae_override_folder_and_single_file(folders, reference, tiny_sdxl, tmp_path):
    base_dir, refiner_dir = folders
    ldm = tmp_path / "sdxl_vae.safetensors"  # original (LDM) key names, like madebyollin's sdxl_vae.safetensors
    sd = {k[len("first_stage_model."):]: v.contiguous() for k, v in vae_to_sgm(tiny_sdxl[2].vae.state_dict()).items()}
    save_file(sd, str(ldm))
    for vae in (base_dir / "vae", ldm):
        pipe = SDXLPipeline.from_pretrained(base_dir, refiner_dir, dtype=mx.float32, vae=vae)
        np.testing.assert_allclose(pipe(PROMPT, **RUN), reference, atol=1e-5)


# ----------------------------------------------------------------------------- bad inputs


def test_truncated_and_non_safetensors_files(single_files, tmp_path):
    data = single_files[0].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        SDXLPipeline.from_pretrained(cut)
    pickle_file = tmp_path / "model.ckpt"
    pickle_file.write_bytes(b"PK\x03\x04" + os.urandom(2000))
    with pytest.raises(WeightsError, match="safetensors"):
        SDXLPipeline.from_pretrained(pickle_file)


def test_sd15_checkpoint_refused(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
          "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 768),
          "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}
    path = tmp_path / "v1-5-pruned.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match="1.x"):
        SDXLPipeline.from_pretrained(path)


def test_refiner_as_base_and_missing_component(folders, single_files, tmp_path):
    base_dir, _ = folders
    with pytest.raises(WeightsError, match="refiner"):
        SDXLPipeline.from_pretrained(single_files[1], tokenizer=base_dir)
    from safetensors.numpy import load_file, save_file as save_np

    sd = {k: v for k, v in load_file(str(single_files[0])).items() if not k.startswith("first_stage_model.")}
    no_vae = tmp_path / "no_vae.safetensors"
    save_np(sd, str(no_vae))
    with pytest.raises(WeightsError, match="(?i)vae"):
        SDXLPipeline.from_pretrained(no_vae, tokenizer=base_dir, config=base_dir / "unet")
    broken = tmp_path / "broken"
    shutil.copytree(base_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(WeightsError, match="vae"):
        SDXLPipeline.from_pretrained(broken)


def test_mismatched_shapes_named(folders, tmp_path):
    base_dir, _ = folders
    broken = tmp_path / "broken"
    shutil.copytree(base_dir, broken)
    cfg = json.loads((broken / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 96
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    pipe = SDXLPipeline.from_pretrained(broken, dtype=mx.float32)
    with pytest.raises(WeightsError, match="wrong shape.*attn2.to_k"):
        pipe(PROMPT, **RUN)


def test_unknown_source_message():
    with pytest.raises(WeightsError, match="Accepted"):
        SDXLPipeline.from_pretrained("/no/such/folder")


def test_separate_tokenizer_folders(folders, single_files, tmp_path):
    """tokenizer= and tokenizer_2= may each name a tokenizer folder itself."""
    base_dir, _ = folders
    ckpt = tmp_path / "model.safetensors"
    os.link(single_files[0], ckpt)
    with pytest.raises(WeightsError, match="no tokenizer found"):  # tokenizer_2 alone is not enough
        SDXLPipeline.from_pretrained(ckpt, config=base_dir / "unet", tokenizer_2=base_dir / "tokenizer_2")
    pipe = SDXLPipeline.from_pretrained(ckpt, config=base_dir / "unet", tokenizer=base_dir / "tokenizer",
                                        tokenizer_2=base_dir / "tokenizer_2", dtype=mx.float32)
    assert pipe.base.tokenizer("tokenizer_2").pad_token_id == 0
    assert pipe.base.tokenizer("tokenizer").pad_token_id != 0


def test_hub_downloads_only_what_is_needed():
    from mlx_sdxl.hub import weight_patterns

    files = ["unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.fp16.safetensors",
             "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]
    patterns = weight_patterns(files)
    assert "unet/*.fp16.safetensors*" in patterns and "text_encoder/*.fp16.safetensors*" in patterns
    assert "vae/*.safetensors*" in patterns and "text_encoder_2/*.safetensors*" in patterns
    assert not any("vae_1_0" in p or p.endswith(".msgpack") for p in patterns)
