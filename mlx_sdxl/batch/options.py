"""`generate`'s options in a batch: the command line's defaults and each job's own.

A job line's keys are `generate`'s long option names, with dashes or underscores. Each
job is read by `generate`'s own parser, as `generate DEFAULTS JOB-OPTIONS -- PROMPT`, then
resolved and checked by the same functions `generate` uses, so a batch image is the
image `generate` makes from the same options.

Options that change what is loaded (models, dtype, embeddings, ...) hold for the whole
batch and are given on the command line only; a job line that sets one is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .. import cli
from ..errors import InputError
from ..identity import MODEL_KEYS, locate, models_dir
from ..lora.tags import parse_lora_tags
from ..spec import MAX_SEED

# generate's options (by dest) that a job line may set; each becomes its own default on the command line
PER_JOB = ("prompt", "negative_prompt", "prompt_syntax", "num_inference_steps", "high_noise_frac", "guidance_scale",
           "scheduler", "timestep_spacing", "eta", "width", "height", "seeds", "n_images", "max_megapixels", "image",
           "strength", "resize", "mask", "mask_blur", "padding_mask_crop")
INPUTS = ("image", "mask")  # paths to pictures, read when the job runs
# generate's options that hold for the whole batch: the command line only
BATCH_WIDE = ("model", "refiner", "vae", "refiner_bits", "low_memory", "dtype", "compile", "prediction_type", "quiet",
              "metadata", "models_dir", "embeddings", "embedding_dir")
REFUSED = {
    "from_image": "--from is not used by batch; put the settings in the job file",
    "output": "--output is not used by batch; give the folder with --out DIR",
    "overwrite": "--overwrite is not used by batch: images whose recorded settings differ from their job's are "
                 "made again, the others are kept",
}


def _raise(message: str):
    raise InputError(message)


class GenerateOptions:
    """`generate`'s parser, reporting errors by raising InputError instead of exiting."""

    def __init__(self):
        parser = cli.build_parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        self.parser = subparsers.choices["generate"]
        self.parser.error = _raise
        self.actions: Dict[str, argparse.Action] = {}
        for action in self.parser._actions:
            for option in action.option_strings:
                if option.startswith("--"):
                    self.actions[option[2:].replace("-", "_")] = action
            if not action.option_strings and action.dest == "prompt":
                self.actions["prompt"] = action
        self.blank = vars(self.parse([]))

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        return self.parser.parse_args(list(argv))

    def given(self, args: argparse.Namespace) -> List[str]:
        """The dests of the options that `args` sets (differ from an empty command line)."""
        return [k for k, v in vars(args).items() if v != self.blank.get(k)]

    def flag(self, dest: str) -> str:
        action = next((a for a in self.parser._actions if a.dest == dest), None)
        return max(action.option_strings, key=len) if action is not None and action.option_strings else dest


def check_batch_wide(opts: GenerateOptions, args: argparse.Namespace) -> None:
    """Refuse command-line options that a batch does not apply (instead of ignoring them)."""
    for dest in opts.given(args):
        if dest in REFUSED:
            raise InputError(REFUSED[dest])
        if dest == "prompt":
            raise InputError(f"unexpected argument {args.prompt!r}: prompts come from the job file")
        if dest not in PER_JOB and dest not in BATCH_WIDE:
            raise InputError(f"{opts.flag(dest)} is not supported by batch yet")
    if args.metadata == "none":
        raise InputError("--metadata none: a batch needs each image's metadata to resume; accepted: minimal, full")


def _values(action: argparse.Action, key: str, value) -> List[str]:
    flag = max(action.option_strings, key=len)
    values = value if isinstance(value, list) and action.nargs == "+" else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            kind = "a list of numbers" if action.nargs == "+" else "a number or a string"
            raise InputError(f"{key!r} must be {kind}, got {json.dumps(value)}")
    if action.nargs == "+":
        return [flag, *map(str, values)]
    return [f"{flag}={values[0]}"]


def job_argv(opts: GenerateOptions, options: dict) -> List[str]:
    """A job line's options as `generate` arguments (the prompt last, after `--`)."""
    argv, prompt, seen = [], [], {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        action = opts.actions.get(name)
        if action is None:
            accepted = ", ".join(k for k, a in opts.actions.items() if a.dest in PER_JOB)
            raise InputError(f"unknown key {key!r}; accepted: {accepted}")
        if action.dest in seen:
            raise InputError(f"{key!r} and {seen[action.dest]!r} are the same option; give it once")
        seen[action.dest] = key
        if action.dest not in PER_JOB:
            raise InputError(REFUSED.get(action.dest) or f"{key!r} holds for the whole batch: give "
                             f"{max(action.option_strings, key=len)} on the command line, not in a job")
        if value is None:
            continue
        if action.dest == "prompt":
            if not isinstance(value, str):
                raise InputError(f"'prompt' must be a string, got {json.dumps(value)}")
            prompt = ["--", value]
        else:
            argv += _values(action, key, value)
    return argv + prompt


def derived_seed(index: int, options: dict) -> int:
    """The seed of a job that names none: from its number and options, so that a rerun makes the same image."""
    text = json.dumps({"job": index, "options": options}, sort_keys=True, ensure_ascii=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % (MAX_SEED + 1)


@dataclass(frozen=True)
class Defaults:
    """The command line's generate options: the argv every job starts from, and the batch-wide settings."""

    argv: Tuple[str, ...]
    args: argparse.Namespace
    settings: dict          # models located, dtype chosen: what the pipeline is opened with


def read_defaults(opts: GenerateOptions, argv: Sequence[str]) -> Defaults:
    """Check the command line's generate options and resolve the batch-wide settings (no model loads)."""
    args = opts.parse(argv)
    check_batch_wide(opts, args)
    settings, _, explicit = cli.resolve_settings(args)
    try:
        cli.validate(dict(settings, prompt=""), explicit, args)
    except cli.CLIError as e:
        raise InputError(str(e)) from None
    folder = models_dir(args.models_dir)
    for key in MODEL_KEYS:
        if settings[key] is not None:
            settings[key] = locate(settings[key], key, folder, recorded=False)
    settings["dtype"] = settings["dtype"] or cli.default_dtype()
    return Defaults(tuple(argv), args, settings)


def resolve_job(opts: GenerateOptions, defaults: Defaults, index: int, options: dict) -> Tuple[dict, List[int], dict]:
    """(settings, seeds, generate's parsed arguments) of one job line, checked as `generate` checks them."""
    args = opts.parse([*defaults.argv, *job_argv(opts, options)])
    settings, seeds, explicit = cli.resolve_settings(args)
    try:
        cli.validate(settings, explicit, args)
        seeds = cli.resolve_seeds([derived_seed(index, options)] if seeds is None else seeds, args.n_images)
    except cli.CLIError as e:
        raise InputError(str(e)) from None
    for key in ("prompt", "negative_prompt"):
        if parse_lora_tags(settings[key])[1]:
            raise InputError("LoRA tags (<lora:NAME:SCALE>) are not supported by batch yet; run such a job with "
                             "generate")
    for key in (*MODEL_KEYS, "dtype", "refiner_bits"):
        settings[key] = defaults.settings[key]
    settings["controls"] = []  # ControlNets are not offered in a batch (refused above, as options batch lacks)
    for key in INPUTS:
        if settings[key] is not None:
            settings[key] = str(Path(settings[key]).expanduser().absolute())
    if settings["image"] is None:
        settings["strength"] = None
    return settings, seeds, vars(args)
