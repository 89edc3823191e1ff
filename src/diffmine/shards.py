"""Sharded results: the storage unit of every per-image step (typicality, translations).

A shard is a pair of files written atomically, arrays first, index last:

    NAME.safetensors   one array per key (any shape and dtype)
    NAME.parquet       one row per item, with the ``key`` of its array ("" for a skipped item)
                       and a ``status`` ("ok" or "bad")

The index's presence marks the shard complete; a shard whose index is missing or unreadable, or
lists a key its arrays file lacks (a write killed half-way), is redone by the next run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from .data import write_table


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_count(items: int, shard_size: int) -> int:
    return math.ceil(items / shard_size)


def missing_shards(directory: Path, items: int, shard_size: int, process_index: int = 0,
                   num_processes: int = 1) -> list[tuple[str, slice]]:
    """The shards still to compute, as (name, rows of the item list), of this process's share:
    shards are dealt round-robin to processes, each computed whole by one of them."""
    return [(shard_name(s), slice(s * shard_size, min((s + 1) * shard_size, items)))
            for s in range(process_index, shard_count(items, shard_size), num_processes)
            if not shard_is_complete(directory, shard_name(s))]


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

    directory.mkdir(parents=True, exist_ok=True)
    if arrays:
        tmp = directory / f"{name}.safetensors.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        tmp.replace(directory / f"{name}.safetensors")
    write_table(pa.Table.from_pylist(rows, schema=schema), directory / f"{name}.parquet")


def read_index(directory: Path) -> pd.DataFrame | None:
    """Every complete shard's index rows, with a ``shard`` column naming their shard (None: no shard)."""
    shards = sorted(directory.glob("shard-*.parquet"))
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


def reset_if_settings_changed(directory: Path, settings: dict) -> None:
    """Remove the shards of earlier settings (another model, other draws): they belong to another result."""
    stamp = directory / "settings.json"
    wanted = json.loads(json.dumps(settings, default=str))
    if stamp.is_file() and json.loads(stamp.read_text()) != wanted:
        for old in directory.glob("shard-*"):
            old.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(wanted, indent=2))
