"""Sharded results: the storage unit of every per-image step (typicality, translations).

A shard is a pair of files written atomically, arrays first, index last:

    NAME.safetensors   one array per key (any shape and dtype)
    NAME.parquet       one row per item, with the ``key`` of its array ("" for a skipped item)
                       and a ``status`` ("ok", "bad", or "unreachable": retried by the next run)

The index's presence marks the shard complete; a shard whose index is missing or unreadable, or
lists a key its arrays file lacks (a write killed half-way), is redone by the next run.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write, write_table


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_count(items: int, shard_size: int) -> int:
    return math.ceil(items / shard_size)


def positional_shards(items: int, shard_size: int) -> list[tuple[str, slice]]:
    """Every shard of an item list cut in order, as (name, rows of the item list): shard s holds
    rows s * shard_size onwards."""
    return [(shard_name(s), slice(s * shard_size, min((s + 1) * shard_size, items)))
            for s in range(shard_count(items, shard_size))]


def missing_shards(directory: Path, items: int, shard_size: int, process_index: int = 0,
                   num_processes: int = 1) -> list[tuple[str, slice]]:
    """The shards still to compute, as (name, rows of the item list), of this process's share:
    shards are dealt round-robin to processes, each computed whole by one of them."""
    return [(name, rows) for name, rows in positional_shards(items, shard_size)[process_index::num_processes]
            if not shard_is_complete(directory, name)]


def plan_new_shards(directory: Path, items: int, shard_size: int) -> list[tuple[str, slice]]:
    """Shards for ``items`` new items, as (name, rows of the item list), under the lowest numbers
    no complete shard holds (the complete ones stay: they hold the results of other items), so a
    killed run's missing shards get their names back."""
    taken = {int(p.stem.split("-")[1]) for p in directory.glob("shard-*.parquet") if shard_is_complete(directory, p.stem)}
    free = (n for n in range(len(taken) + shard_count(items, shard_size) + 1) if n not in taken)
    return [(shard_name(next(free)), slice(s * shard_size, min((s + 1) * shard_size, items)))
            for s in range(shard_count(items, shard_size))]


def shard_is_complete(directory: Path, name: str) -> bool:
    """A shard counts only when its index parses and its arrays file holds every key it lists."""
    from safetensors import safe_open

    index, arrays = directory / f"{name}.parquet", directory / f"{name}.safetensors"
    try:
        table = pd.read_parquet(index)
        keys = set(table.loc[table["status"] == "ok", "key"])
        if not keys:
            return True
        with safe_open(str(arrays), "np") as f:
            return keys <= set(f.keys())
    except Exception:  # missing or truncated files: redo the shard
        return False


def write_shard(directory: Path, name: str, arrays: dict[str, np.ndarray], rows: list[dict], schema: pa.Schema) -> None:
    """Write one shard: the arrays, then the index that marks it complete."""
    from safetensors.numpy import save_file

    if arrays:
        atomic_write(directory / f"{name}.safetensors",
                     lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp)))
    write_table(pa.Table.from_pylist(rows, schema=schema), directory / f"{name}.parquet")


def read_shard(directory: Path, name: str, keep: Callable[[dict], bool]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The index rows of shard ``name`` that ``keep`` keeps, and the arrays of those among them that
    are ok, as stored (read with safetensors: nothing is unpickled): what a rewrite of the shard
    that replaces its other rows carries over."""
    from safetensors import safe_open

    rows = [row for row in pq.read_table(directory / f"{name}.parquet").to_pylist() if keep(row)]
    keys = [row["key"] for row in rows if row["status"] == "ok"]
    if not keys:
        return {}, rows
    with safe_open(str(directory / f"{name}.safetensors"), "np") as f:
        return {key: f.get_tensor(key) for key in keys}, rows


def read_index(directory: Path) -> pd.DataFrame | None:
    """Every complete shard's index rows, with a ``shard`` column naming their shard (None: no
    shard). A shard whose arrays file lacks a key its index lists (a write killed half-way) is left
    out, as if it were missing: the next run redoes it."""
    shards = [s for s in sorted(directory.glob("shard-*.parquet")) if shard_is_complete(directory, s.stem)]
    if not shards:
        return None
    return pd.concat([pd.read_parquet(s).assign(shard=s.stem) for s in shards], ignore_index=True)


def read_array(directory: Path, shard: str, key: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(directory / f"{shard}.safetensors"), "np") as f:
        return f.get_tensor(key)


def result_settings(config, execution: tuple[str, ...] = ("batch_size", "workers", "compile")) -> dict:
    """A step's settings (a dataclass) less those that only say how the work is executed: a resume
    may change the batch size, the decoding workers or compilation and keep the shards already written."""
    return {k: v for k, v in asdict(config).items() if k not in execution}

