"""`--outputs DIR`: every image the server makes, saved with its metadata as NNNNN-SEED.png
(A1111's numbering), written atomically by `metadata.save_png`."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import List

from ..metadata import save_png

_NUMBERED = re.compile(r"^(\d{5,})-")


class Outputs:
    def __init__(self, folder: Path):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        numbers = [int(m.group(1)) for p in self.folder.iterdir() if (m := _NUMBERED.match(p.name))]
        self._next = max(numbers, default=-1) + 1

    def save(self, images, seeds) -> List[Path]:
        paths = []
        for image, seed in zip(images, seeds):
            with self._lock:
                number, self._next = self._next, self._next + 1
            paths.append(save_png(image, self.folder / f"{number:05d}-{seed}.png"))
        return paths
