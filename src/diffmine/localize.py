"""Localization without box supervision (paper section 5.2, ChestX-ray8 style).

The model never saw a box; how well does its typicality map find the annotated element? Per
(image, label) with a box or mask: the AUC-PR (average precision over all pixels) of the map as
a detector of the annotated region, the random baseline (the region's pixel fraction, the AP of
an uninformative map), and the mean typicality inside vs outside the region; then means per
label and overall.

    diffmine localize --run RUN --boxes BOXES.csv [--blur SIGMA] [--json] [--before RUN0]
    diffmine localize --run RUN --masks DIR

Box lists (coordinates in the ORIGINAL image's pixels, scaled here to the run's image size):

- ChestX-ray8's ``BBox_List_2017.csv``: ``Image Index, Finding Label, Bbox [x, y, w, h]``
  (the real header is ``Image Index,Finding Label,Bbox [x,y,w,h],,,``), or clean ``x,y,w,h``;
- generic: ``image,label,x0,y0,x1,y1`` (x1, y1 exclusive).

Masks: ``DIR/<label>/<file>``, the image's file name (any extension), nonzero = element. The
image value (or mask file) names a run image by its image_id, or by its file name when unique.
Several boxes or masks of one (image, label) are united.

The label of a box is the conditioning: where the run scored the image under another label (a
multi-label image), the map is computed under the box's label with the run's scoring model and
typicality settings (the same shared draws), and stored with the results.

    RUN/localize/results.parquet      one row per (image, label): scores, boxes, map source
    RUN/localize/results.safetensors  the latent maps computed here (key = results' ``key``)
    RUN/localize/summary.json         the printed JSON: overall, per_label (and before)
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter

from .atomic import write_json
from .data import CHANGED, changed_since_listing, load_image, require_regular_file, to_model_input
from .evaluate import check_masks, load_mask, region_scores, summarize
from .flags import add_run_args
from .images import draw_boxes, overlay, png_data_uri
from .rundir import Run, open_run
from .shards import read_array, write_shard
from .terminal import json_alone, printable
from .typicality import TypicalityConfig, typicality_latent_maps, upsample

METRICS = ("auc_pr", "random", "inside", "outside")
SHOW_UNMATCHED = 5  # unmatched image names printed

RESULTS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("label", pa.string()), ("image_label", pa.string()),
    ("map", pa.string()),  # stored: the run's typicality map; computed: under this label, here
    ("key", pa.string()), ("status", pa.string()),  # key of a computed map in results.safetensors
    ("height", pa.int32()), ("width", pa.int32()), ("blur", pa.float32()),
    ("boxes", pa.list_(pa.list_(pa.int32()))),  # x0, y0, x1, y1 at the map's size, x1/y1 exclusive
    ("masks", pa.list_(pa.string())),
    ("auc_pr", pa.float64()), ("random", pa.float64()), ("inside", pa.float64()), ("outside", pa.float64()),
    ("split", pa.string()),  # the image's split: train | holdout
])


# ----------------------------------------------------------------------------------------------
# pure functions


def scale_boxes(boxes: np.ndarray, original: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Boxes in the original image's pixels -> integer boxes on a map of ``size``.

    Args:
        boxes: (N, 4) x0, y0, x1, y1 (x1, y1 exclusive) in pixels of the original image
        original: (H0, W0) of the original image; size: (H, W) of the map
    Returns:
        (N, 4) int: every map pixel the box overlaps, clipped to the map (so a box smaller than
        a map pixel still covers one)
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sy, sx = size[0] / original[0], size[1] / original[1]
    # the epsilon keeps exact multiples exact despite float rounding (2.9999999 -> 3, not 2)
    x0 = np.floor(boxes[:, 0] * sx + 1e-6)
    y0 = np.floor(boxes[:, 1] * sy + 1e-6)
    x1 = np.maximum(np.ceil(boxes[:, 2] * sx - 1e-6), x0 + 1)
    y1 = np.maximum(np.ceil(boxes[:, 3] * sy - 1e-6), y0 + 1)
    scaled = np.stack([x0, y0, x1, y1], 1)
    return np.clip(scaled, 0, [size[1], size[0], size[1], size[0]]).astype(int)


def boxes_mask(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, 4) integer boxes (x1, y1 exclusive) -> (H, W) bool, their union."""
    mask = np.zeros(size, dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=int).reshape(-1, 4):
        mask[y0:y1, x0:x1] = True
    return mask


