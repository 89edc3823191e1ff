"""Exports of a run's clustered patches for the tools researchers use elsewhere.

    diffmine export --run RUN --format coco --out DIR [--copy-images]
    diffmine export --run RUN --format hf   --out DIR
    diffmine export --run RUN --format csv  --out DIR

coco: DIR/annotations.json, COCO detection format: one image entry per source image with
      clustered patches, one annotation per clustered patch (bbox = [x, y, width, height], score
      = typicality), one category per cluster named "LABEL/cluster-RANK" (RANK 0 = the label's
      most typical cluster; supercategory = the label). Boxes are in pixels of the image at the
      run's size (its resolution and resize), which width/height give; with --copy-images those
      images are written to DIR/images/ and file_name points there, else file_name is the path
      relative to the dataset root (then the boxes match the originals only when they are of the
      run's size). FiftyOne (COCODetectionDataset) and pycocotools read it.
hf:   a Hugging Face ``datasets`` folder (``datasets.load_from_disk(DIR)``): one row per patch with
      image (the crop), image_id, label, cluster, cluster_rank, rank_in_cluster, typicality, box.
csv:  DIR/patches.csv, one row per patch, the same columns less the crop, plus the image's path.
      A text cell that a spreadsheet would run as a formula (it starts with =, +, -, @, a tab or
      a carriage return: labels and file names are user text) is written with a leading ``'``.

Every export folder holds ``diffmine-export.json`` (what wrote it). An existing folder is written
over only when it is empty or holds that marker: a folder of the user's own (say, a ``datasets``
folder they saved) is refused, never replaced. An export is written whole into a new folder beside
``--out`` and then put in its place: nothing of an earlier export stays in it.

The patches come from ``run.patches()``, which refuses stale clusters. Every clustered image must
still hold the bytes the listing fingerprinted (``data.changed_since_listing``): the boxes are its
boxes only then, and a received run whose images.parquet names another file (``/home/me/x.png``)
gets a one-line refusal, not a copy of that file. An export lies outside the run and is not part
of its lineage.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

from . import __version__
from .atomic import atomic_write, current_umask, write_json, write_text
from .data import CHANGED, changed_since_listing
from .images import RunImages
from .rundir import Run, RunError
from .terminal import shell_word

FORMATS = ("coco", "hf", "csv")
MARKER = "diffmine-export.json"
# OWASP "CSV injection": a cell starting with one of these is a formula to Excel, LibreOffice, Sheets
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
COLUMNS = ["image_id", "label", "cluster", "cluster_rank", "rank_in_cluster", "typicality", "x0", "y0", "x1", "y1"]


def clustered_patches(run: Run) -> pd.DataFrame:
    """Every clustered patch, by label, cluster rank and rank in cluster; RunError when stale or missing."""
    patches = run.patches()
    if "cluster_rank" not in patches.columns:
        raise RunError(f"{run.path}: no clusters yet; run `diffmine cluster --run {shell_word(run.path)}` first")
    return patches.sort_values(["label", "cluster_rank", "rank_in_cluster"], kind="mergesort").reset_index(drop=True)


def check_replaceable(out: Path) -> None:
    """RunError unless ``out`` may be written (over): absent, an empty folder, or an earlier export
    (it holds the MARKER). Anything else is the user's and is kept."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise RunError(f"{out}: not empty and not a diffmine export (no {MARKER}); choose another --out")


def write_marker(folder: Path, run: Run, fmt: str) -> Path:
    """The MARKER that lets a later export replace ``folder``."""
    return write_json(folder / MARKER, {"made_by": f"diffmine {__version__} export", "format": fmt,
                                        "run": str(run.path.resolve())})


