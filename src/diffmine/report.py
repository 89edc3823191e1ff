"""The visual summary of a run: a static site in RUN/report/ (Jinja2 pages, PNG files beside them).

    index.html            labels, cluster counts, model quality (loss curve, classify accuracy),
                          evaluation, links to everything else
    label-N.html          one label: its ranked clusters (size, image coverage, median typicality;
                          sortable), the baselines' clusters, typicality maps, the paper's Fig. 2
                          (most / least typical and random patches)
    cluster-N-R.html      one cluster: its members (capped), each with its typicality and source image
    image-KEY.html        one image: the image, its typicality map on the run's shared colour scale
                          with a colour bar, the overlay with the mined boxes drawn, its patches
    localization.html, cotypicality.html, problems.html, settings.html (the lineage records)
    assets/               PNG crops, thumbnails and maps (named by content hash), the legend

It opens from ``file://`` or any static server: no script is needed but the table sorter. Only
what is shown is written (clusters of a label, ``members`` per cluster page, views of the images
whose crops are shown), so the size is bounded whatever the number of images. Every file is
written atomically and only when its bytes change; files of an earlier render that this one does
not write are removed. Labels, paths and prompts are escaped (Jinja2 autoescape).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from .adaptive import draws_summary
from .atomic import write_bytes
from .images import RunImages, colorbar, draw_boxes, figure_png, heat_colours, map_scale, overlay, png_bytes
from .localize import report_section
from .pages import report_links
from .lineage import unlinked

HELP = {
    "clusters": "clusters shown per label (0: all)", "per_cluster": "crops per cluster row on a label page",
    "members": "members shown on a cluster page (most central first)",
    "min_cluster_size": "smaller clusters are not shown", "examples": "typicality maps per label on its page",
    "compare": "crops per row of the most / least typical / random comparison", "crop_px": "display size of a crop",
    "context": "context shown around a patch, as a fraction of its side", "view_px": "display size of an image view",
}


@dataclass
class ReportConfig:
    clusters: int = 0  # clusters per label (0: all); k bounds them
    per_cluster: int = 8  # crops per cluster row on a label page
    members: int = 200  # members on a cluster page
    min_cluster_size: int = 2  # smaller clusters are not shown (the paper skips < 6 of 1000)
    examples: int = 4  # heat-map overlays per label
    compare: int = 12  # crops per row of the top / least / random comparison
    crop_px: int = 72  # display size of a crop
    context: float = 0.5  # context around a crop, fraction of the patch side
    view_px: int = 256  # display size of an image view

    def __post_init__(self):
        if min(self.clusters, self.examples, self.compare) < 0 or min(self.per_cluster, self.members) < 1:
            raise ValueError("clusters, examples and compare must be >= 0, per_cluster and members >= 1")
        if self.crop_px < 8 or self.view_px < 8 or not 0.0 <= self.context < math.inf:
            raise ValueError(f"crop_px and view_px must be >= 8, context >= 0; got {self.crop_px}, {self.view_px}, {self.context}")


def image_key(image_id: str) -> str:
    """A file-name-safe, stable name for an image id (which may hold slashes or anything)."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()[:16]


class Site:
    """The files of RUN/report/, each written atomically and only when its bytes changed."""

    def __init__(self, root: Path):
        self.root = root
        self.written: set[str] = set()

    def put(self, relative: str, data: bytes) -> str:
        path = self.root / relative
        unlinked(self.root, path.parent)  # a received site's assets/ may be a link out of the run
        if not (path.is_file() and path.read_bytes() == data):
            write_bytes(path, data)
        self.written.add(relative)
        return relative

    def png(self, array: np.ndarray) -> str:
        """An asset named by its content: the same crop is one file, an unchanged one is not rewritten."""
        data = png_bytes(np.ascontiguousarray(array))
        return self.put(f"assets/{hashlib.sha1(data).hexdigest()[:20]}.png", data)

    def keep_pages(self, links: list[dict]) -> list[dict]:
        """Pages that other steps write into the site (contrast, trends: ``pages.py``), with the
        folder of images beside each, are not this render's left-overs; returns ``links``."""
        for link in links:
            page = self.root / link["href"]
            kept = [page] + (sorted(p for p in page.with_suffix("").rglob("*") if p.is_file())
                             if page.with_suffix("").is_dir() else [])
            self.written.update(str(p.relative_to(self.root)) for p in kept)
        return links

    def finish(self) -> None:
        """Remove the files an earlier render wrote that this one did not (and emptied folders)."""
        for directory, _, names in os.walk(self.root, topdown=False):
            for name in names:
                path = Path(directory) / name
                if str(path.relative_to(self.root)) not in self.written:
                    path.unlink()
            if Path(directory) != self.root and not any(Path(directory).iterdir()):
                Path(directory).rmdir()


