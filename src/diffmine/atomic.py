"""Atomic file writes: a reader (or a resumed run) never sees half a file.

Every file of a run directory is written through :func:`atomic_write`: into a temporary file
``NAME.<random>.diffmine.tmp`` beside the target, flushed, then renamed over it (a rename within one folder
is atomic on POSIX). The temporary name is unique, so two processes writing the same file do not
write into (or rename away) each other's temporary file: the last rename wins, whole. A killed
process leaves at most a ``.tmp`` file, which nothing reads; ``diffmine status`` counts such
leftovers (:func:`is_temporary_name`) and ``diffmine clean`` removes them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

# ".diffmine" before ".tmp": a user's own "notes.20241231.tmp" in a run is never taken for a leftover
TEMPORARY_SUFFIX = ".diffmine.tmp"
# the names mkstemp gives below: the target's name, a dot, 8 random characters (CPython's tempfile
# draws them from a-z, 0-9 and _), the suffix. `diffmine clean` removes nothing else, so a file of
# the user's would need all of that to be mistaken for a leftover
TEMPORARY_NAME = re.compile(r".+\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))


def is_temporary_name(name: str) -> bool:
    """Whether a file name is one :func:`atomic_write` gives its temporary files."""
    return TEMPORARY_NAME.fullmatch(name) is not None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp_path)`` creates the content at a temporary path, which is then renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMPORARY_SUFFIX)
    os.close(handle)  # writers open the path themselves (some, like pyarrow, only take a path)
    tmp = Path(name)
    try:
        write(tmp)
        # some writers (safetensors) create their file 0600; a run is shared as the umask says
        os.chmod(tmp, 0o666 & ~current_umask())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value) -> Path:
    return write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def write_with(path: str | Path, save: Callable) -> Path:
    """``save(binary file object)``, e.g. ``lambda f: np.save(f, array)``, written atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            save(f)

    return atomic_write(path, write)


def write_table(table, path: str | Path) -> Path:
    """A pyarrow Table as Parquet, written atomically."""
    import pyarrow.parquet as pq

    return atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))


def read_npy(path: str | Path):
    """An array written with ``write_with(path, np.save)``; never a pickle. A damaged or truncated
    file (a copy cut short) is a ValueError naming it, not numpy's bare message."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable array ({exc}); re-run the step that made it") from None
