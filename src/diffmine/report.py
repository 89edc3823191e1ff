"""The visual summary of a run: one self-contained HTML page (Jinja2, images inlined).

Per label: its top clusters as rows of patch crops (nearest to the centroid first), typicality
heat-map overlays of example images, and the most / least typical and random patches side by
side (the paper's Fig. 2); then the settings of every step. Label names are escaped.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from .data import BadImage, load_image


@dataclass
class ReportConfig:
    clusters: int = 8  # rows per label
    per_cluster: int = 8  # crops per row
    min_cluster_size: int = 2  # smaller clusters are not shown (the paper skips < 6 of 1000)
    examples: int = 4  # heat-map overlays per label
    compare: int = 12  # crops per row of the top / least / random comparison
    crop_px: int = 72  # display size of a crop


def png_data_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def heat_colours(values: np.ndarray) -> np.ndarray:
    """(H, W) typicality -> (H, W, 3) uint8: red where positive, blue where negative, by the
    image's largest absolute value (robust: 99th percentile)."""
    scale = max(float(np.percentile(np.abs(values), 99)), 1e-12)
    v = np.clip(values / scale, -1, 1)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([255 * pos + 40 * (1 - pos - neg), 60 * pos * (1 - pos) + 40 * (1 - pos - neg), 255 * neg + 40 * (1 - pos - neg)], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    heat = heat_colours(values).astype(np.float32)
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)


class RunImages:
    """A run's images at its own size (the run's resolution and resize), each decoded once."""

    def __init__(self, run):
        dataset = run.step_config("dataset")
        images = run.images()
        self.paths = dict(zip(images["image_id"], images["path"]))
        self.resolution, self.resize = dataset["resolution"], dataset["resize"]
        self.cache: dict[str, np.ndarray | None] = {}

    def get(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray | None:
        """(H, W, 3) uint8, resized to ``size`` = (H, W) if given; None for a bad or unknown image."""
        key = f"{image_id}@{size}"
        if key not in self.cache:
            try:
                image = load_image(self.paths[image_id], self.resolution, self.resize, 1)
            except (BadImage, KeyError):
                image = None
            if image is not None and size is not None and image.shape[:2] != tuple(size):
                image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC))
            self.cache[key] = image
        return self.cache[key]

    def crop(self, row, size: int) -> str | None:
        image = self.get(row.image_id)
        if image is None:
            return None
        crop = image[row.y0:row.y1, row.x0:row.x1]
        return png_data_uri(np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.NEAREST)))


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
        rows.append({"rank": int(rank), "size": len(group), "median": float(group["typicality"].median()),
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


def cotypicality_section(run, images: RunImages, config: ReportConfig) -> dict | None:
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
    sequences = pd.read_parquet(path) if path.is_file() else None
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


def build_context(run, config: ReportConfig, evaluation: dict | None = None) -> dict:
    images = RunImages(run)
    mined = pd.read_parquet(run.patches_path)
    clustered = pd.read_parquet(run.clusters_path) if run.clusters_path.is_file() else None
    index = run.typicality_index()
    baselines = {path.parent.name: pd.read_parquet(path) for path in sorted(run.path.glob("baselines/*/patches.parquet"))}
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
    from .localize import report_section  # here, not at the top: localize imports this module's helpers

    return {
        "title": f"diffmine report: {run.path.name}",
        "labels": labels,
        "settings": json.dumps(run.config, indent=2, default=str),
        "problems": problems.head(200).to_dict("records"),
        "problem_count": len(problems),
        "evaluation": json.dumps(evaluation, indent=2) if evaluation else None,
        "localization": report_section(run, images, config.examples),
        "cotypicality": cotypicality_section(run, images, config),
        "crop_px": config.crop_px,
    }


def render(context: dict) -> str:
    env = Environment(loader=PackageLoader("diffmine", "templates"), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").render(**context)


def write_report(run, config: ReportConfig = ReportConfig(), evaluation: dict | None = None) -> Path:
    html = render(build_context(run, config, evaluation))
    path = run.report_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("index.html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
