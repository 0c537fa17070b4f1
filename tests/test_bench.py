"""The benchmark (bench/, `mlx-sdxl bench`) at tiny sizes, its FLOP counter, BLAS detection,
and the float32 CPU kernels of mlx_sdxl.models.cpu_kernels against the MLX ops they replace."""

import importlib.util
import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from bench import machine
from bench.cli import main as bench_main
from bench.flops import text_encoder_flops, unet_flops, vae_decode_flops
from mlx_sdxl.models import cpu_kernels
from mlx_sdxl.models.clip import CLIPTextConfig
from mlx_sdxl.models.unet import UNetConfig
from mlx_sdxl.models.vae import VAEConfig

TINY = ["--tiny", "--width", "64", "--height", "64", "--steps", "3", "--repeats", "2", "--warmup", "1"]


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_record(rec):
    sec = rec["seconds"]
    assert set(sec) == {"median", "min", "max", "q1", "q3", "mean", "runs"}
    assert all(_finite_positive(v) for k, v in sec.items() if k != "runs")
    assert len(sec["runs"]) == 2 and all(_finite_positive(v) for v in sec["runs"])
    assert sec["min"] <= sec["q1"] <= sec["median"] <= sec["q3"] <= sec["max"]
    assert _finite_positive(rec["peak_memory_bytes"])
    assert _finite_positive(rec["load_seconds"])
    if rec["stage"] != "e2e":
        assert _finite_positive(rec["flops"]) and _finite_positive(rec["tflops_per_second"])


