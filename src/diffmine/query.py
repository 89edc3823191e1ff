"""SQL over a run's Parquet tables with DuckDB."""

from __future__ import annotations

import pandas as pd


def tables(run) -> dict[str, str]:
    """View name -> Parquet file (or glob) of the tables this run has so far."""
    candidates = {
        "images": run.path / "images.parquet",
        "problems": run.path / "problems.parquet",
        "mined": run.patches_path,
        "patches": run.clusters_path if run.clusters_path.is_file() else run.patches_path,
    }
    found = {name: str(path) for name, path in candidates.items() if path.is_file()}
    if run.typicality_shards():
        found["typicality"] = str(run.typicality_dir / "shard-*.parquet")
    return found


def query(run, sql: str) -> pd.DataFrame:
    """Run ``sql`` with the run's tables as views (images, problems, mined, patches, typicality)."""
    import duckdb

    con = duckdb.connect()
    for name, path in tables(run).items():
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{path}')")
    return con.execute(sql).df()
