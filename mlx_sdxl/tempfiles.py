"""The names of our temporary files, and the removal of those whose process is gone.

Everything mlx_sdxl writes appears under its final name only when complete: it is
written under a hidden temporary name first, then renamed. Each temporary name
carries the writer's process id, so a later run can tell a temporary that is still
being written (its process lives) from one left by a process that was killed:

    .NAME.png.<pid>.<random>.tmp     a PNG being saved (metadata.save_png)
    .NAME.partial-<pid>/             a folder being converted (convert/)
    .NAME.old-<pid>                  the folder NAME replaced by `convert --overwrite`

`remove_stale(folder)` deletes the temporaries of dead processes in one folder.
It never touches a name of another form, a temporary of a live process (or of a
process it may not signal), or our own process's.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import List

PNG_TEMP = re.compile(r"^\.(?P<name>.+\.png)\.(?P<pid>[1-9]\d{0,9})\.[a-z0-9_]{8}\.tmp$", re.IGNORECASE)
FOLDER_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>[1-9]\d{0,9})$")
# What a convert/ partial folder can hold; anything else means the folder is not ours.
_PARTIAL_CONTENT = {"base", "refiner", "manifest.json"}


def png_temp_prefix(path: Path) -> str:
    """The temporary-name prefix save_png passes to mkstemp (which adds 8 random characters)."""
    return f".{path.name}.{os.getpid()}."


def partial_path(out: Path) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def old_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old-{os.getpid()}"


def process_gone(pid: int) -> bool:
    """True only when no process `pid` exists (os.kill(pid, 0) says ESRCH)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: it exists but is someone else's
        return False
    return False


def remove_path(path: Path) -> None:
    """Remove a file, a link or a whole folder; errors are left to the caller."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _is_partial_folder(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and {p.name for p in path.iterdir()} <= _PARTIAL_CONTENT
    except OSError:
        return False


def _clean_one(folder: Path, entry_name: str) -> bool:
    """Handle one directory entry; True when a stale temporary was removed (or an old folder restored)."""
    path = folder / entry_name
    if m := PNG_TEMP.match(entry_name):
        if process_gone(int(m["pid"])) and path.is_file() and not path.is_symlink():
            path.unlink()
            return True
        return False
    m = FOLDER_TEMP.match(entry_name)
    if not m or not process_gone(int(m["pid"])):
        return False
    if m["kind"] == "partial":
        if not _is_partial_folder(path):
            return False
        shutil.rmtree(path)
        return True
    final = folder / m["name"]
    if final.exists() or final.is_symlink():  # the replacement is in place: the old copy is garbage
        remove_path(path)
    else:  # killed between the two renames of --overwrite: put the user's folder back
        os.replace(path, final)
    return True


def remove_stale(folder) -> List[str]:
    """Remove our temporaries of processes that are gone from `folder`; the names handled.

    Best effort: a folder that cannot be listed, or an entry that cannot be removed, is skipped.
    """
    folder = Path(folder)
    done = []
    try:
        names = [e.name for e in os.scandir(folder) if e.name.startswith(".")]
    except OSError:
        return done
    for name in names:
        try:
            if _clean_one(folder, name):
                done.append(name)
        except OSError:
            continue
    return done
