"""One quantized layer, three ways, and the quantized UNet's weight bytes per bit width.

`python -m bench.quantized_layer` prints the SDXL refiner UNet's weight bytes for
each bit width (from shapes, nothing allocated), then the time per call of one
1536 -> 1536 layer at several token counts: a dense matmul, dequantize-then-matmul
(what `QLinear` does for many rows) and `mx.quantized_matmul` (what it does for
few rows, below `quantize.DENSE_TOKENS`).
"""

from __future__ import annotations

import time

import mlx.core as mx

from mlx_sdxl.quantize import quantized_nbytes
from mlx_sdxl.spec import BITS, DEFAULT_GROUP_SIZE


def bench_layer(in_dims: int = 1536, out_dims: int = 1536, tokens: int = 4096, bits: int = 4,
                group_size: int = DEFAULT_GROUP_SIZE, dtype=mx.float32, repeats: int = 10) -> dict:
    """Milliseconds per call of one (tokens × in_dims) @ (in_dims → out_dims) layer:
    dense matmul, dequantize-then-matmul, and mx.quantized_matmul."""
    x = mx.random.normal((tokens, in_dims)).astype(dtype)
    w = (mx.random.normal((out_dims, in_dims)) * in_dims ** -0.5).astype(dtype)
    q, s, b = mx.quantize(w, group_size, bits)
    mx.eval(x, w, q, s, b)
    ways = {
        "dense": lambda: x @ w.T,
        "dequant_matmul": lambda: x @ mx.dequantize(q, s, b, group_size, bits).T,
        "quantized_matmul": lambda: mx.quantized_matmul(x, q, s, b, True, group_size, bits),
    }
    result = {}
    for name, f in ways.items():
        mx.eval(f())
        t0 = time.perf_counter()
        for _ in range(repeats):
            mx.eval(f())
        result[name] = 1e3 * (time.perf_counter() - t0) / repeats
    return result


def bytes_table(config=None, group_size: int = DEFAULT_GROUP_SIZE) -> str:
    """A text table of UNet weight bytes per bit width (default: the SDXL refiner)."""
    if config is None:
        from mlx_sdxl.models.unet import UNetConfig
        config = UNetConfig.sdxl_refiner()
    lines = [f"{'bits':>6} {'convs+linear GB':>16} {'linear-only GB':>15}",
             f"{'fp16':>6} {quantized_nbytes(config, None) / 1e9:>16.3f} {'':>15}"]
    for bits in BITS:
        lines.append(f"{bits:>6} {quantized_nbytes(config, bits, group_size, True) / 1e9:>16.3f} "
                     f"{quantized_nbytes(config, bits, group_size, False) / 1e9:>15.3f}")
    return "\n".join(lines)


def main() -> int:
    print(f"SDXL refiner UNet weights, group size {DEFAULT_GROUP_SIZE} (GB = 1e9 bytes):\n{bytes_table()}")
    for tokens in (1, 16, 77, 256, 1024, 4096):
        r = bench_layer(tokens=tokens)
        print(f"1536x1536 layer, {tokens:>5} tokens: " + ", ".join(f"{k} {v:.2f} ms" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
