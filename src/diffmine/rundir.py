"""The run directory: one folder holds every step's settings and results.

    RUN/
      config.json              settings and seed of every step run so far (see README)
      images.parquet           the dataset listing: index, image_id, path, label
      problems.parquet         images skipped and why: image_id, path, step, problem
      model/                   backend.json + trainable.safetensors (the trained model)
        checkpoints/step-N/    resumable training state
      typicality/              maps at latent resolution, sharded
        shard-00000.safetensors    one (h, w) tensor per image, key = row in shard
        shard-00000.parquet        index: image_id, label, height, width, key, mean, status, problem
      mining/patches.parquet   top / least / random patches per label
      features/features.npy    DIFT feature per top patch (rows of mining/patches.parquet, kind=top)
      clusters/patches.parquet top patches with cluster, cluster_rank, rank_in_cluster
      localize/                typicality vs boxes / masks (`diffmine localize`): results.parquet (per image
                               and label), results.safetensors (maps computed under another label), summary.json
      report/index.html        the visual summary

Every Parquet file can be queried with DuckDB, e.g.
``SELECT label, avg(typicality) FROM 'RUN/clusters/patches.parquet' GROUP BY label``.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from .data import Dataset, Problem, write_table


class RunError(ValueError):
    """The run directory lacks what a step needs; the message says which step to run first."""


class Run:
    """A run directory. ``open_run(path)`` is the public door."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- layout ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def typicality_dir(self) -> Path:
        return self.path / "typicality"

    @property
    def patches_path(self) -> Path:
        return self.path / "mining" / "patches.parquet"

    @property
    def features_path(self) -> Path:
        return self.path / "features" / "features.npy"

    @property
    def clusters_path(self) -> Path:
        return self.path / "clusters" / "patches.parquet"

    @property
    def translations_dir(self) -> Path:
        return self.path / "translations"

    @property
    def report_path(self) -> Path:
        return self.path / "report" / "index.html"

    # -- config ---------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return json.loads(self.config_path.read_text()) if self.config_path.is_file() else {}

    def step_config(self, step: str) -> dict:
        if step not in self.config:
            raise RunError(f"{self.path}: step {step!r} has not been run yet")
        return self.config[step]

    def set_step_config(self, step: str, settings: dict) -> None:
        config = self.config
        config[step] = settings
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_name("config.json.tmp")
        tmp.write_text(json.dumps(config, indent=2, default=str))
        tmp.replace(self.config_path)

    # -- dataset --------------------------------------------------------------------------
    def save_dataset(self, dataset: Dataset) -> None:
        write_table(dataset.table(), self.path / "images.parquet")
        self.record_problems("listing", dataset.problems)

    def images(self) -> pd.DataFrame:
        path = self.path / "images.parquet"
        if not path.is_file():
            raise RunError(f"{self.path}: no dataset listed here; run `diffmine train --data DIR --run {self.path}` first")
        return pd.read_parquet(path)

    @property
    def labels(self) -> list[str]:
        return self.step_config("dataset")["labels"]

    def prompt(self, label: str | None) -> str:
        """The exact prompt string for ``label`` (None: the null prompt), as trained."""
        prompts = self.step_config("dataset")
        return prompts["null_prompt"] if label is None else prompts["prompt"].format(label=label)

    # -- problems -------------------------------------------------------------------------
    def record_problems(self, step: str, problems: list[Problem]) -> None:
        """Append skipped images to problems.parquet (replacing earlier records of this step)."""
        path = self.path / "problems.parquet"
        old = pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=["image_id", "path", "step", "problem"])
        old = old[old["step"] != step]
        new = pd.DataFrame([{"image_id": p.image_id, "path": p.path, "step": step, "problem": p.problem} for p in problems],
                           columns=["image_id", "path", "step", "problem"])
        write_table(pa.Table.from_pandas(pd.concat([old, new], ignore_index=True), preserve_index=False), path)

    def problems(self) -> pd.DataFrame:
        """Every image skipped so far, with the step and the problem."""
        path = self.path / "problems.parquet"
        frames = [pd.read_parquet(path)] if path.is_file() else []
        index = self.typicality_index(missing_ok=True)
        if index is not None and len(index):
            bad = index[index["status"] != "ok"]
            frames.append(pd.DataFrame({"image_id": bad["image_id"], "path": bad["path"], "step": "typicality", "problem": bad["problem"]}))
        if not frames:
            return pd.DataFrame(columns=["image_id", "path", "step", "problem"])
        return pd.concat(frames, ignore_index=True).drop_duplicates(["image_id", "problem"])

    # -- typicality -----------------------------------------------------------------------
    def typicality_shards(self) -> list[Path]:
        return sorted(self.typicality_dir.glob("shard-*.parquet"))

    def typicality_index(self, missing_ok: bool = False) -> pd.DataFrame | None:
        from .shards import read_index

        index = read_index(self.typicality_dir)
        if index is None and not missing_ok:
            raise RunError(f"{self.path}: no typicality yet; run `diffmine typicality --run {self.path}`")
        return index

    @cached_property
    def _typicality_lookup(self) -> dict[str, tuple[str, str, int, int]]:
        index = self.typicality_index()
        ok = index[index["status"] == "ok"]
        return {r.image_id: (r.shard, r.key, r.height, r.width) for r in ok.itertuples()}

    def latent_typicality_map(self, image_id: str) -> np.ndarray:
        """(h, w) float32 typicality on the latent grid, as stored."""
        from .shards import read_array

        try:
            shard, key, _, _ = self._typicality_lookup[image_id]
        except KeyError:
            raise KeyError(f"no typicality map for {image_id!r} in {self.path} (unknown image, or skipped as bad)") from None
        return read_array(self.typicality_dir, shard, key).astype(np.float32)

    def typicality_map(self, image_id: str) -> np.ndarray:
        """(H, W) float32 typicality at the image's resolution after the run's resize.

        Positive where the label explains the pixel better than the null prompt does.
        """
        from .typicality import upsample

        _, _, height, width = self._typicality_lookup.get(image_id, (None, None, 0, 0))
        return upsample(self.latent_typicality_map(image_id), (height, width))

    # -- mining and clusters --------------------------------------------------------------
    def patches(self, kind: str = "top") -> pd.DataFrame:
        """Mined patches: image_id, label, x0, y0, x1, y1 (pixels, x1/y1 exclusive), typicality,
        and, once clustered, cluster, cluster_rank (0 = most typical cluster of its label) and
        rank_in_cluster (0 = nearest to the centroid). ``kind``: top, least or random."""
        if kind == "top" and self.clusters_path.is_file():
            return pd.read_parquet(self.clusters_path)
        return self.mined_patches(kind)

    def mined_patches(self, kind: str = "top") -> pd.DataFrame:
        """The mining step's table of one kind, most typical first (least: least typical first)."""
        if not self.patches_path.is_file():
            raise RunError(f"{self.path}: no mined patches yet; run `diffmine mine --run {self.path}`")
        table = pd.read_parquet(self.patches_path)
        return table[table["kind"] == kind].reset_index(drop=True)


    # -- translations ---------------------------------------------------------------------
    def translations_index(self) -> pd.DataFrame:
        """Every translation made so far: image_id, source_label, target_label, key, status, shard."""
        from .shards import read_index

        index = read_index(self.translations_dir)
        if index is None:
            raise RunError(f"{self.path}: no translations yet; run `diffmine translate --run {self.path}`")
        return index

    @cached_property
    def _translation_lookup(self) -> dict[tuple[str, str], tuple[str, str]]:
        index = self.translations_index()
        ok = index[index["status"] == "ok"]
        return {(r.image_id, r.target_label): (r.shard, r.key) for r in ok.itertuples()}

    def translation(self, image_id: str, label: str) -> np.ndarray:
        """(H, W, 3) uint8: image ``image_id`` translated to ``label``.

        Raises KeyError when that translation was not made.
        """
        from .shards import read_array

        try:
            shard, key = self._translation_lookup[(image_id, label)]
        except KeyError:
            raise KeyError(f"no translation of {image_id!r} to {label!r} in {self.path}") from None
        return read_array(self.translations_dir, shard, key)


def open_run(path: str | Path) -> Run:
    """Open a run directory written by diffmine."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory")
    return Run(path)