def blur_map(pixel_map: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W) map smoothed by a Gaussian of ``sigma`` map pixels (0: unchanged)."""
    if not 0 <= sigma < math.inf:
        raise ValueError(f"the blur sigma must be >= 0, got {sigma}")
    return gaussian_filter(pixel_map, sigma, mode="nearest") if sigma > 0 else pixel_map


def read_boxes(path: str | Path) -> pd.DataFrame:
    """A box list -> one row per box: image, label, x0, y0, x1, y1 (original pixels, x1/y1
    exclusive), line (of the file).

    Raises:
        ValueError naming the file: neither format's columns, a missing or non-numeric value,
        a negative coordinate or an empty box.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        lines = [(reader.line_num, row) for row in reader if any(field.strip() for field in row)]
    image_col = next((header.index(n) for n in ("image index", "image") if n in header), None)
    label_col = next((header.index(n) for n in ("finding label", "label") if n in header), None)
    bbox_col = next((i for i, h in enumerate(header) if h.startswith("bbox")), None)
    if image_col is not None and label_col is not None and {"x0", "y0", "x1", "y1"} <= set(header):
        columns, corners = [header.index(n) for n in ("x0", "y0", "x1", "y1")], True
    elif image_col is not None and label_col is not None and {"x", "y", "w", "h"} <= set(header):
        columns, corners = [header.index(n) for n in ("x", "y", "w", "h")], False
    elif image_col is not None and label_col is not None and bbox_col is not None:
        # ChestX-ray8: "Bbox [x,y,w,h]" unquoted splits into four header fields, quoted it is one
        # followed by unnamed ones; either way the four numbers start at its column
        columns, corners = list(range(bbox_col, bbox_col + 4)), False
    else:
        raise ValueError(f"{path}: not a box list: expected the columns of ChestX-ray8's BBox_List "
                         f"(Image Index, Finding Label, Bbox [x, y, w, h]) or image, label, x0, y0, x1, y1; "
                         f"found {header}")
    rows = []
    for line, row in lines:
        fields = [row[i].strip() if i < len(row) else "" for i in [image_col, label_col, *columns]]
        if not fields[0] or not fields[1]:
            raise ValueError(f"{path}: line {line}: empty image or label")
        try:
            a, b, c, d = (float(v) for v in fields[2:])
        except ValueError:
            raise ValueError(f"{path}: line {line}: box values must be numbers, got {fields[2:]}") from None
        x0, y0, x1, y1 = (a, b, c, d) if corners else (a, b, a + c, b + d)
        if not np.isfinite([x0, y0, x1, y1]).all() or min(a, b, c, d) < 0:
            raise ValueError(f"{path}: line {line}: negative or non-finite box value {fields[2:]}")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{path}: line {line}: empty box {fields[2:]}")
        rows.append({"image": fields[0], "label": fields[1], "x0": x0, "y0": y0, "x1": x1, "y1": y1, "line": line})
    return pd.DataFrame(rows, columns=["image", "label", "x0", "y0", "x1", "y1", "line"])


class ImageNames:
    """Resolves a name to a run image: its image_id (with or without extension), else its file
    name or file stem where only one image has it."""

    def __init__(self, image_ids: list[str]):
        self.ids = set(image_ids)
        names = pd.Series(image_ids)
        self.by_key: dict[str, str] = {}
        for keys in (names.str.rsplit(".", n=1).str[0], names.str.rsplit("/", n=1).str[-1],
                     names.str.rsplit("/", n=1).str[-1].str.rsplit(".", n=1).str[0]):
            unique = ~keys.duplicated(keep=False)
            for key, image_id in zip(keys[unique], names[unique]):
                self.by_key.setdefault(key, image_id)

    def __call__(self, name: str) -> str | None:
        name = name.replace("\\", "/").strip()
        if name in self.ids:
            return name
        for key in (name.rsplit(".", 1)[0], name.rsplit("/", 1)[-1], name.rsplit("/", 1)[-1].rsplit(".", 1)[0]):
            if key in self.by_key:
                return self.by_key[key]
        return None


# ----------------------------------------------------------------------------------------------
# regions: what to score, matched to the run's images


def _scored_images(run: Run) -> pd.DataFrame:
    """The images with a stored typicality map: image_id (index), label, path, height, width."""
    index = run.typicality_index()
    return run.as_trained(index[index["status"] == "ok"].drop_duplicates("image_id")).set_index("image_id")


