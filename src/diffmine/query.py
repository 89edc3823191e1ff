"""SQL over a run's Parquet tables with DuckDB.

The SQL runs in a sandbox: the run's tables are handed to DuckDB as Arrow datasets (read by
pyarrow, lazily), then DuckDB's file system access is switched off (``enable_external_access =
false``: no ``read_csv('/etc/passwd')``, ``COPY ... TO``, ``ATTACH``, ``INSTALL`` or ``LOAD``) and
the configuration is locked (``lock_configuration = true``), so the SQL cannot switch it back on.
``allowed_paths`` would not do: it lets ``COPY ... TO`` overwrite the very files it allows.
"""

from __future__ import annotations

import pandas as pd

from .terminal import shell_word


class QueryError(ValueError):
    """The SQL failed (syntax, unknown table or column, or refused by the sandbox)."""


def tables(run) -> dict[str, list[str] | pd.DataFrame]:
    """Table name -> its Parquet files (or, for typicality, the index of the listed images) for
    the results of this run that are up to date: a stale result is not served (``status`` says
    which step to re-run)."""
    found: dict[str, list[str] | pd.DataFrame] = {}
    if run.images_path.is_file():
        found["images"] = [str(run.images_path)]
    # the listing's and training's file, and the images typicality could not read (empty: none)
    found["problems"] = run.problems()
    if run.lineage.get("typicality") is not None and not [r for r, _ in run.stale("typicality")
                                                          if "listing" not in r and "incomplete" not in r]:
        index = run.typicality_index(missing_ok=True)
        if index is not None:
            found["typicality"] = index
    mined_fresh = run.lineage.get("mine") is not None and not run.stale("mine")
    if mined_fresh:
        found["mined"] = [str(run.patches_path)]
    if run.lineage.get("cluster") is not None:
        if not run.stale("cluster"):
            found["patches"] = [str(run.clusters_path)]
    elif mined_fresh:
        found["patches"] = [str(run.patches_path)]
    return found


def query(run, sql: str) -> pd.DataFrame:
    """Run ``sql`` with the run's tables as views (images, problems, mined, patches, typicality).

    Raises:
        QueryError: the SQL failed; the message is DuckDB's first line.
    """
    import duckdb
    import pyarrow.dataset as ds

    con = duckdb.connect()
    try:
        for name, source in tables(run).items():
            # files as listed, never a glob: a run path may hold glob characters ("run[2]")
            con.register(name, source if isinstance(source, pd.DataFrame) else ds.dataset(source, format="parquet"))
        # no lookups of Python variables by name either: the views above are all the SQL sees
        con.execute("SET python_enable_replacements = false")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            # DuckDB's parser, not a split on ';' (a ';' may stand in a string literal)
            statements = con.extract_statements(sql)
            if not statements:  # an empty string, or comments only
                raise QueryError(f"query: no SQL statement in {sql!r}; give one, e.g. \"SELECT count(*) FROM images\"")
            if len(statements) > 1:  # DuckDB would run them all and return the last one's result only
                raise QueryError(f"query: {len(statements)} SQL statements given; query runs one and prints its "
                                 "result: give each its own `diffmine query`, or make them one (WITH ..., UNION ALL)")
            return con.execute(statements[0]).df()
        except duckdb.Error as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise QueryError(f"query: {first}{_why_absent(run, first)}") from None
    finally:
        con.close()


# the step whose result each table is, for saying why a table is absent
TABLE_STEPS = {"typicality": "typicality", "mined": "mine", "patches": "cluster"}


def _why_absent(run, message: str) -> str:
    """For DuckDB's "Table with name X does not exist": why the run serves no table X."""
    for table, step in TABLE_STEPS.items():
        if f"Table with name {table} does not exist" in message:
            reasons = run.stale(step)
            if reasons:
                reason, command = reasons[0]
                return f" (the {table} table is not served: {reason}; re-run `diffmine {command} --run {shell_word(run.path)}`)"
    return ""

