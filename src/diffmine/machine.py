"""What this machine offers a run: the CPUs the process may use, and whether bf16 is native.

Threads: torch's default intra-op thread count is the number of cores it sees, not the number
the process may use; in a container with a CPU quota, a CPU-pinned job or a data-parallel run of
several processes, that oversubscribes the cores (a training step measured 5-17 s with the
default threads on a busy 2-core machine, 0.56 s with one thread). :func:`set_threads` sizes it
from :func:`usable_cpus` (the affinity mask and the cgroup CPU quota), split between the
data-parallel processes of this machine.

Precision: ``auto`` resolves to bf16 autocast where the hardware computes bf16 natively (a GPU
that supports it; a CPU with the ``amx_bf16`` or ``avx512_bf16`` flag), else fp32: elsewhere bf16
is emulated and measured 8-16x slower (benchmarks/README.md has the numbers per machine).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import torch

CGROUP = Path("/sys/fs/cgroup")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cgroup_cpus(root: Path = CGROUP) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``),
    None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 or period <= 0 else quota / period
    return None


def usable_cpus(root: Path = CGROUP) -> int:
    """The CPUs this process may run on: its affinity mask, capped by the cgroup quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpus(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def local_processes() -> int:
    """Data-parallel processes sharing this machine (accelerate / torchrun set these)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1))


def set_threads(threads: int | None = None, world: int | None = None, root: Path = CGROUP) -> int:
    """Set torch's intra-op threads of this process and return them.

    ``threads``: the total for this machine (``--threads N``); None: the usable CPUs, unless
    OMP_NUM_THREADS is set (the user's or the launcher's choice is kept). Either way a
    data-parallel process gets its share, ``max(1, total // world)``.
    """
    world = local_processes() if world is None else max(1, world)
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    total = usable_cpus(root) if threads is None else threads
    if total < 1:
        raise ValueError(f"--threads must be >= 1, got {total}")
    n = max(1, total // world)
    torch.set_num_threads(n)
    return n


@lru_cache(maxsize=None)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where unknown."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 matmuls natively (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> ``bf16`` where native on ``device``, else ``fp32``; other values unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


__all__ = ["usable_cpus", "cgroup_cpus", "set_threads", "cpu_flags", "native_bf16", "resolve_precision", "PRECISIONS"]
