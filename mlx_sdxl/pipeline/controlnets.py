"""The ControlNets a pipeline has loaded, and how a stage asks them for residuals each step.

Control applies to the base stage only (the refiner runs without it, as diffusers' SDXL
ControlNet workflows do). A Control acts in its [start, end) share of the run's steps,
counted from the first step the run makes (after an img2img strength cut), as diffusers'
control_guidance_start / end do.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Dict, Optional

from ..errors import InputError, WeightsError
from ..spec import BASE
from .plan import Plan


class ControlNets:
    """Loaded ControlNets by name (weights are read lazily, on first use)."""

    def __init__(self, dtype, bits: Optional[int] = None, group_size: int = 64):
        self.dtype, self.bits, self.group_size = dtype, bits, group_size
        self.nets: Dict[str, object] = {}
        self._lock = threading.Lock()

    def load(self, source, name: Optional[str], base_unet_config: dict) -> str:
        from ..models.controlnet import check_controlnet_fits, load_controlnet
        from ..models.unet import UNetConfig

        path = _local_or_hub(source)
        name = name or Path(str(source).rstrip("/")).name
        if not isinstance(name, str) or not name:
            raise InputError(f"a ControlNet name must be a non-empty string, got {name!r}")
        net = load_controlnet(path, dtype=self.dtype, variant="fp16" if (path / "config.json").is_file() and any(
            path.glob("*.fp16.safetensors")) else None) if path.is_dir() else load_controlnet(path, dtype=self.dtype)
        check_controlnet_fits(net, UNetConfig.from_dict(base_unet_config))
        if self.bits:
            from ..quantize import quantize_model

            net = quantize_model(net, bits=self.bits, group_size=self.group_size)
        with self._lock:
            self.nets[name] = net
        return name

    def unload(self, name: Optional[str] = None) -> None:
        with self._lock:
            if name is None:
                self.nets.clear()
            elif self.nets.pop(name, None) is None:
                raise InputError(f"no ControlNet loaded as {name!r}; loaded: {', '.join(self.nets) or 'none'}")


def _local_or_hub(source) -> Path:
    from .. import hub
    from ..sources import is_local_spec

    text = str(source)
    path = Path(text).expanduser()
    if is_local_spec(text):
        if not path.exists():
            raise WeightsError(f"ControlNet not found: no such file or folder {text}")
        return path
    if hub.looks_like_repo_id(text):
        return hub.snapshot(text, extra_patterns=["config.json", "*.safetensors"])
    raise WeightsError(f"ControlNet not found: {text!r} (give a folder, a .safetensors file or a hub id)")


def with_controls(plan: Plan, nets: Dict[str, object]) -> Plan:
    """The plan with its base stage asking the ControlNets for residuals at every step, and
    the controls recorded in its settings. Checks the controls (cheap: before any heavy work)."""
    from ..control import control_residuals, prepare_controls

    req, stages = plan.request, list(plan.stages)
    base = [s for s in stages if s.name == BASE]
    if not isinstance(req.guess_mode, bool):
        raise InputError(f"guess_mode must be True or False, got {req.guess_mode!r}")
    width, height = plan.settings[0]["width"], plan.settings[0]["height"]
    guided = bool(base) and base[0].guidance.active
    prepared = prepare_controls(req.control, nets, width, height, plan.batch, guided, req.guess_mode)
    first = stages[0].steps.start
    num_steps = req.num_inference_steps - first

    def residuals(xin, t, i, embeds, pooled, time_ids):
        res = control_residuals(prepared, nets, xin, t, embeds, pooled, time_ids, i - first, num_steps, guided,
                                req.guess_mode)
        return {} if res is None else dict(down_block_additional_residuals=res[0],
                                           mid_block_additional_residual=res[1])

    stages = [dataclasses.replace(s, unet_extras=residuals) if s.name == BASE else s for s in stages]
    record = [dict(model=p.control.name, weight=p.control.scale, start=p.control.start, end=p.control.end)
              for p in prepared]
    settings = [dict(s, controls=record, guess_mode=req.guess_mode or None) for s in plan.settings]
    return dataclasses.replace(plan, stages=tuple(stages), settings=settings)
