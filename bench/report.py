"""Writing the results: JSON (schema in SCHEMA.md), a Markdown table, a PNG chart."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import List, Optional

from .machine import describe

SCHEMA_VERSION = 1

LABELS = {
    "unet_base": "base UNet step",
    "unet_refiner": "refiner UNet step",
    "vae_decode": "VAE decode",
    "text_encode": "text encoders (CLIP-L + bigG)",
    "e2e": "whole image",
    "e2e_few_steps": "whole image, few steps (guidance 0, Euler trailing, base only)",
}


def label(rec: dict) -> str:
    name = rec["name"]
    text = f"refiner UNet step, {rec.get('bits')}-bit" if name.startswith("unet_refiner_q") else LABELS.get(name, name)
    return text + (", compiled" if rec.get("compiled") else "")


def write_json(report: dict, path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def _gib(n: Optional[int]) -> str:
    return f"{n / 2 ** 30:.2f}" if n else "–"


def _s(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def markdown(report: dict) -> str:
    st = report["settings"]
    lines = [
        f"**Machine:** {describe(report['machine'])}",
        "",
        f"**Settings:** {st['width']}×{st['height']}, {st['steps']} steps, hand-off {st['high_noise_frac']}, "
        f"UNet batch {st['batch']} (classifier-free guidance), weights: {st['weights']}, "
        f"{st['repeats']} timed runs after {st['warmup']} warm-up.",
        "",
    ]
    compared = any("diffusers" in r for r in report["results"])
    head = ["stage", "dtype", "median s", "min–max s", "TFLOP/s", "peak GiB", "load s"]
    if compared:
        head += ["diffusers s", "MLX / diffusers"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        sec = r["seconds"]
        dtype = r["dtype"]
        if r.get("compute_dtype") and r["compute_dtype"] != dtype:
            dtype += f" (computes {r['compute_dtype']})"
        row = [label(r), dtype, _s(sec["median"]), f"{_s(sec['min'])}–{_s(sec['max'])}",
               f"{r['tflops_per_second']:.3g}" if r.get("tflops_per_second") else "–",
               _gib(r.get("peak_memory_bytes")), _s(r.get("load_seconds"))]
        if compared:
            d = r.get("diffusers")
            row += [_s(d["seconds"]["median"]) if d else "–", f"{d['mlx_over_diffusers']:.2f}" if d else "–"]
        lines.append("| " + " | ".join(row) + " |")
    lines += quantized_summary(report["results"])
    for s in report.get("skipped", []):
        lines.append(f"\n*{s['name']} ({s.get('dtype', '')}) skipped: {s['reason']}*")
    if compared:
        c = report.get("compare", {}).get("diffusers", {})
        lines.append(f"\nPyTorch {c.get('torch_version')} on {c.get('device')}, diffusers "
                     f"{c.get('diffusers_version')}; MLX / diffusers < 1 means MLX is faster.")
    return "\n".join(lines) + "\n"


def quantized_summary(results: List[dict]) -> List[str]:
    """One line per quantized refiner record: its step time and step peak against the dense
    refiner's in the same dtype."""
    dense = {r["dtype"]: r for r in results if r["name"] == "unet_refiner"}
    out = []
    for r in results:
        d = dense.get(r["dtype"])
        if r["stage"] != "unet" or not r.get("bits") or d is None:
            continue
        speed = r["seconds"]["median"] / d["seconds"]["median"]
        memory = r["peak_memory_bytes"] / d["peak_memory_bytes"]
        out.append(f"\n{r['bits']}-bit refiner ({r['dtype']}): step {speed:.2f}× the dense refiner's, "
                   f"peak memory {memory:.0%} of its.")
    return out


def chart(report: dict, path) -> Optional[str]:
    """Write a PNG bar chart; returns None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return ("matplotlib is not installed, so no chart was written (pip install 'mlx-sdxl[bench]' "
                "or pip install matplotlib)")
    results: List[dict] = report["results"]
    if not results:
        return "no results to chart"
    names = [f"{label(r)} ({r['dtype']})" for r in results]
    med = [r["seconds"]["median"] for r in results]
    lo = [m - r["seconds"]["min"] for m, r in zip(med, results)]
    hi = [r["seconds"]["max"] - m for m, r in zip(med, results)]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(results) + 1.8))
    y = list(range(len(results)))
    compared = [r.get("diffusers") for r in results]
    h = 0.38 if any(compared) else 0.6
    ax.barh([i - (h / 2 if any(compared) else 0) for i in y], med, height=h, xerr=[lo, hi], color="#3b7dd8",
            label="mlx_sdxl", capsize=3)
    if any(compared):
        dm = [d["seconds"]["median"] if d else 0 for d in compared]
        ax.barh([i + h / 2 for i in y], dm, height=h, color="#e8833a", label="diffusers (PyTorch)")
    ax.set_yticks(y)
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    for i, m, r in zip(y, med, results):
        ax.annotate(f"  {m:.3g} s", (r["seconds"]["max"], i - (h / 2 if any(compared) else 0)), va="center",
                    fontsize=7)
    ax.set_xlabel("seconds (median; bars span min–max)")
    st = report["settings"]
    ax.set_title(textwrap.fill(f"{describe(report['machine'])}; {st['width']}×{st['height']}, UNet batch "
                               f"{st['batch']}, weights: {st['weights']}", 120), fontsize=7)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