def _fit(array: np.ndarray, side: int) -> np.ndarray:
    """Shrunk to at most ``side`` pixels on its long side (never enlarged: CSS scales it up)."""
    h, w = array.shape[:2]
    if max(h, w) <= side:
        return array
    f = side / max(h, w)
    return np.asarray(Image.fromarray(array).resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS))


class Pages:
    """Collects what the pages show; image views are made for every image a shown crop links to."""

    def __init__(self, run, site: Site, config: ReportConfig):
        self.run, self.site, self.config = run, site, config
        self.images = RunImages(run)
        self.viewed: dict[str, str] = {}  # image_id -> its label, for every image a crop links to

    def crop(self, row, kind: str = "patch") -> dict | None:
        array = self.images.crop_array(row, self.config.crop_px, self.config.context)
        if array is None:
            return None
        self.viewed.setdefault(row.image_id, row.label)
        return {"src": self.site.png(array), "href": f"image-{image_key(row.image_id)}.html", "image_id": row.image_id,
                "typicality": float(getattr(row, "typicality", float("nan"))),
                "title": f"{row.image_id} ({row.x0},{row.y0})-({row.x1},{row.y1}) {kind} {getattr(row, 'typicality', 0):.4g}"}

    def thumb(self, image_id: str, side: int) -> str | None:
        image = self.images.get(image_id)
        return None if image is None else self.site.png(_fit(image, side))


def cluster_table(clustered: pd.DataFrame, config: ReportConfig) -> list[tuple[int, pd.DataFrame]]:
    """The shown clusters of one label, best-ranked first: (rank, members nearest the centre first)."""
    out = []
    for rank, group in clustered.groupby("cluster_rank", sort=True):
        if len(group) >= config.min_cluster_size:
            out.append((int(rank), group.sort_values("rank_in_cluster")))
    return out[:config.clusters] if config.clusters > 0 else out


def _cluster_rows(pages: Pages, clustered: pd.DataFrame, label_index: int | None, kind: str = "T") -> list[dict]:
    rows = []
    for rank, group in cluster_table(clustered, pages.config):
        first = group.iloc[0]  # the cluster step's per-cluster columns (coverage in and out of the label)
        caption = (f"in {int(first['images'])} images of the label ({first['coverage']:.0%}), "
                   f"{int(first['images_other'])} of others ({first['coverage_other']:.0%})") if "coverage_other" in group else ""
        rows.append({"rank": rank, "size": len(group), "coverage": int(group["image_id"].nunique()),
                     "median": float(group["typicality"].median()), "caption": caption,
                     "href": f"cluster-{label_index}-{rank}.html" if label_index is not None else None,
                     "crops": [c for c in (pages.crop(r, kind) for r in group.head(pages.config.per_cluster).itertuples()) if c]})
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


def cotypicality_section(run, images: RunImages, config: ReportConfig, with_clusters: bool = True, save=None) -> dict | None:
    """Translations (each source beside its versions under every label) and co-typical clusters
    (rows of sequences: the same box in every member, the source's crop outlined). ``save(array)``
    returns an image's ``src``."""
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
                              "src": save(member) if member is not None else None})
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
                    crops.append({"src": save(np.asarray(crop)), "source": label == r.source_label,
                                  "title": f"{r.image_id} as {label}: T={getattr(r, 'typicality_' + label, float('nan')):.4g}"})
                rows.append({"image_id": r.image_id, "cotypicality": float(r.cotypicality), "crops": crops})
            clusters.append({"rank": int(rank), "size": len(group), "median": float(group["cotypicality"].median()),
                             "sequences": rows})
            if config.clusters > 0 and len(clusters) >= config.clusters:
                break
    return {"labels": labels, "translations": translations, "clusters": clusters,
            "method": run.config.get("translate", {}).get("method", "")}


