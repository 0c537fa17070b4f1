"""Benchmarks for mlx_sdxl: `mlx-sdxl bench` / `python -m bench` (see bench/SCHEMA.md for the JSON)."""
