"""The visual summary of a run: one self-contained HTML page (Jinja2, images inlined).

Per label: its top clusters as rows of patch crops (nearest to the centroid first), typicality
heat-map overlays of example images, and the most / least typical and random patches side by
side (the paper's Fig. 2); then the settings of every step. Label names are escaped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from .atomic import write_text
from .images import RunImages, overlay, png_data_uri
from .localize import report_section


@dataclass
class ReportConfig:
    clusters: int = 8  # rows per label
    per_cluster: int = 8  # crops per row
    min_cluster_size: int = 2  # smaller clusters are not shown (the paper skips < 6 of 1000)
    examples: int = 4  # heat-map overlays per label
    compare: int = 12  # crops per row of the top / least / random comparison
    crop_px: int = 72  # display size of a crop


def _crops(images: RunImages, frame: pd.DataFrame, size: int) -> list[dict]:
    out = []
    for row in frame.itertuples():
        uri = images.crop(row, size)
        if uri is not None:
            out.append({"src": uri, "title": f"{row.image_id} ({row.x0},{row.y0})-({row.x1},{row.y1}) T={row.typicality:.4g}"})
    return out


def _cluster_rows(images: RunImages, clustered: pd.DataFrame, config: ReportConfig) -> list[dict]:
    """Rows of crops, best-ranked cluster first, members nearest the centre first."""
    rows = []
    for rank, group in clustered.groupby("cluster_rank", sort=True):
        if len(group) < config.min_cluster_size:
            continue
        first = group.iloc[0]
        coverage = (f"in {int(first['images'])} images of the label ({first['coverage']:.0%}), "
                    f"{int(first['images_other'])} of others ({first['coverage_other']:.0%})") if "coverage" in group else ""
        rows.append({"rank": int(rank), "size": len(group), "median": float(group["typicality"].median()),
                     "coverage": coverage,
                     "crops": _crops(images, group.sort_values("rank_in_cluster").head(config.per_cluster), config.crop_px)})
        if len(rows) >= config.clusters:
            break
    return rows


def _member(images: RunImages, run, image_id: str, source_label: str, label: str) -> np.ndarray | None:
    """One member of a translated scene: the source image for its own label, else its translation
    (each read once: a scene shows up in several rows)."""
    if label == source_label:
        return images.get(image_id)
    key = f"{image_id}->{label}"
    if key not in images.cache:
        try:
            images.cache[key] = run.translation(image_id, label)
        except KeyError:
            images.cache[key] = None
    return images.cache[key]


def cotypicality_section(run, images: RunImages, config: ReportConfig, with_clusters: bool = True) -> dict | None:
    """Translations (each source beside its versions under every label) and co-typical clusters
    (rows of sequences: the same box in every member, the source's crop outlined)."""
    if not run.translations_dir.is_dir() or not any(run.translations_dir.glob("shard-*.parquet")):
        return None
    index = run.translations_index()
    ok = index[index["status"] == "ok"]
    labels = sorted(set(ok["target_label"]) | set(ok["source_label"]))
    translations = []
    for source_label, group in ok.groupby("source_label", sort=True):
        for image_id in group["image_id"].drop_duplicates().head(config.examples):
            cells = []
            for label in labels:
                member = _member(images, run, image_id, source_label, label)
                cells.append({"label": label, "source": label == source_label,
                              "src": png_data_uri(member) if member is not None else None})
            translations.append({"image_id": image_id, "source_label": source_label, "cells": cells})
    clusters = []
    path = run.path / "cotypicality" / "sequences.parquet"
    sequences = pd.read_parquet(path) if path.is_file() and with_clusters else None
    if sequences is not None:
        for rank, group in sequences.groupby("cluster_rank", sort=True):
            if len(group) < config.min_cluster_size:
                continue
            rows = []
            for r in group.sort_values("rank_in_cluster").head(config.per_cluster).itertuples():
                crops = []
                for label in labels:
                    member = _member(images, run, r.image_id, r.source_label, label)
                    if member is None:
                        continue
                    crop = Image.fromarray(member[r.y0:r.y1, r.x0:r.x1]).resize((config.crop_px, config.crop_px),
                                                                              Image.Resampling.NEAREST)
                    crops.append({"src": png_data_uri(np.asarray(crop)), "source": label == r.source_label,
                                  "title": f"{r.image_id} as {label}: T={getattr(r, 'typicality_' + label, float('nan')):.4g}"})
                rows.append({"image_id": r.image_id, "cotypicality": float(r.cotypicality), "crops": crops})
            clusters.append({"rank": int(rank), "size": len(group), "median": float(group["cotypicality"].median()),
                             "sequences": rows})
            if len(clusters) >= config.clusters:
                break
    return {"labels": labels, "translations": translations, "clusters": clusters,
            "method": run.config.get("translate", {}).get("method", "")}


def build_context(run, config: ReportConfig, evaluation: dict | None = None, fresh: set[str] = frozenset()) -> dict:
    """What the template shows; only results named in ``fresh`` (up to date) are read."""
    images = RunImages(run)
    run.fresh("mine")
    mined = pd.read_parquet(run.patches_path)
    clustered = pd.read_parquet(run.clusters_path) if "cluster" in fresh else None
    index = run.typicality_index()
    baselines = {path.parent.name: pd.read_parquet(path) for path in sorted(run.path.glob("baselines/*/patches.parquet"))
                 if f"baseline-{path.parent.name}" in fresh}
    labels = []
    for label in run.labels:
        entry = {"name": label, "prompt": run.prompt(label), "clusters": [], "examples": [], "compare": []}
        if clustered is not None:
            entry["clusters"] = _cluster_rows(images, clustered[clustered["label"] == label], config)
        entry["baselines"] = [{"name": name, "clusters": _cluster_rows(images, table[table["label"] == label], config)}
                              for name, table in baselines.items()]
        top_images = mined[(mined["label"] == label) & (mined["kind"] == "top")]["image_id"].drop_duplicates()
        for image_id in top_images.head(config.examples):
            values = run.typicality_map(image_id)
            image = images.get(image_id, values.shape)
            if image is None:
                continue
            entry["examples"].append({"image_id": image_id, "image": png_data_uri(image),
                                      "overlay": png_data_uri(overlay(image, values))})
        for kind, title in (("top", "most typical"), ("least", "least typical"), ("random", "random")):
            frame = mined[(mined["label"] == label) & (mined["kind"] == kind)]
            entry["compare"].append({"kind": kind, "title": title, "crops": _crops(images, frame.head(config.compare), config.crop_px)})
        rows = index[(index["label"] == label) & (index["status"] == "ok")]
        entry["images"] = len(rows)
        entry["mean_typicality"] = float(rows["mean"].mean()) if len(rows) else float("nan")
        labels.append(entry)
    problems = run.problems()

    return {
        "title": f"diffmine report: {run.path.name}",
        "labels": labels,
        "settings": json.dumps(run.lineage.records(), indent=2, default=str),
        "problems": problems.head(200).to_dict("records"),
        "problem_count": len(problems),
        "evaluation": json.dumps(evaluation, indent=2) if evaluation else None,
        "localization": report_section(run, images, config.examples) if "localize" in fresh else None,
        "cotypicality": cotypicality_section(run, images, config, "cotypicality" in fresh) if "translate" in fresh else None,
        "crop_px": config.crop_px,
    }


def render(context: dict) -> str:
    env = Environment(loader=PackageLoader("diffmine", "templates"), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").render(**context)


def write_report(run, config: ReportConfig = ReportConfig(), evaluation: dict | None = None,
                 fresh: set[str] | None = None) -> Path:
    """Render the report of the results named in ``fresh`` (default: every result that is up to date)."""
    if fresh is None:
        fresh = {name for name in run.lineage.records() if not run.stale(name)}
    return write_text(run.report_path, render(build_context(run, config, evaluation, fresh)))
