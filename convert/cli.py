"""Command line for convert/: `python -m convert ...` and `mlx-sdxl convert ...`."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mlx_sdxl.errors import SDXLError
from mlx_sdxl.signals import report, terminate_as_interrupt
from mlx_sdxl.spec import BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES


def build_parser(prog: str = "python -m convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Convert SDXL weights into an MLX-native folder.")
    p.add_argument("--base", required=True, help="hub id, diffusers folder or single-file .safetensors")
    p.add_argument("--refiner", help="the refiner, in any of the same forms")
    p.add_argument("--vae", help="a replacement VAE (folder or .safetensors), e.g. the fp16-fix VAE")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--refiner-bits", type=int, choices=BITS, help="quantize the refiner UNet")
    p.add_argument("--base-bits", type=int, choices=BITS, help="quantize the base UNet")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES)
    p.add_argument("--linear-only", action="store_true", help="quantize Linear layers only, keep convs dense")
    p.add_argument("--lora", dest="loras", action="append", default=[], metavar="PATH[:SCALE]",
                   help="bake a LoRA (file, folder or hub id) into the base at SCALE (default 1.0); repeatable")
    p.add_argument("--tokenizer", help="folder holding tokenizer/ and tokenizer_2/ (for single files)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true")
    return p


def _error(prog: str, e: Exception) -> int:
    """One `PROG: error: ...` line (multi-line messages are joined); exit status 2."""
    if isinstance(e, OSError) and e.filename is not None:
        message = f"{e.filename}: {e.strerror or e}"
    else:
        message = str(e)
    print(f"{prog}: error: " + " ".join(message.split()), file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None, prog: str = "python -m convert") -> int:
    """Run a conversion. Exit status: 0 done, 2 bad input or a failed write (one error line),
    130 / 143 / 129 for Ctrl-C / SIGTERM / SIGHUP; nothing partial is ever left behind."""
    args = build_parser(prog).parse_args(argv)
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with terminate_as_interrupt():
        try:
            from .export import convert

            convert(args.base, args.out, refiner=args.refiner, vae=args.vae, dtype=args.dtype,
                    refiner_bits=args.refiner_bits, base_bits=args.base_bits, group_size=args.group_size,
                    convs=not args.linear_only, overwrite=args.overwrite, tokenizer=args.tokenizer, log=log,
                    loras=args.loras)
        except (SDXLError, OSError) as e:
            return _error(prog, e)
        except KeyboardInterrupt as e:  # Ctrl-C, and SIGTERM / SIGHUP as signals.Terminated
            return report(prog, e)
    return 0
