"""Generate an image with SDXL base + refiner and save it with its settings.

    python examples/generate.py "a red fox in the snow, golden hour" \
        --model stabilityai/stable-diffusion-xl-base-1.0 \
        --refiner stabilityai/stable-diffusion-xl-refiner-1.0

The PNG carries an A1111-style `parameters` chunk and the full settings as
JSON; `mlx-sdxl info fox.png` prints them, `mlx-sdxl generate --from fox.png`
re-runs them.
"""

import argparse

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.cli import default_dtype
from mlx_sdxl.metadata import attach_metadata, save_png


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="an astronaut riding a horse on mars")
    parser.add_argument("--model", required=True, help="SDXL base: hub id or local path")
    parser.add_argument("--refiner", help="SDXL refiner: hub id or local path (optional)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, help="default: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--output", default="generate.png")
    args = parser.parse_args()

    dtype = args.dtype or default_dtype()
    pipe = SDXLPipeline.from_pretrained(args.model, args.refiner, dtype=dtype)
    settings = dict(prompt=args.prompt, num_inference_steps=args.steps, width=args.width, height=args.height,
                    seed=args.seed, guidance_scale=5.0, high_noise_frac=0.8, scheduler="euler")
    result = pipe.generate(**settings)
    [image] = result.images

    # Record the run in the image: image.info["parameters"] now holds the A1111 text.
    attach_metadata(image, dict(settings, model=args.model, refiner=args.refiner, dtype=dtype))
    save_png(image, args.output, overwrite=True)

    t = result.timings
    stages = ", ".join(f"{s} {t[s].seconds:.1f} s" for s in ("base", "refiner", "decode") if s in t)
    print(f"wrote {args.output} (seed {result.seeds[0]}; {stages})")


if __name__ == "__main__":
    main()
