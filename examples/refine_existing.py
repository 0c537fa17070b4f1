"""Refine an existing image (img2img) with the SDXL refiner.

    python examples/refine_existing.py photo.png "a sharp photo of a cat" \
        --model stabilityai/stable-diffusion-xl-base-1.0 \
        --refiner stabilityai/stable-diffusion-xl-refiner-1.0 --strength 0.3

The image is VAE-encoded, noised to the point `strength` of the way back up
the schedule, and only those last steps are re-run, so low strengths keep the
composition and sharpen details. Without --refiner the base model does it.
"""

import argparse

from PIL import Image

from mlx_sdxl import SDXLPipeline
from mlx_sdxl.cli import default_dtype
from mlx_sdxl.metadata import save_png


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="the image to refine (its sides are cut down to multiples of 8)")
    parser.add_argument("prompt", nargs="?", default="a detailed, sharp photograph")
    parser.add_argument("--model", required=True, help="SDXL base: hub id or local path")
    parser.add_argument("--refiner", help="SDXL refiner: hub id or local path")
    parser.add_argument("--strength", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--output", default="refined.png")
    args = parser.parse_args()

    dtype = args.dtype or default_dtype()
    pipe = SDXLPipeline.from_pretrained(args.model, args.refiner, dtype=dtype)
    source = Image.open(args.image).convert("RGB")
    result = pipe.generate(args.prompt, image=source, strength=args.strength, num_inference_steps=args.steps,
                           seed=args.seed)
    [image] = result.images

    settings = dict(mode="refine", image=args.image, prompt=args.prompt, strength=args.strength,
                    num_inference_steps=args.steps, seed=result.seeds[0], scheduler="euler", guidance_scale=5.0,
                    width=image.width, height=image.height, model=args.model, refiner=args.refiner, dtype=dtype)
    save_png(image, args.output, settings, overwrite=True)
    stage = "refiner" if args.refiner else "base"
    ran = result.timings[stage].steps
    print(f"wrote {args.output} ({image.width}x{image.height}; the {stage} re-ran {ran} of {args.steps} steps)")


if __name__ == "__main__":
    main()
