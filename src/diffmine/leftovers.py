"""Leftovers of interrupted writes: the temporary files that killed processes left in a run.

Every file of a run is written through ``atomic.atomic_write``: into ``NAME.<random>.diffmine.tmp`` beside
it, then renamed over it. A process killed mid-write (SIGKILL, the out-of-memory killer, a power
cut) leaves that temporary file, which nothing reads and nothing removes: for a Stable Diffusion
run, a half-written UNet of gigabytes. ``diffmine status`` counts them, ``diffmine clean`` removes
them.

What is removed, and when:

- only regular files named as ``atomic_write`` names its temporary files
  (``atomic.is_temporary_name``), found without following links, outside the dataset's folder
  where it lies inside the run (the demo's data: diffmine never writes there);
- only while no diffmine process is in a step of the run: ``clean`` holds every lock of the run
  (``lineage.quiet_run``). A running step holds its lock, its data-parallel workers theirs, so a
  temporary file being written is never taken for a leftover; a step starting meanwhile waits the
  moment ``clean`` takes. A step's own start could not do this safely: its data-parallel workers
  write beside it, and the leftovers of other steps would wait for their step to run again.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .atomic import is_temporary_name
from .lineage import quiet_run
from .rundir import Run, RunError
from .terminal import counted, printable, shell_word, size_text

SHOWN = 3  # leftovers named in a summary; the others counted


def leftovers(run: Run) -> list[Path]:
    """The temporary files of interrupted writes under the run, in path order (see the module's doc)."""
    dataset = _dataset_inside(run)
    found = []
    for folder, subfolders, files in os.walk(run.path):  # links to folders are not followed
        subfolders[:] = sorted(name for name in subfolders if os.path.realpath(os.path.join(folder, name)) != dataset)
        found += [Path(folder, name) for name in sorted(files)
                  if is_temporary_name(name) and _size(Path(folder, name)) is not None]
    return found


def _size(path: Path) -> int | None:
    """A regular file's size; None for anything else (a link: never followed, never removed) or a
    file gone meanwhile."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _dataset_inside(run: Run) -> str | None:
    """The real path of the listed dataset's folder where it lies inside the run, not the run itself."""
    if run.lineage.get("listing") is None:
        return None
    root, inside = os.path.realpath(run.dataset_root), os.path.realpath(run.path)
    return root if root.startswith(inside + os.sep) else None


def describe(run: Run, paths: list[Path]) -> str:
    """``2 temporary files of interrupted writes, 1.3 GiB: model/a.safetensors.x1y2z3w4.diffmine.tmp, ...``"""
    total = sum(_size(path) or 0 for path in paths)
    shown = ", ".join(str(path.relative_to(run.path)) for path in paths[:SHOWN])
    more = f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else ""
    return f"{counted(len(paths), 'temporary file')} of interrupted writes, {size_text(total)}: {shown}{more}"


def running_steps(run: Run) -> list[str] | None:
    """What is running in the run now (``[]``: nothing); None where the run's locks cannot be
    opened (a read-only copy, where nothing can run either)."""
    try:
        with quiet_run(run.path) as running:
            return running
    except OSError:
        return None


def status_line(run: Run) -> str | None:
    """``diffmine status``'s line on the run's leftovers; None without any."""
    found = leftovers(run)
    if not found:
        return None
    running = running_steps(run)
    if running:  # its write in progress looks like a leftover until it is renamed into place
        return (f"leftovers: {describe(run, found)}; {', '.join(running)} running now, some may be its writes in "
                f"progress: `diffmine clean --run {shell_word(run.path)}` once it has finished")
    return f"leftovers: {describe(run, found)}; remove with `diffmine clean --run {shell_word(run.path)}`"


def clean(run: Run) -> str:
    """Remove the run's leftovers while no step runs; returns the line to print. RunError naming
    what runs, removing nothing, when a step does."""
    if not run.lineage.path.is_file():  # a mistyped --run (a home folder) is never searched, nor given a lock folder
        raise RunError(printable(f"{run.path}: not a diffmine run (no {run.lineage.path.name})"))
    with quiet_run(run.path) as running:
        if running:
            raise RunError(printable(f"{run.path}: a diffmine process is running {', '.join(running)} on this run; "
                                     "clean once it has finished (its temporary files may be writes in progress)"))
        found = leftovers(run)
        if not found:
            return printable(f"{run.path}: no leftovers of interrupted writes")
        removed = f"removed {describe(run, found)}"
        for path in found:
            path.unlink(missing_ok=True)
    return printable(removed)
