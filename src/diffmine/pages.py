"""Report pages of the contrast and trend results: RUN/report/contrast-<digest>.html and
RUN/report/trends.html, each with its PNG images in a folder beside it (no base64), rendered
from their own Jinja2 templates with autoescape on (labels and paths are untrusted text).
:func:`report_links` lists them for the report's index page.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from .atomic import write_bytes, write_text
from .images import RunImages, overlay
from .lineage import contrast_key, contrast_name

CROP_PX = 72


def _render(template: str, **context) -> str:
    env = Environment(loader=PackageLoader("diffmine", "templates"), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template(template).render(**context)


class _Assets:
    """PNG files in ``folder`` (beside the page), named by a counter: no untrusted text in names."""

    def __init__(self, page: Path):
        self.folder = page.with_suffix("")
        self.n = 0
        if self.folder.is_dir():  # a page rewritten keeps no image of its old version
            shutil.rmtree(self.folder)

    def png(self, array: np.ndarray) -> str:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return self.save(buffer.getvalue(), "png")

    def save(self, data: bytes, ext: str) -> str:
        name = f"{self.n:04d}.{ext}"
        self.n += 1
        write_bytes(self.folder / name, data)
        return f"{self.folder.name}/{name}"

    def crop(self, images: RunImages, image_id: str, box) -> str | None:
        image = images.get(image_id)
        if image is None:
            return None
        x0, y0, x1, y1 = box
        crop = Image.fromarray(image[y0:y1, x0:x1]).resize((CROP_PX, CROP_PX), Image.Resampling.NEAREST)
        return self.png(np.asarray(crop))


def contrast_page_path(run, a: str, b: str | None) -> Path:
    return run.path / "report" / f"contrast-{contrast_key(a, b)}.html"


def write_contrast_page(run, a: str, b: str | None, clusters: int = 8, per_cluster: int = 8, examples: int = 4) -> Path:
    """The elements that make ``a`` look unlike ``b``: clusters of the most contrasting patches
    (most contrasting cluster first) and contrast overlays of example images."""
    directory = run.contrast_dir(a, b)
    clustered = pd.read_parquet(directory / "clusters.parquet")
    page = run.own_path(contrast_page_path(run, a, b))  # its folder of images is removed and written anew
    assets, images = _Assets(page), RunImages(run)
    rows = []
    for rank, group in clustered.groupby("cluster_rank", sort=True):
        crops = [{"src": assets.crop(images, r.image_id, (r.x0, r.y0, r.x1, r.y1)),
                  "title": f"{r.image_id} ({r.x0},{r.y0})-({r.x1},{r.y1}) C={r.typicality:.4g}"}
                 for r in group.sort_values("rank_in_cluster").head(per_cluster).itertuples()]
        rows.append({"rank": int(rank), "label": group["label"].iloc[0], "size": len(group),
                     "median": float(group["typicality"].median()), "crops": [c for c in crops if c["src"]]})
        if len(rows) >= clusters:
            break
    shown = []
    for image_id in clustered.sort_values("typicality", ascending=False)["image_id"].drop_duplicates().head(examples):
        values = run.contrast_map(image_id, a, b)
        image = images.get(image_id, values.shape)
        if image is not None:
            shown.append({"image_id": image_id, "image": assets.png(image), "overlay": assets.png(overlay(image, values))})
    record = run.lineage.get(contrast_name(a, b))
    html = _render("contrast.html.j2", a=a, b=b if b is not None else "every other label", vs_all=b is None,
                   clusters=rows, examples=shown, crop_px=CROP_PX, samples=record["settings"].get("samples"),
                   images=record["settings"].get("images"))
    run.add_skipped(contrast_name(a, b) + "-elements", list(images.problems.values()))  # beside its features' skips
    return write_text(page, html)


def _plot(order: list[str], prevalence: list[float]) -> bytes:
    """A small line plot of prevalence over the order (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.6, 1.5), dpi=100)
    ax.plot(range(len(order)), prevalence, marker="o", lw=1.5)
    ax.set_ylim(-0.03, 1.03)
    # labels are user text: parse_math off, or a label like "$\\foo$" is parsed as mathtext and fails
    ax.set_xticks(range(len(order)), [str(o)[:8] for o in order], fontsize=6, rotation=30, parse_math=False)
    ax.tick_params(axis="y", labelsize=6)
    ax.set_ylabel("prevalence", fontsize=7)
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def trends_page_path(run) -> Path:
    return run.path / "report" / "trends.html"


def threshold_words(threshold: str, percentile: float) -> str:
    """When an image counts as containing an element, as trends' ``--threshold`` decides it."""
    if threshold == "members":
        return (f"whose best-matching patch is as close to the element's DIFT centroid as the {percentile:g}th "
                "percentile of the element's own members")
    return ("whose best-matching patch lies in the upper group of all images' best matches to the element's DIFT "
            "centroid (Otsu's cut into two or three groups)")


def write_trends_page(run, result: dict, rule: str, per_element: int = 6, limit: int = 40) -> Path:
    """Per element: its crops and its prevalence over the order; rising, then falling, then flat.
    ``rule``: when an image contains an element (:func:`threshold_words`)."""
    page = run.own_path(trends_page_path(run))  # its folder of images is removed and written anew
    assets, images = _Assets(page), RunImages(run)
    sections = {"rising": [], "falling": [], "flat": []}
    for element in result["elements"][:limit]:
        crops = [assets.crop(images, image_id, box) for image_id, *box in element["members"][:per_element]]
        sections[element["direction"]].append({**element, "crops": [c for c in crops if c],
                                               "plot": assets.save(_plot(result["order"], element["prevalence"]), "png"),
                                               "cells": list(zip(result["order"], element["prevalence"], element["typicality"]))})
    html = _render("trends.html.j2", order=result["order"], sections=sections, crop_px=CROP_PX, rule=rule,
                   total=len(result["elements"]), shown=min(limit, len(result["elements"])))
    run.add_skipped("trends", list(images.problems.values()))  # beside those its measure named
    return write_text(page, html)


def report_links(run) -> list[dict]:
    """[{"title", "href"}] of the contrast and trend pages written so far and still fresh; href is
    relative to RUN/report/. Titles hold labels: untrusted text, to be escaped by the caller."""
    links = []
    for name, record in sorted(run.lineage.records().items()):
        if name.startswith("contrast-") and name.endswith("-elements") and not run.stale(name):
            maps = run.lineage.get(name[: -len("-elements")])
            a, b = maps["settings"]["a"], maps["settings"]["b"]
            page = contrast_page_path(run, a, b)
            if page.is_file():
                links.append({"title": f"{a} vs {b if b is not None else 'all'}", "href": page.name})
    if run.lineage.get("trends") is not None and not run.stale("trends") and trends_page_path(run).is_file():
        links.append({"title": "Trends over " + ", ".join(run.lineage.get("trends")["settings"]["order"]), "href": "trends.html"})
    return links