def spreadsheet_safe(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with every text cell that starts like a formula prefixed by ``'`` (shown as text)."""
    def safe(value):
        return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value

    text = [c for c in table.columns if table[c].dtype == object or pd.api.types.is_string_dtype(table[c])]
    return table.assign(**{c: table[c].map(safe) for c in text})


def category_name(label: str, rank: int) -> str:
    return f"{label}/cluster-{int(rank)}"


def clustered_image(images: RunImages, name: str) -> np.ndarray:
    """Clustered image ``name`` at the run's size; RunError naming the file and the problem when it
    cannot be read or is no longer the image the listing fingerprinted (its boxes would not be its)."""
    array = images.get(name)
    if array is None:
        problem = images.problems.get(name)
        what = f"{problem.path}: {problem.problem}" if problem else f"{images.paths.get(name, name)}: cannot be read"
        raise RunError(f"{what}; the export needs every clustered image")
    return array


def check_unchanged(images: RunImages, names) -> None:
    """RunError naming the first of the images ``names`` that changed since it was listed (a csv
    export names the files, and its boxes are theirs only while they hold the listed bytes)."""
    for name in names:
        if name in images.paths and changed_since_listing(images.paths[name], images.listed[name]):
            raise RunError(f"{images.paths[name]}: {CHANGED}; the export needs every clustered image")


def _relative(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def coco(run: Run, out: Path, copy_images: bool = False) -> Path:
    """Write DIR/annotations.json (and DIR/images/ with ``copy_images``); returns the JSON's path."""
    patches = clustered_patches(run)
    images = RunImages(run)
    keys = patches[["label", "cluster_rank"]].drop_duplicates().sort_values(["label", "cluster_rank"])
    categories = [{"id": i + 1, "name": category_name(r.label, r.cluster_rank), "supercategory": r.label}
                  for i, r in enumerate(keys.itertuples())]
    category_id = {c["name"]: c["id"] for c in categories}
    entries, image_id = [], {}
    for number, name in enumerate(patches["image_id"].drop_duplicates(), start=1):
        array = clustered_image(images, name)
        if copy_images:
            file_name = f"images/{number:07d}.png"
            atomic_write(out / file_name, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
        else:
            file_name = _relative(images.paths[name], run.dataset_root)
        image_id[name] = number
        entries.append({"id": number, "file_name": file_name, "width": int(array.shape[1]), "height": int(array.shape[0]),
                        "diffmine_image_id": name})
    annotations = []
    for number, r in enumerate(patches.itertuples(), start=1):
        w, h = int(r.x1 - r.x0), int(r.y1 - r.y0)
        annotations.append({"id": number, "image_id": image_id[r.image_id],
                            "category_id": category_id[category_name(r.label, r.cluster_rank)],
                            "bbox": [int(r.x0), int(r.y0), w, h], "area": w * h, "iscrowd": 0,
                            "score": float(r.typicality), "rank_in_cluster": int(r.rank_in_cluster)})
    dataset = run.step_config("dataset")
    info = {"description": f"diffmine clusters of {run.path.name}", "resolution": dataset["resolution"],
            "resize": dataset["resize"], "boxes": "pixels of the image at the run's size (width, height)"}
    return write_json(out / "annotations.json", {"info": info, "images": entries, "annotations": annotations,
                                                 "categories": categories})


def csv(run: Run, out: Path) -> Path:
    patches = clustered_patches(run)
    images = RunImages(run)
    check_unchanged(images, patches["image_id"].drop_duplicates())
    paths = images.paths
    table = patches[COLUMNS].assign(path=[_relative(paths[i], run.dataset_root) for i in patches["image_id"]])
    # RFC 4180 line ends: with them the writer quotes a cell holding a carriage return, which a
    # "\n" line end leaves bare (and a reader then splits the row there)
    return write_text(out / "patches.csv", spreadsheet_safe(table).to_csv(index=False, lineterminator="\r\n"))


def hf(run: Run, out: Path) -> Path:
    """A ``datasets.Dataset`` saved to the folder ``out``; returns it."""
    try:
        import datasets
    except ImportError:
        raise RunError("--format hf needs the `datasets` package: pip install 'diffmine[hf]'") from None
    patches = clustered_patches(run)
    images = RunImages(run)
    crops = [Image.fromarray(np.ascontiguousarray(clustered_image(images, r.image_id)[r.y0:r.y1, r.x0:r.x1]))
             for r in patches.itertuples()]
    features = datasets.Features({
        "image": datasets.Image(), "image_id": datasets.Value("string"), "label": datasets.Value("string"),
        "cluster": datasets.Value("int32"), "cluster_rank": datasets.Value("int32"),
        "rank_in_cluster": datasets.Value("int32"), "typicality": datasets.Value("float32"),
        "box": datasets.Sequence(datasets.Value("int32"), length=4)})
    table = datasets.Dataset.from_dict({
        "image": crops, "image_id": patches["image_id"].tolist(), "label": patches["label"].tolist(),
        "cluster": patches["cluster"].astype(int).tolist(), "cluster_rank": patches["cluster_rank"].astype(int).tolist(),
        "rank_in_cluster": patches["rank_in_cluster"].astype(int).tolist(),
        "typicality": patches["typicality"].astype(float).tolist(),
        "box": patches[["x0", "y0", "x1", "y1"]].astype(int).to_numpy().tolist()}, features=features)
    table.save_to_disk(str(out))
    return out


def _written_whole(out: Path, run: Run, fmt: str, write: Callable[[Path], Path]) -> Path:
    """``write(folder)`` into a new folder beside ``out``, marked, then renamed over ``out`` (absent,
    empty or an earlier export: see ``check_replaceable``), so that nothing of an earlier export
    (a coco export's images/ under a csv one) stays, and a failed export leaves ``out`` as it was.
    Returns what ``write`` returned, at its place in ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # a folder of our own with a unique name: nothing of the user's beside ``out`` is touched
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; an export is shared as the umask says
        written = write(tmp)
        write_marker(tmp, run, fmt)
        check_replaceable(out)  # again: the folder may have changed while the export was written
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / written.relative_to(tmp)


def export(run: Run, fmt: str, out: str | Path, copy_images: bool = False) -> Path:
    """Write the run's clustered patches to ``out`` in format ``fmt`` (coco | hf | csv)."""
    # the folder itself, named from outside it: the export is swapped in beside it (``--out .`` had
    # its temporary folder inside, and removed an earlier export with it; a link is no folder to replace)
    out = Path(out).resolve()
    if out.is_relative_to(run.path.resolve()):
        raise RunError(f"{out}: an export goes outside the run directory {run.path}")
    if fmt not in FORMATS:
        raise RunError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    if copy_images and fmt != "coco":
        raise RunError("--copy-images is for --format coco (hf holds the crops, csv the paths)")
    check_replaceable(out)
    writers = {"coco": lambda folder: coco(run, folder, copy_images), "hf": lambda folder: hf(run, folder),
               "csv": lambda folder: csv(run, folder)}
    return _written_whole(out, run, fmt, writers[fmt])
