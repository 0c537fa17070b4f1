"""convert/: MLX-native folders that load with no key mapping and no torch."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.errors import InputError

PROMPT = "a photo of a cat"
RUN = dict(num_inference_steps=5, height=64, width=64, seed=3, output_type="np")


@pytest.fixture(scope="module")
def converted(tiny_sdxl, tmp_path_factory):
    from convert import convert

    base_dir, refiner_dir = tiny_sdxl[0], tiny_sdxl[1]
    out = tmp_path_factory.mktemp("conv") / "tiny-mlx"
    convert(base_dir, out, refiner=refiner_dir, dtype="float32", log=None)
    return out


def test_layout_and_manifest(converted):
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["format"] == "mlx-sdxl" and manifest["dtype"] == "float32"
    assert manifest["mlx_sdxl_version"]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (converted / "base" / part).is_dir()
    assert not (converted / "refiner" / "text_encoder").exists()
    assert (converted / "base" / "unet" / "model.safetensors").is_file()


def test_round_trip_identical(tiny_sdxl, converted):
    ref = SDXLPipeline.from_pretrained(tiny_sdxl[0], tiny_sdxl[1], dtype=mx.float32)(PROMPT, **RUN)
    np.testing.assert_array_equal(SDXLPipeline.from_pretrained(converted, dtype=mx.float32)(PROMPT, **RUN), ref)
    split = SDXLPipeline.from_pretrained(converted / "base", refiner=converted / "refiner", dtype=mx.float32)
    np.testing.assert_array_equal(split(PROMPT, **RUN), ref)


def test_quantized_refiner_round_trip(tiny_sdxl, tmp_path):
    from convert import convert

    out = convert(tiny_sdxl[0], tmp_path / "q", refiner=tiny_sdxl[1], dtype="float32", refiner_bits=4,
                  group_size=32, log=None)
    q = json.loads((out / "refiner" / "unet" / "quantization.json").read_text())
    assert q["bits"] == 4 and q["group_size"] == 32
    from mlx.utils import tree_flatten

    from mlx_sdxl import load_unet
    from mlx_sdxl.quantize import quantize_unet

    loaded = SDXLPipeline.from_pretrained(out, dtype=mx.float32)
    unet = loaded.models.get(loaded.refiner, "unet")
    assert any(k.endswith("scales") for k, _ in tree_flatten(unet.parameters()))
    direct = quantize_unet(load_unet(tiny_sdxl[1] / "unet", dtype=mx.float32), bits=4, group_size=32)
    x = mx.random.normal((1, 8, 8, 4), key=mx.random.key(0))
    ctx = mx.random.normal((1, 77, 64), key=mx.random.key(1))
    pooled = mx.random.normal((1, 64), key=mx.random.key(2))
    ids = mx.array([[64.0, 64, 0, 0, 6.0]])
    np.testing.assert_array_equal(np.array(unet(x, 500.0, ctx, pooled, ids)),
                                  np.array(direct(x, 500.0, ctx, pooled, ids)))


def test_loads_without_torch(converted):
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
        "import mlx.core as mx\n"
        "from mlx_sdxl import SDXLPipeline\n"
        f"p = SDXLPipeline.from_pretrained({str(converted)!r}, dtype=mx.float32)\n"
        "img = p('a photo of a cat', num_inference_steps=3, height=64, width=64, seed=1, output_type='np')\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(img.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).parent.parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 64, 64, 3)" in out.stdout


def test_atomic_and_no_overwrite(tiny_sdxl, tmp_path, monkeypatch):
    from convert import convert, export

    out = tmp_path / "x"
    calls = {"n": 0}
    real = export.save_weights

    def failing(params, folder, max_bytes=export.SHARD_BYTES):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(params, folder, max_bytes)

    monkeypatch.setattr(export, "save_weights", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_sdxl[0], out, dtype="float32", log=None)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export, "save_weights", real)
    convert(tiny_sdxl[0], out, dtype="float32", log=None)
    with pytest.raises(InputError, match="already exists"):
        convert(tiny_sdxl[0], out, dtype="float32", log=None)


def test_sharding(tmp_path):
    from convert.export import save_weights

    params = {f"w{i}": mx.ones((256, 256)) for i in range(5)}  # 256 KiB each
    total = save_weights(dict(params), tmp_path, max_bytes=600_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert total == 5 * 256 * 256 * 4
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_cli_entry(tiny_sdxl, tmp_path):
    out = subprocess.run([sys.executable, "-m", "convert", "--base", str(tiny_sdxl[0]), "--out", str(tmp_path / "c"),
                          "--dtype", "float32", "--quiet"], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).parent.parent))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c" / "manifest.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "convert", "--base", "/no/such", "--out", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=300, cwd=str(Path(__file__).parent.parent))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "not found" in bad.stderr