def test_tiny_run_writes_json_markdown_and_chart(tmp_path, capsys):
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    png = tmp_path / "r.png"
    rc = bench_main(TINY + ["--refiner-bits", "4", "--json", str(out), "--markdown", str(md), "--chart", str(png)],
                    prog="mlx-sdxl bench")
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["schema_version"] == 1 and report["tool"] == "mlx-sdxl bench"
    assert {"backend", "cpu", "memory_bytes", "os", "python", "mlx_version", "blas"} <= set(report["machine"])
    assert report["settings"]["width"] == 64 and report["settings"]["batch"] == 2
    names = [r["name"] for r in report["results"]]
    assert names == ["text_encode", "unet_base", "unet_refiner", "unet_refiner_q4", "vae_decode", "e2e"]
    for rec in report["results"]:
        _check_record(rec)
    unet = report["results"][1]
    assert unet["latent_size"] == [8, 8] and unet["batch"] == 2 and unet["dtype"] == "float32"
    assert report["results"][3]["bits"] == 4
    assert not any(r["compiled"] for r in report["results"][1:4])  # op by op unless --compile
    assert all(_finite_positive(r["load_peak_memory_bytes"]) for r in report["results"] if r["stage"] != "e2e")
    assert report["results"][3]["weights_bytes"] < report["results"][2]["weights_bytes"]
    e2e = report["results"][-1]
    assert e2e["steps"] == 3 and {"base", "refiner", "decode"} <= set(e2e["per_stage_seconds"])
    table = md.read_text()
    assert "| base UNet step | float32 |" in table and "| whole image | float32 |" in table
    assert "4-bit refiner (float32): step " in table and "the dense refiner's, peak memory " in table
    assert table in capsys.readouterr().out  # the table is printed too
    if importlib.util.find_spec("matplotlib") is None:
        assert not png.exists()
        pytest.skip("matplotlib missing: the chart is skipped (checked that no file was written)")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_model_folders_against_diffusers(tiny_sdxl, tmp_path):
    """--model / --refiner folders; --compare diffusers runs the base UNet with the same weights in
    PyTorch (a child process, ~8 s of imports): same output, a positive ratio."""
    base, refiner = tiny_sdxl[0], tiny_sdxl[1]
    out = tmp_path / "r.json"
    rc = bench_main(["--model", str(base), "--refiner", str(refiner), "--width", "64", "--height", "64",
                     "--repeats", "2", "--only", "unet,text", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["weights"] == str(base)
    assert [r["name"] for r in report["results"]] == ["text_encode", "unet_base", "unet_refiner"]
    for rec in report["results"]:
        _check_record(rec)
    rc = bench_main(["--model", str(base), "--width", "64", "--height", "64", "--repeats", "2", "--only", "unet",
                     "--compare", "diffusers", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["compare"]["diffusers"]["device"] == "cpu"
    (rec,) = report["results"]
    d = rec["diffusers"]
    assert _finite_positive(d["mlx_over_diffusers"]) and _finite_positive(d["seconds"]["median"])
    assert d["output_rel_l2"] <= 1e-4


def test_bad_arguments_fail_cleanly(capsys):
    assert bench_main([]) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert bench_main(["--tiny", "--only", "unet,gpu"]) == 2
    assert "--only takes" in capsys.readouterr().err
    assert bench_main(["--tiny", "--width", "100"]) == 2
    assert bench_main(["--tiny", "--dtype", "int8"]) == 2
    assert "unknown dtype" in capsys.readouterr().err


def test_mlx_sdxl_bench_subcommand(capsys):
    from mlx_sdxl.cli import main

    assert main(["bench", "--help"]) == 0
    assert "mlx-sdxl bench" in capsys.readouterr().out


def test_flop_counts_match_the_reference_numbers():
    """Counted at full size from shapes alone (nothing evaluated); reference: sdxl-facts §7."""
    base, refiner = UNetConfig.sdxl_base(), UNetConfig.sdxl_refiner()
    assert unet_flops(base, 128, 128) / 1e12 == pytest.approx(6.761, abs=1e-3)
    assert unet_flops(refiner, 128, 128, n_ids=5) / 1e12 == pytest.approx(7.286, abs=1e-3)
    assert unet_flops(base, 64, 64, batch=2) == 2 * unet_flops(base, 64, 64)
    # a sampler's step leaves out the text context's K/V projections, made once per stage:
    # 2 (K, V) × 2 FLOPs × 77 tokens × 2048 → 640 (10 layers) and → 1280 (60 layers)
    kv = 2 * 2 * 77 * 2048 * (10 * 640 + 60 * 1280)
    assert unet_flops(base, 128, 128) - unet_flops(base, 128, 128, cross_kv_made=False) == kv
    assert vae_decode_flops(VAEConfig.sdxl(), 128, 128) / 1e12 == pytest.approx(10.47, abs=0.01)
    big_g = CLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                           hidden_act="gelu", projection_dim=1280, with_projection=True)
    assert text_encoder_flops(big_g) / 1e9 == pytest.approx(97.9, abs=0.1)


def test_blas_detection(monkeypatch):
    info = machine.blas_info()
    assert info["library"] in ("openblas", "mkl", "blis", "reference", "accelerate", "unknown")
    if machine.backend() == "cpu":
        assert _finite_positive(info["matmul_gflops"]) and info["slow"] == (info["matmul_gflops"] < 15)
    if machine.sys.platform == "linux":
        monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
        assert machine.blas_info(measure=False)["library"] == "openblas"
        monkeypatch.delenv("LD_PRELOAD")
        if any("mlx_cpu.libs" in p for p in machine.loaded_blas_libraries()):
            assert machine.blas_info(measure=False)["library"] == "reference"
    assert "LD_PRELOAD=" in machine.openblas_hint() and "libopenblas0-pthread" in machine.openblas_hint()


# ----------------------------------------------------------------------------- CPU kernels

def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels.use_cpu_kernels(mx.zeros((1,))),
                                       reason="the float32 CPU kernels are off here (no CPU backend or no g++)")


@needs_cpu_kernels
def test_cpu_activations_equal_mlx_ops():
    x = 4 * mx.random.normal((3, 333, 257), key=mx.random.key(0))
    x = mx.concatenate([x.flatten(), mx.array([0.0, -0.0, 1e-30, -87.5, -88.5, 88.5, -200.0, 200.0, 1e4, -1e4])])
    assert _rel(cpu_kernels.silu(x), nn.silu(x)) < 2e-7
    h = mx.random.normal(x.shape, key=mx.random.key(1))
    assert _rel(cpu_kernels.geglu(h, x), h * nn.gelu(x)) < 2e-7
    for v in (-1e4, -200.0, -88.5, 0.0, 88.5, 1e4):  # saturation, underflow, overflow: as MLX
        v = mx.array([v])
        assert np.allclose(cpu_kernels.silu(v), nn.silu(v), rtol=1e-6, atol=1e-30)
        assert np.allclose(cpu_kernels.geglu(mx.ones(1), v), nn.gelu(v), rtol=1e-6, atol=1e-30)
    assert cpu_kernels.silu(mx.zeros((2,), mx.float16)).dtype == mx.float16  # other dtypes: MLX's own ops


@needs_cpu_kernels
@pytest.mark.parametrize("chunk_bytes", [cpu_kernels.CPU_CHUNK_BYTES, 4096])
def test_cpu_attention_equals_fused_sdpa(monkeypatch, chunk_bytes):
    monkeypatch.setattr(cpu_kernels, "CPU_CHUNK_BYTES", chunk_bytes)  # 4096: many query chunks
    keys = mx.random.split(mx.random.key(2), 3)
    q, k, v = (3 * mx.random.normal((2, 3, n, 16), key=kk) for n, kk in zip((50, 77, 77), keys))
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert _rel(cpu_kernels.attention(q, k, v, 0.25), ref) < 5e-7


@needs_cpu_kernels
def test_cpu_feed_forward_chunks_and_split_equal_the_plain_path(monkeypatch):
    from mlx_sdxl.models.unet import FeedForward

    ff = FeedForward(32)
    x = mx.random.normal((2, 45, 32), key=mx.random.key(3))
    w = ff.net[0].proj
    h, g = mx.split(x @ w.weight.T + w.bias, 2, axis=-1)
    ref = ff.net[2](h * nn.gelu(g))
    for chunk in (cpu_kernels.CPU_CHUNK_BYTES, 4 * 2 * 128 * 7):  # one piece; 7 tokens at a time
        monkeypatch.setattr(cpu_kernels, "CPU_CHUNK_BYTES", chunk)
        assert _rel(ff(x), ref) < 5e-7


def test_compiled_unet_steps(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert bench_main(TINY + ["--only", "unet", "--refiner", "none", "--compile", "--json", str(out)]) == 0
    (rec,) = json.loads(out.read_text())["results"]
    assert rec["name"] == "unet_base" and rec["compiled"] is True
    _check_record(rec)
    assert "| base UNet step, compiled | float32 |" in capsys.readouterr().out


def test_ab_profile_and_components_tools(tmp_path, capsys):
    """The GPU investigation tools run end to end at tiny sizes and write their JSON."""
    from bench import ab, components, profile

    out = tmp_path / "ab.json"
    assert ab.main(["--tiny", "--size", "64", "--dtype", "float32", "--repeats", "1", "--warmup", "1",
                    "--models", "base,refiner_q", "--thresholds", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["model"], r["variant"]) for r in rows} >= {("base", "eager"), ("base", "compiled"),
                                                          ("refiner_q4", "eager"), ("refiner_q4", "dense_tokens=0")}
    assert all(r["seconds"]["median"] > 0 and r["peak_memory_bytes"] > 0 for r in rows)

    # --interleave: the models timed step for step in turn, after each alone; peaks from the lone rows
    out = tmp_path / "ab_interleaved.json"
    assert ab.main(["--tiny", "--size", "64", "--dtype", "float32", "--repeats", "3", "--warmup", "1",
                    "--models", "refiner_q,refiner", "--variants", "compiled_kv", "--interleave",
                    "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        ("refiner_q4", "compiled_kv"), ("refiner", "compiled_kv"),
        ("refiner_q4", "compiled_kv+interleaved"), ("refiner", "compiled_kv+interleaved")]
    for alone, mixed in zip(rows[:2], rows[2:]):
        assert len(mixed["seconds"]["runs"]) == 3 and mixed["seconds"]["median"] > 0
        assert mixed["peak_memory_bytes"] == alone["peak_memory_bytes"] > 0
        assert mixed["weights_bytes"] == alone["weights_bytes"]
    assert rows[0]["weights_bytes"] < rows[1]["weights_bytes"] / 2

    out = tmp_path / "profile.json"
    with pytest.raises(SystemExit):  # --kernels: one MLX configuration per process
        profile.main(["--tiny", "--kernels", "--models", "base", "--json", str(out)])
    assert profile.main(["--tiny", "--size", "64", "--models", "base", "--dtype", "float32", "--repeats", "1",
                         "--warmup", "1", "--torch", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["impl"] for r in res["results"]] == ["mlx eager", "mlx compiled", "diffusers eager"]
    for r in res["results"]:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("step_s", "pipelined_s"))
    assert res["results"][0]["build_s"] > 0
    with pytest.raises(SystemExit):
        profile.main(["--tiny", "--models", "refiner_q7", "--json", str(out)])
    assert profile.main(["--tiny", "--size", "64", "--models", "refiner_q4", "--variants", "eager", "--dtype",
                         "float32", "--repeats", "1", "--warmup", "1", "--torch", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]  # no diffusers row for a quantized UNet
    assert row["model"] == "refiner_q4" and row["step_s"] > 0
    # no CUDA here: --kernels says so and times without the kernel table
    assert profile.main(["--tiny", "--size", "64", "--models", "base", "--variants", "eager", "--dtype", "float32",
                         "--repeats", "1", "--warmup", "1", "--kernels", "--json", str(out)]) == 0
    assert "needs a CUDA build" in capsys.readouterr().err
    assert "kernels" not in json.loads(out.read_text())["results"][0]
    assert "mlx_environment" in res["machine"]

    out = tmp_path / "components.json"
    assert components.main(["--dtype", "float32", "--models", "refiner", "--scale", "16", "--chain", "1",
                            "--repeats", "1", "--kinds", "groupnorm_silu,self_attention,linear",
                            "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["kind"] for r in rows} == {"groupnorm_silu", "self_attention", "linear"}
    assert all(r["mlx_eager_s"] > 0 and r["mlx_compiled_s"] > 0 and r["torch_s"] > 0 for r in rows)
    assert all(r["flops"] > 0 for r in rows if r["kind"] != "groupnorm_silu")


def test_kernel_families():
    from bench.profile import family

    assert family("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob") == "attention"
    assert family("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert family("nvjet_sm90_hsh_256x128_64x4_1x2_h_bz_coopA_bias_TNT") == "gemm"
    assert family("void mlx::core::cu::layer_norm<__half, 256, 8>") == "normalisation"
    assert family("void mlx::core::cu::col_reduce_looped<float, float>") == "reduction"
    assert family("void mlx::core::cu::binary_vv<mlx::core::cu::Add, __half>") == "elementwise"
    assert family("void mlx::core::cu::affine_dequantize<__half, 64, 4>(const unsigned char *, ...)") == "quantized"
    assert family("void mlx::core::cu::qmm_sm90_kernel<cutlass::half_t, 4, 64>") == "quantized"


def test_cuda_runs_say_whether_cuda_graphs_were_on():
    info = {"backend": "cuda", "chip": "NVIDIA H200", "mlx_version": "0.32.4"}
    assert "CUDA graphs off" in machine.describe({**info, "mlx_environment": {"MLX_USE_CUDA_GRAPHS": "0"}})
    assert "CUDA graphs on" in machine.describe({**info, "mlx_environment": {}})
    assert "CUDA graphs on (MLX_MAX_OPS_PER_BUFFER=10)" in machine.describe(
        {**info, "mlx_environment": {"MLX_USE_CUDA_GRAPHS": "1", "MLX_MAX_OPS_PER_BUFFER": "10"}})
    assert "CUDA graphs" not in machine.describe({"backend": "cpu", "cpu": "x", "mlx_environment": {}})