def box_regions(boxes: pd.DataFrame, scored: pd.DataFrame) -> tuple[list[dict], list[str]]:
    """Boxes united per (image_id, label) -> regions [{image_id, label, boxes (N, 4), masks []}],
    and the image names that match no scored image."""
    names = ImageNames(list(scored.index))
    matched = boxes.assign(image_id=[names(n) for n in boxes["image"]])
    unmatched = matched.loc[matched["image_id"].isna(), "image"].tolist()
    regions = [{"image_id": image_id, "label": label, "boxes": group[["x0", "y0", "x1", "y1"]].to_numpy(), "masks": []}
               for (image_id, label), group in matched.dropna(subset=["image_id"]).groupby(["image_id", "label"], sort=False)]
    return regions, unmatched


def mask_regions(masks: Path, scored: pd.DataFrame) -> tuple[list[dict], list[str]]:
    """``masks/<label>/<file>`` -> regions [{image_id, label, boxes None, masks [paths]}], and
    the mask files that match no scored image."""
    if not masks.is_dir():
        raise FileNotFoundError(f"{masks}: no such mask folder")
    names = ImageNames(list(scored.index))
    regions: dict[tuple[str, str], dict] = {}
    unmatched = []
    for label_dir in sorted(p for p in masks.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in label_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            relative = path.relative_to(label_dir).as_posix()
            # DIR/<label>/<file> may mirror the image_id itself (the built-in dataset's layout)
            image_id = names(f"{label_dir.name}/{relative}") or names(relative)
            if image_id is None:
                unmatched.append(path.relative_to(masks).as_posix())
                continue
            region = regions.setdefault((image_id, label_dir.name), {"image_id": image_id, "label": label_dir.name,
                                                                     "boxes": None, "masks": []})
            region["masks"].append(str(path))
    return list(regions.values()), unmatched


# ----------------------------------------------------------------------------------------------
# maps under a box's label


def computed_latent_maps(run: Run, backend, path: str, labels: list[str], draws: int | None = None) -> np.ndarray:
    """(len(labels), h, w) float32: typicality of the image at ``path`` under each of the run's
    ``labels``, with the run's typicality settings (so the same shared draws as its stored maps).

    ``draws``: the image's own draws in an adaptive run (the index's ``draws``): its stored map
    averages the first ``draws`` of the nested sequence, so the maps under other labels do too
    (the same draws, and not the cap's cost)."""
    settings = run.step_config("typicality")
    prefix = {"samples": int(draws)} if settings.get("estimator") == "adaptive" and draws else {}
    config = TypicalityConfig.from_settings(settings, **prefix)
    dataset = run.step_config("dataset")
    image = load_image(path, dataset["resolution"], dataset["resize"], backend.latent_factor)
    pixels = to_model_input(np.repeat(image[None], len(labels), 0))
    maps = typicality_latent_maps(backend, pixels, [run.prompt(label) for label in labels], run.prompt(None), config)
    return maps.cpu().numpy().astype(np.float32)


def _original_size(path: str) -> tuple[int, int]:
    """(H0, W0) from the image file's header (no decoding)."""
    require_regular_file(path)
    with Image.open(path) as img:
        return img.height, img.width


def score_run(run: Run, regions: list[dict], blur: float = 0.0) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Score every region against the run's typicality map under the region's label.

    Returns:
        one row per region (RESULTS_SCHEMA's columns), and the latent maps computed under a
        label other than the stored one, by the rows' ``key``
    """
    unknown = sorted({r["label"] for r in regions} - set(run.labels))
    if unknown:
        raise ValueError(f"label(s) {unknown} unknown to the model of {run.path} (it knows {run.labels})")
    scored = _scored_images(run)
    backend, computed, rows = None, {}, []
    by_image: dict[str, list[dict]] = {}
    for region in regions:
        by_image.setdefault(region["image_id"], []).append(region)
    for image_id, image_regions in by_image.items():
        info = scored.loc[image_id]
        # the boxes are drawn on the file as it is now, the stored map was made from the listed bytes
        if changed_since_listing(info["path"], (info["size"], info["mtime_ns"], info["fingerprint"])):
            raise ValueError(f"{info['path']}: {CHANGED}")
        size = (int(info["height"]), int(info["width"]))
        other = sorted({r["label"] for r in image_regions} - {info["label"]})
        latent = {}
        if other:
            if backend is None:
                from .pipeline import scoring_model

                backend = scoring_model(run)
            latent = dict(zip(other, computed_latent_maps(run, backend, info["path"], other, info.get("draws"))))
        original = _original_size(info["path"]) if any(r["boxes"] is not None for r in image_regions) else None
        for region in image_regions:
            key = ""
            if region["label"] in latent:
                key = str(len(computed))
                computed[key] = latent[region["label"]]
                values = upsample(computed[key], size)
            else:
                values = run.typicality_map(image_id)
            values = blur_map(values, blur)
            if region["boxes"] is not None:
                boxes = scale_boxes(region["boxes"], original, size)
                mask = boxes_mask(boxes, size)
            else:
                boxes = np.zeros((0, 4), dtype=int)
                mask = np.logical_or.reduce([load_mask(Path(p), size) for p in region["masks"]])
            rows.append({"image_id": image_id, "label": region["label"], "image_label": info["label"],
                         "map": "computed" if key else "stored", "key": key, "status": "ok",
                         "height": size[0], "width": size[1], "blur": blur, "boxes": boxes.tolist(),
                         "masks": list(region["masks"]), **region_scores(values, mask), "split": info["split"]})
    return pd.DataFrame(rows, columns=RESULTS_SCHEMA.names), computed


def localize(run: Run, boxes: str | Path | None = None, masks: str | Path | None = None,
             blur: float = 0.0) -> tuple[pd.DataFrame, dict[str, np.ndarray], list[str]]:
    """Score a run's typicality against a box list or a mask folder (exactly one).

    Returns the per-region rows, the latent maps computed here, and the unmatched names.
    """
    if (boxes is None) == (masks is None):
        raise ValueError("give exactly one of boxes (a CSV file) and masks (a folder)")
    scored = _scored_images(run)
    source = Path(boxes) if boxes is not None else check_masks(run, masks)
    regions, unmatched = box_regions(read_boxes(source), scored) if boxes is not None else mask_regions(source, scored)
    if not regions:
        raise ValueError(f"{source}: no entry matches an image with typicality in {run.path} "
                         f"({len(unmatched)} unmatched, e.g. {unmatched[:SHOW_UNMATCHED]})")
    per_region, computed = score_run(run, regions, blur)
    return per_region, computed, unmatched


def summary(per_region: pd.DataFrame) -> dict:
    """{"split", "overall": {auc_pr, random, inside, outside, images}, "per_label": {label: {...}},
    "splits": {split: {overall, per_label}}}: means over (image, label) pairs, of the held-out
    split first when there is one; NaN written as null so the JSON stays valid."""
    def finite(d):
        return {k: (finite(v) if isinstance(v, dict) else None if isinstance(v, float) and not np.isfinite(v) else v)
                for k, v in d.items()}
    splits = {s: finite(summarize(per_region[per_region["split"] == s])) for s in ("holdout", "train")
              if (per_region["split"] == s).any()}
    lead = next(iter(splits))
    return {"split": lead, **splits[lead], "splits": splits}


def write_results(run: Run, per_region: pd.DataFrame, computed: dict[str, np.ndarray], result: dict) -> Path:
    """RUN/localize/results.{safetensors,parquet} (maps first, index last) and summary.json."""
    summary_path = run.result_files("localize")[0]
    write_shard(summary_path.parent, "results", computed, per_region.to_dict("records"), RESULTS_SCHEMA)
    write_json(summary_path, result)
    return summary_path.parent


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table; with a "before" key, each metric before and after."""
    before = result.get("before")
    labels = list(result["per_label"]) + [l for l in (before or {}).get("per_label", {}) if l not in result["per_label"]]
    # AP and area are fractions; the mean typicality is on the model's loss scale (often ~1e-4)
    fmt = lambda v, m: "-" if v is None else str(v) if m == "images" else f"{v:.3f}" if m in ("auc_pr", "random") else f"{v:.3g}"
    names = {"auc_pr": "AUC-PR", "random": "random", "inside": "inside", "outside": "outside", "images": "images"}
    metrics = [*METRICS, "images"]
    if before is None:
        header = ["label"] + [names[m] for m in metrics]
    else:
        header = ["label"] + [f"{names[m]} {side}" for m in metrics for side in ("before", "after")]
    rows = []
    for label in labels + ["overall"]:
        after_stats = result["overall"] if label == "overall" else result["per_label"].get(label, {})
        if before is None:
            rows.append([printable(label)] + [fmt(after_stats.get(m), m) for m in metrics])
        else:
            before_stats = before["overall"] if label == "overall" else before["per_label"].get(label, {})
            rows.append([printable(label)] + [fmt(stats.get(m), m) for m in metrics for stats in (before_stats, after_stats)])
    return header, rows


def format_table(result: dict) -> str:
    header, rows = table_rows(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [header, *rows])


# ----------------------------------------------------------------------------------------------
# report section


def _outlined(image: np.ndarray, values: np.ndarray, row) -> np.ndarray:
    """The heat-map overlay with the region drawn in green: boxes as rectangles, masks as outlines."""
    size = (int(row.height), int(row.width))
    drawn = draw_boxes(overlay(image, values), row.boxes, colour=(0, 255, 0)).copy()
    if len(row.masks):
        mask = np.logical_or.reduce([load_mask(Path(p), size) for p in row.masks])
        drawn[mask & ~binary_erosion(mask)] = (0, 255, 0)
    return drawn


def report_section(run: Run, images, examples: int = 4, save=png_data_uri) -> dict | None:
    """The report's Localization section (None until ``diffmine localize`` ran): the summary
    table and, per label, the first ``examples`` overlays with their region drawn (``save(array)``
    gives an image's ``src``)."""
    directory = run.path / "localize"
    if not (directory / "results.parquet").is_file():
        return None
    results = pd.read_parquet(directory / "results.parquet")
    summary_path = directory / "summary.json"
    result = json.loads(summary_path.read_text()) if summary_path.is_file() else summary(results)
    header, rows = table_rows(result)
    labels = []
    for label, group in results.groupby("label", sort=True):
        shown = []
        for row in group.head(examples).itertuples():
            size = (int(row.height), int(row.width))
            latent = read_array(directory, "results", row.key) if row.map == "computed" else None
            values = blur_map(upsample(latent, size) if latent is not None else run.typicality_map(row.image_id), float(row.blur))
            image = images.get(row.image_id, size)
            if image is None:
                continue
            note = f" (computed under {label}; scored as {row.image_label})" if row.map == "computed" else ""
            shown.append({"image_id": row.image_id, "overlay": save(_outlined(image, values, row)),
                          "caption": f"{row.image_id}: AUC-PR {row.auc_pr:.3f} vs random {row.random:.3f}{note}"})
        labels.append({"name": label, "examples": shown})
    return {"header": header, "rows": rows, "labels": labels}


# ----------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers):
    """``diffmine localize --run RUN (--boxes CSV | --masks DIR) [--blur SIGMA] [--json] [--before RUN0]``."""
    p = subparsers.add_parser("localize", help="AUC-PR of typicality against boxes or masks (no box supervision)",
                              description="Per image and label: average precision of the typicality map against "
                                          "annotated boxes (ChestX-ray8 BBox_List or image,label,x0,y0,x1,y1; original "
                                          "pixel coordinates) or masks (DIR/<label>/<file>), with the random baseline. "
                                          "Writes RUN/localize/.")
    add_run_args(p, seed=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--boxes", type=Path, help="box list (CSV)")
    source.add_argument("--masks", type=Path, help="folder of <label>/<image file name> masks, nonzero = element")
    p.add_argument("--blur", type=float, default=0.0, help="Gaussian blur of the map before scoring, sigma in pixels (default: 0)")
    p.add_argument("--before", type=Path, default=None,
                   help="another run scored the same way (e.g. the pretrained model's typicality), shown side by side")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_localize)
    return p


def _note_unmatched(run: Run, unmatched: list[str]) -> None:
    if unmatched:
        print(printable(f"{len(unmatched)} entries match no image with typicality in {run.path}, e.g. "
                        f"{', '.join(unmatched[:SHOW_UNMATCHED])}"), file=sys.stderr)  # names from the boxes file


def localize_run(run: Run, boxes=None, masks=None, blur: float = 0.0, before=None) -> tuple[dict, dict]:
    """Score, summarise and write RUN/localize/; returns the summary and what the lineage record notes."""
    per_region, computed, unmatched = localize(run, boxes, masks, blur)
    _note_unmatched(run, unmatched)
    result = summary(per_region)
    if before is not None:
        before_run = open_run(before)
        before_regions, _, before_unmatched = localize(before_run, boxes, masks, blur)
        _note_unmatched(before_run, before_unmatched)
        result["before"] = summary(before_regions)
    write_results(run, per_region, computed, result)
    return result, {"regions": len(per_region), "computed_maps": len(computed), "unmatched": len(unmatched)}


def cmd_localize(args) -> dict:
    from .pipeline import localize_step

    with json_alone(args.json):
        result = localize_step(open_run(args.run), args.boxes, args.masks, args.blur, args.before,
                               force=getattr(args, "force", False))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return result


__all__ = ["scale_boxes", "boxes_mask", "blur_map", "region_scores", "read_boxes", "ImageNames", "localize",
           "score_run", "computed_latent_maps", "summary", "format_table", "report_section", "add_parser", "cmd_localize"]
