"""Request bodies, with A1111's field names (modules/api/models.py).

Fields A1111 clients commonly send are declared, so their types are checked and a bad one
gives a 422 that names it. Fields mlx_sdxl does not implement are accepted; when one is
set to something other than its neutral value, `info.notes` of the response says it was
ignored. Unknown fields are ignored, as A1111 does. A field left out takes mlx_sdxl's
default (1024×1024, 40 steps, CFG 5, the model's own sampler), not A1111's SD 1.5 defaults.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..spec import MAX_SEED, MIN_SIDE

# Accepted and ignored: a note in `info` says so when one is not at its neutral value.
IGNORED_IF_SET = ("enable_hr", "restore_faces", "tiling", "subseed_strength")


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: str = ""
    negative_prompt: str = ""
    styles: Optional[List[str]] = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: a random seed")
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None      # the old name of sampler_name
    scheduler: Optional[str] = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: Optional[int] = Field(None, ge=1)
    cfg_scale: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    width: Optional[int] = Field(None, ge=MIN_SIDE)
    height: Optional[int] = Field(None, ge=MIN_SIDE)
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    enable_hr: bool = False
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
    override_settings: Optional[Dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False
    script_name: Optional[str] = None
    script_args: List[Any] = []
    alwayson_scripts: Dict[str, Any] = {}
    force_task_id: Optional[str] = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: Optional[List[str]] = None
    denoising_strength: float = Field(0.75, gt=0, le=1, allow_inf_nan=False)
    resize_mode: int = Field(0, ge=0, le=3)
    mask: Optional[str] = None
    mask_blur: Optional[int] = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class PNGInfoRequest(BaseModel):
    image: str


def as_parameters(request: BaseModel) -> dict:
    """The response's `parameters`: the request as the server read it (A1111 returns its request)."""
    out = request.model_dump()
    if isinstance(request, Img2ImgRequest) and not request.include_init_images:
        out["init_images"], out["mask"] = None, None
    return out
