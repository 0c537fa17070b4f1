"""The command line's ControlNet options: `--controlnet SOURCE[:SCALE[:START:END]]` paired in
order with `--control-image PATH`, `--control-preprocess canny`, `--guess-mode`.

The PNG records each as {"model", "weight", "start", "end", "image", "preprocess"}, with the
ControlNet and the image named as the metadata mode says; `--from` finds them again."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

from .errors import InputError
from .identity import image_field, locate

PREPROCESSORS = ("canny",)


def add_arguments(group) -> None:
    group.add_argument("--controlnet", dest="controlnets", action="append", default=[],
                       metavar="SOURCE[:SCALE[:START:END]]",
                       help="an SDXL ControlNet (folder, .safetensors or hub id), its scale (1.0) and the share of the "
                            "schedule it acts in (0:1); repeatable, paired in order with --control-image")
    group.add_argument("--control-image", dest="control_images", action="append", default=[], metavar="PATH",
                       help="the control image of each --controlnet (an edge map, pose, depth map, ...)")
    group.add_argument("--control-preprocess", choices=PREPROCESSORS,
                       help="make the control images from ordinary pictures first (canny: needs the 'canny' extra)")
    group.add_argument("--guess-mode", action="store_true", default=None,
                       help="ControlNets act without the prompt's help, as diffusers' guess_mode")


def parse_spec(spec: str) -> dict:
    """SOURCE[:SCALE[:START:END]] → {"model", "weight", "start", "end"}."""
    parts = str(spec).split(":")
    numbers = []
    while len(parts) > 1 and len(numbers) < 3:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    if len(numbers) == 2 or any(not math.isfinite(n) for n in numbers):
        raise InputError(f"--controlnet {spec}: give SOURCE, SOURCE:SCALE or SOURCE:SCALE:START:END (finite numbers)")
    scale, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers):]) if numbers else (1.0, 0.0, 1.0)
    if len(numbers) == 1:
        start, end = 0.0, 1.0
    return {"model": ":".join(parts), "weight": scale, "start": start, "end": end}


def controls_from_args(args, recorded: Optional[list]) -> List[dict]:
    """The run's controls: the flags' (each with its image), else those a --from image recorded."""
    if not args.controlnets:
        if args.control_images:
            raise InputError("--control-image needs a --controlnet to go with it")
        return list(recorded or [])
    if len(args.control_images) != len(args.controlnets):
        raise InputError(f"{len(args.controlnets)} --controlnet but {len(args.control_images)} --control-image; "
                         "give one control image per ControlNet, in the same order")
    return [dict(parse_spec(spec), image=image, preprocess=args.control_preprocess)
            for spec, image in zip(args.controlnets, args.control_images)]


def load_controls(pipe, controls: List[dict], models_folder, recorded: bool, open_image, max_megapixels) -> list:
    """Load each ControlNet into `pipe` and build the mlx_sdxl.Control list (images checked first)."""
    from .control import Control, preprocess

    out = []
    for i, c in enumerate(controls):
        image_path = c.get("image")
        if not image_path or not Path(image_path).expanduser().exists():
            raise InputError(f"the control image {image_path!r} of ControlNet {i} is not here; pass --controlnet and "
                             "--control-image again")
        image = open_image(image_path, max_megapixels, "--control-image")
        if c.get("preprocess"):
            image = preprocess(c["preprocess"], image)
        source = locate(c["model"], "controlnet", models_folder, recorded)
        name = pipe.load_controlnet(source, name=f"controlnet{i}")
        out.append(Control(name, image, c["weight"], c["start"], c["end"]))
    return out


def record_controls(controls: List[dict], pipe, mode: str) -> list:
    """The controls as the PNG records them: the ControlNet by name and hash (or path), the image by name."""
    from .identity import source_name

    return [dict(c, model=source_name(c["model"], mode), image=image_field(c.get("image"), mode)) for c in controls]
