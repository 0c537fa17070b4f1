"""mlx_sdxl's process-wide MLX settings: set on import where the user has not set them."""

import os
import subprocess
import sys


def _env_after_import(**env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLX_USE_CUDA_GRAPHS")}
    code = "import os, mlx_sdxl; print(os.environ.get('MLX_USE_CUDA_GRAPHS'))"
    done = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


def test_cuda_graphs_default_off_and_user_setting_wins():
    assert _env_after_import() == "0"
    assert _env_after_import(MLX_USE_CUDA_GRAPHS="1") == "1"


def test_mlx_environment_lists_only_mlx_variables(monkeypatch):
    from mlx_sdxl.runtime import apply_cuda_defaults, mlx_environment

    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "10")
    monkeypatch.setenv("NOT_MLX", "x")
    env = mlx_environment()
    assert env["MLX_MAX_OPS_PER_BUFFER"] == "10" and "NOT_MLX" not in env
    assert apply_cuda_defaults()["MLX_USE_CUDA_GRAPHS"] == os.environ["MLX_USE_CUDA_GRAPHS"]
