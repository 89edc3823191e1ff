"""Sharded results: the storage unit of every per-image step (typicality, translations, co-typicality).

A shard is a pair of files written atomically, arrays first, index last:

    NAME.safetensors   one array per key (any shape and dtype)
    NAME.parquet       one row per item, with the ``key`` of its array (none for a skipped item)
                       and a ``status`` ("ok", "bad", or "unreachable": retried by the next run)

The index's presence marks the shard complete; a shard whose index is missing or unreadable, or
lists a key its arrays file lacks (a write killed half-way), is redone by the next run.

Translations and co-typicality cut their items into shards by position (:func:`positional_shards`)
and retry an image left out with a problem that may be fixed in its own shard
(:func:`images_to_retry`, :func:`retry_in_shard`): its rows replace the bad ones, the others are
kept as stored.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write, write_table
from .data import problem_may_be_fixed


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


def images_to_retry(directory: Path) -> dict[str, set[str]]:
    """Per complete shard, the images whose rows are bad with a problem that may be fixed since
    (``data.problem_may_be_fixed``: a file changed since listing and put back, an unreadable one mounted)."""
    index = read_index(directory)
    if index is None:
        return {}
    bad = index[index["status"] == "bad"]
    bad = bad[bad["problem"].map(problem_may_be_fixed).astype(bool)]
    return {shard: set(rows["image_id"]) for shard, rows in bad.groupby("shard")}


def retry_in_shard(directory: Path, name: str, images: pd.DataFrame, retried: set[str],
                   compute: Callable[[pd.DataFrame], tuple[dict[str, np.ndarray], list[dict]]], schema: pa.Schema,
                   order: Callable[[dict], object]) -> bool:
    """Compute again the ``retried`` images of shard ``name`` (``images``: the shard's items, indexed
    by their place in it) with ``compute(frame) -> (arrays, rows)``, which keys their arrays as a
    whole shard's computation does; where what their rows say changed, rewrite the shard with their
    new rows in place of the old ones, rows sorted by ``order``. The other rows and their arrays are
    kept as stored, never recomputed. Returns whether the shard was rewritten.

    Both files are replaced atomically, arrays first: a write killed between them leaves the old
    index, whose keys the new arrays file still holds (the shard stays complete, its bad rows are
    retried again)."""
    arrays, rows = compute(images[images["image_id"].isin(retried)])
    kept_arrays, kept_rows = read_shard(directory, name, keep=lambda row: row["image_id"] not in retried)
    _, old_rows = read_shard(directory, name, keep=lambda row: row["image_id"] in retried)
    if outcomes(old_rows) == outcomes(rows):
        return False  # still unreadable, for the same reason: nothing to rewrite
    write_shard(directory, name, {**kept_arrays, **arrays}, sorted(kept_rows + rows, key=order), schema)
    return True


def outcomes(rows: list[dict]) -> Counter:
    """What index rows say was made of each item, less where its source was read from (``path``: a
    run listed from another folder since reads the same images under other paths)."""
    return Counter(tuple(sorted((k, v) for k, v in row.items() if k != "path")) for row in rows)


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

