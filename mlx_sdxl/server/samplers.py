"""A1111 sampler and scheduler names ↔ mlx_sdxl's samplers.

A1111 (1.9 and later) names a sampler ("DPM++ 2M") and a noise schedule ("Karras") apart;
older clients send one name ("DPM++ 2M Karras"). Both are read. The table is built from
`schedulers.SCHEDULERS` and `metadata.A1111_SAMPLERS` when asked, so a sampler added there
is served at once; one without an A1111 name is served under its own name ("unipc"). Our own
names are accepted too.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..errors import SDXLError
from ..metadata import A1111_SAMPLERS
from ..schedulers import SCHEDULERS, scheduler_name
from ..spec import DEFAULT_SCHEDULER

AUTOMATIC, KARRAS = "automatic", "karras"
_SCHEDULE_LABELS = {AUTOMATIC: "Automatic", KARRAS: "Karras"}
_KARRAS_SUFFIX = " karras"


class SamplerError(SDXLError):
    """An unknown sampler or schedule; `field` is the request field to name in the 422."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def a1111_name(ours: str) -> str:
    return A1111_SAMPLERS.get(ours, ours)


def _split(name: str) -> Tuple[str, str]:
    """'DPM++ 2M Karras' → ('dpm++ 2m', 'karras'); 'Euler' → ('euler', 'automatic')."""
    low = name.lower()
    if low.endswith(_KARRAS_SUFFIX):
        return low[: -len(_KARRAS_SUFFIX)], KARRAS
    return low, AUTOMATIC


def table() -> Dict[Tuple[str, str], str]:
    """(A1111 sampler name in lower case, schedule) → our sampler."""
    return {_split(a1111_name(ours)): ours for ours in SCHEDULERS}


def _karras_of(known: Dict[Tuple[str, str], str], base: str) -> Optional[str]:
    """The Karras variant of A1111 sampler `base`: listed as "... Karras", or ours named "<plain>_karras"."""
    if (base, KARRAS) in known:
        return known[(base, KARRAS)]
    named = f"{known.get((base, AUTOMATIC))}_karras"
    return named if named in SCHEDULERS else None


def _schedule(value: Optional[str]) -> str:
    key = (value or AUTOMATIC).strip().lower()
    return key if key else AUTOMATIC


def _accepted_samplers() -> str:
    return ", ".join(sorted({a1111_name(o) for o in SCHEDULERS}))


def resolve(sampler_name: Optional[str], scheduler: Optional[str] = None) -> Optional[str]:
    """Our sampler for an A1111 (sampler_name, scheduler) pair, or None (neither given: the
    model's own sampler, from its scheduler_config.json); SamplerError naming the field."""
    schedule = _schedule(scheduler)
    if not sampler_name:
        if schedule == AUTOMATIC:
            return None
        sampler_name = a1111_name(DEFAULT_SCHEDULER)
    if schedule not in _SCHEDULE_LABELS:
        raise SamplerError("scheduler", f"schedule {scheduler!r} is not available; accepted: "
                                        f"{', '.join(_SCHEDULE_LABELS.values())} (or leave it out)")
    base, own = _split(sampler_name.strip())
    if own == KARRAS:
        schedule = KARRAS
    known = table()
    ours = known.get((base, AUTOMATIC)) if schedule == AUTOMATIC else _karras_of(known, base)
    if ours is None and schedule == AUTOMATIC:
        try:
            ours = scheduler_name(sampler_name)  # one of our own names ("dpmpp_2m_karras")
        except SDXLError:
            ours = None
    if ours is not None:
        return ours
    if any(key[0] == base for key in known):
        with_karras = sorted(a1111_name(ours) for (name, schedule), ours in known.items()
                             if schedule == AUTOMATIC and _karras_of(known, name))
        raise SamplerError("scheduler", f"sampler {sampler_name!r} has no {_SCHEDULE_LABELS[schedule]} schedule "
                                        f"here; Karras is available for: {', '.join(with_karras) or 'none'}")
    raise SamplerError("sampler_name", f"unknown sampler {sampler_name!r}; accepted: {_accepted_samplers()}")


def sampler_items() -> List[dict]:
    """GET /sdapi/v1/samplers: one item per sampler, A1111's shape."""
    items = []
    for ours in SCHEDULERS:
        options = {"scheduler": KARRAS} if _split(a1111_name(ours))[1] == KARRAS else {}
        items.append({"name": a1111_name(ours), "aliases": [ours], "options": options})
    return items


def scheduler_items() -> List[dict]:
    """GET /sdapi/v1/schedulers: the schedules some sampler here offers."""
    offered = {key[1] for key in table()}
    return [{"name": key, "label": label, "aliases": None, "default_rho": 7.0 if key == KARRAS else -1.0,
             "need_inner_model": False} for key, label in _SCHEDULE_LABELS.items() if key in offered]