# ----------------------------------------------------------------------------------------------
# model quality


def read_metrics(run) -> pd.DataFrame | None:
    path = run.model_dir / "metrics.csv"
    return pd.read_csv(path) if path.is_file() else None


def loss_curve(metrics: pd.DataFrame) -> bytes:
    """PNG of the training loss per step (and its running mean), matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 2.6), dpi=100, layout="constrained")
    axis.plot(metrics["step"], metrics["loss"], lw=0.6, alpha=0.5, label="loss")
    window = max(1, len(metrics) // 20)
    axis.plot(metrics["step"], metrics["loss"].rolling(window, min_periods=1).mean(), lw=1.5,
              label=f"running mean ({window} steps)")
    axis.set_xlabel("step")
    axis.set_ylabel("denoising loss (MSE)")
    if metrics["loss"].max() > 10 * max(metrics["loss"].min(), 1e-12):
        axis.set_yscale("log")  # a long run: the early steps would flatten the rest
    axis.legend(fontsize=8)
    return figure_png(figure)


def classify_quality(summary: dict) -> dict:
    """The lead split's accuracy and whether it is near chance: within two binomial standard
    errors of it (the model has then not shown it learned the labels)."""
    accuracy, chance, n = summary["accuracy"], summary["chance"], max(1, summary["images"])
    margin = 2 * (chance * (1 - chance) / n) ** 0.5
    return {"split": summary.get("split", "train"), "accuracy": accuracy, "chance": chance, "images": summary["images"],
            "near_chance": accuracy <= chance + margin,
            "splits": {s: v["accuracy"] for s, v in summary.get("splits", {}).items()}}


def model_section(run, site: Site, fresh: set[str]) -> dict:
    out = {"loss": None, "classify": None}
    metrics = read_metrics(run) if "model" in fresh else None
    if metrics is not None and len(metrics):
        out["loss"] = {"src": site.put("assets/loss.png", loss_curve(metrics)), "steps": int(metrics["step"].max()),
                       "last": float(metrics["loss"].tail(max(1, len(metrics) // 20)).mean())}
    path = run.path / "classify" / "summary.json"
    if "classify" in fresh and path.is_file():
        out["classify"] = classify_quality(json.loads(path.read_text()))
    return out


# ----------------------------------------------------------------------------------------------
# the pages


@functools.lru_cache(maxsize=1)
def _environment() -> Environment:
    """One environment: each template is compiled once, however many pages use it."""
    return Environment(loader=PackageLoader("diffmine", "templates"), autoescape=select_autoescape(["html", "j2"]))


def render(template: str, context: dict) -> str:
    return _environment().get_template(template).render(**context)


def _image_pages(run, pages: Pages, clustered: pd.DataFrame | None, mined: pd.DataFrame, label_pages: dict,
                 cluster_files: set[str]) -> tuple[list, float]:
    """One view per linked image, on one colour scale: the 99th percentile of |T| over their maps.
    A patch links its cluster's page where the site has one (``cluster_files``: not for clusters
    under ``--min-cluster-size`` or past ``--clusters``)."""
    have = {}
    for image_id in pages.viewed:
        try:
            have[image_id] = run.latent_typicality_map(image_id)
        except KeyError:
            pass
    scale = map_scale(have.values())
    boxes = clustered if clustered is not None else mined[mined["kind"] == "top"]
    by_image = {i: g for i, g in boxes.groupby("image_id", sort=False)} if len(boxes) else {}
    views = []
    side = pages.config.view_px
    root, label_index = run.dataset_root, {label: i for i, label in enumerate(run.labels)}
    for image_id, label in pages.viewed.items():
        image = pages.images.get(image_id)
        entry = {"image_id": image_id, "label": label, "label_href": label_pages.get(label), "key": image_key(image_id),
                 "path": os.path.relpath(pages.images.paths.get(image_id, image_id), root), "patches": []}
        if image is not None:
            entry["image"] = pages.site.png(_fit(image, side))
            group = by_image.get(image_id)
            box_list = group[["x0", "y0", "x1", "y1"]].to_numpy().tolist() if group is not None else []
            if image_id in have:
                values = run.typicality_map(image_id)
                entry["map"] = pages.site.png(_fit(heat_colours(values, scale), side))
                factor = max(1, side // max(image.shape[:2]))
                entry["overlay"] = pages.site.png(_fit(draw_boxes(overlay(image, values, scale), box_list, scale=factor,
                                                                 width=max(1, factor // 3)), side))
            if group is not None:
                for r in group.itertuples():
                    rank = getattr(r, "cluster_rank", None)
                    page = None if rank is None else f"cluster-{label_index[r.label]}-{int(rank)}.html"
                    entry["patches"].append({
                        "box": f"({r.x0},{r.y0})-({r.x1},{r.y1})", "typicality": float(r.typicality),
                        "cluster": None if rank is None else int(rank), "href": page if page in cluster_files else None})
        views.append(entry)
    return views, scale


def _adaptive_section(run, index: pd.DataFrame) -> dict | None:
    """Where an adaptive typicality's draws went (None for the other estimators: every image has
    the same draws)."""
    settings = run.step_config("typicality")
    if settings.get("estimator") != "adaptive":
        return None
    return {"summary": draws_summary(index), "cap": int(settings["samples"]), "top": int(settings["adaptive"]["top"])}


def build_site(run, site: Site, config: ReportConfig, evaluation: dict | None, fresh: set[str]) -> None:
    """Write every page of the results named in ``fresh`` (up to date) into ``site``."""
    pages = Pages(run, site, config)
    run.fresh("mine")
    mined = pd.read_parquet(run.patches_path)
    clustered = pd.read_parquet(run.clusters_path) if "cluster" in fresh else None
    index = run.typicality_index()
    baselines = {path.parent.name: pd.read_parquet(path) for path in sorted(run.path.glob("baselines/*/patches.parquet"))
                 if f"baseline-{path.parent.name}" in fresh}
    common = {"run_name": run.path.name, "crop_px": config.crop_px, "view_px": config.view_px,
              "labels_nav": [{"name": label, "href": f"label-{i}.html"} for i, label in enumerate(run.labels)]}
    labels, cluster_pages = [], []
    for i, label in enumerate(run.labels):
        entry = {"name": label, "index": i, "href": f"label-{i}.html", "prompt": run.prompt(label), "clusters": [],
                 "examples": [], "compare": [], "cluster_count": 0, "hidden": 0}
        if clustered is not None:
            own = clustered[clustered["label"] == label]
            entry["clusters"] = _cluster_rows(pages, own, i)
            entry["cluster_count"] = int(own["cluster"].nunique())
            entry["hidden"] = entry["cluster_count"] - len(entry["clusters"])
            for rank, group in cluster_table(own, config):
                members = [{"crop": pages.crop(r), "rank_in_cluster": int(r.rank_in_cluster), "box": (r.x0, r.y0, r.x1, r.y1),
                            "thumb": pages.thumb(r.image_id, config.crop_px), "shape": pages.images.get(r.image_id).shape[:2]}
                           for r in group.head(config.members).itertuples() if pages.images.get(r.image_id) is not None]
                cluster_pages.append({"label": label, "label_href": entry["href"], "rank": rank, "size": len(group),
                                      "coverage": int(group["image_id"].nunique()), "shown": len(members),
                                      "median": float(group["typicality"].median()), "members": members,
                                      "file": f"cluster-{i}-{rank}.html"})
        entry["baselines"] = [{"name": name, "clusters": _cluster_rows(pages, table[table["label"] == label], None, "score")}
                              for name, table in baselines.items()]
        top_images = mined[(mined["label"] == label) & (mined["kind"] == "top")]["image_id"].drop_duplicates()
        for image_id in top_images.head(config.examples):
            if pages.images.get(image_id) is not None:
                pages.viewed.setdefault(image_id, label)
                entry["examples"].append({"image_id": image_id, "href": f"image-{image_key(image_id)}.html"})
        for kind, title in (("top", "most typical"), ("least", "least typical"), ("random", "random")):
            frame = mined[(mined["label"] == label) & (mined["kind"] == kind)]
            entry["compare"].append({"kind": kind, "title": title,
                                     "crops": [c for c in (pages.crop(r) for r in frame.head(config.compare).itertuples()) if c]})
        rows = index[(index["label"] == label) & (index["status"] == "ok")]
        entry["images"] = len(rows)
        entry["mean_typicality"] = float(rows["mean"].mean()) if len(rows) else float("nan")
        entry["draws"] = float(rows["draws"].mean()) if len(rows) and "draws" in rows else float("nan")
        labels.append(entry)

    views, scale = _image_pages(run, pages, clustered, mined, {l["name"]: l["href"] for l in labels},
                                {cluster["file"] for cluster in cluster_pages})
    legend = site.put("assets/legend.png", colorbar(scale))
    thumbs = {v["image_id"]: v.get("overlay") for v in views}
    for entry in labels:  # the label page's maps: the image views' overlays (one scale)
        for example in entry["examples"]:
            example["overlay"] = thumbs.get(example["image_id"])
    for view in views:
        site.put(f"image-{view['key']}.html", render("image.html.j2", {**common, "view": view, "legend": legend,
                                                                       "scale": scale}).encode())
    for cluster in cluster_pages:
        site.put(cluster["file"], render("cluster.html.j2", {**common, "cluster": cluster}).encode())
    for entry in labels:
        site.put(entry["href"], render("label.html.j2", {**common, "label": entry, "legend": legend}).encode())

    localization = report_section(run, pages.images, config.examples, save=site.png) if "localize" in fresh else None
    cotypicality = cotypicality_section(run, pages.images, config, "cotypicality" in fresh, save=site.png) \
        if "translate" in fresh else None
    # the images left out of the pages (unreadable, or changed since they were listed): one line
    # each, and recorded for `status` and the `problems` table (this render's only: fixed ones go),
    # before the problems page and the index count them (they showed the render before's)
    run.report_skipped("report", list(pages.images.problems.values()))
    problems = run.problems()
    extra = {"localization": localization, "cotypicality": cotypicality}
    for name, section in extra.items():
        if section is not None:
            site.put(f"{name}.html", render(f"{name}.html.j2", {**common, name: section}).encode())
    site.put("problems.html", render("problems.html.j2", {**common, "problems": problems.head(200).to_dict("records"),
                                                          "problem_count": problems["image_id"].nunique(),
                                                          "problem_rows": len(problems)}).encode())
    # the report's own record is written after the site: shown, it would make every render differ
    records = {name: record for name, record in run.lineage.records().items() if name != "report"}
    site.put("settings.html", render("settings.html.j2", {**common, "settings": json.dumps(records, indent=2,
                                                                                          default=str)}).encode())
    site.put("index.html", render("index.html.j2", {
        **common, "title": f"diffmine report: {run.path.name}", "labels": labels, "model": model_section(run, site, fresh),
        "evaluation": json.dumps(evaluation, indent=2) if evaluation else None,
        "problem_count": problems["image_id"].nunique(),
        "sections": {name: section is not None for name, section in extra.items()}, "images_shown": len(views),
        "adaptive": _adaptive_section(run, index),
        "links": site.keep_pages(report_links(run)),
        "scale": scale, "legend": legend}).encode())


def write_report(run, config: ReportConfig = ReportConfig(), evaluation: dict | None = None,
                 fresh: set[str] | None = None) -> Path:
    """Write the site of the results named in ``fresh`` (default: every result that is up to
    date) into RUN/report/; returns its index.html."""
    if fresh is None:
        fresh = {name for name in run.lineage.records() if not run.stale(name)}
    site = Site(run.own_path(run.report_path.parent))  # finish() removes what it did not write
    build_site(run, site, config, evaluation, fresh)
    site.finish()
    return run.report_path
