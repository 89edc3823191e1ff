"""Labeled image collections: listing, validation, decoding and resizing.

A dataset is either a folder with one sub-folder per label, or a manifest (.csv with a header,
or .jsonl) with ``path`` and ``label`` fields, paths relative to the manifest's folder. Every
image is named by its ``image_id``: its path relative to the dataset root, with forward slashes
(``norland/img_0001.png``).

Bad input never stops a run: listing returns the good records and a list of problems, and
decoding raises :class:`BadImage` (file and problem named) for the caller to record and skip.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Larger images are refused rather than decoded (a 40k x 40k PNG would take GBs of RAM).
MAX_PIXELS = 64_000_000


class DatasetError(ValueError):
    """The dataset as a whole cannot be used (no labels, one label, unreadable manifest...)."""


class BadImage(ValueError):
    """One image cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem

    def __reduce__(self):  # crosses process boundaries from DataLoader workers
        return BadImage, (self.path, self.problem)


@dataclass(frozen=True)
class Problem:
    image_id: str
    path: str
    problem: str


@dataclass
class Dataset:
    root: Path
    image_ids: list[str]
    paths: list[str]  # absolute
    labels: list[str]
    problems: list[Problem]

    @property
    def label_names(self) -> list[str]:
        return sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.image_ids)

    def table(self) -> pa.Table:
        return pa.table({
            "index": pa.array(range(len(self)), pa.int64()),
            "image_id": self.image_ids,
            "path": self.paths,
            "label": self.labels,
        })


def _scan_folder(root: Path) -> tuple[list[tuple[str, str]], list[Problem]]:
    rows, problems = [], []
    label_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for label_dir in label_dirs:
        for path in sorted(label_dir.rglob("*")):
            if path.is_dir() or path.name.startswith("."):
                continue
            image_id = path.relative_to(root).as_posix()
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                problems.append(Problem(image_id, str(path), f"not an image file extension ({path.suffix or 'none'})"))
                continue
            rows.append((image_id, label_dir.name))
    return rows, problems


def _read_manifest(manifest: Path) -> list[dict]:
    try:
        if manifest.suffix.lower() == ".jsonl":
            entries = []
            for n, line in enumerate(manifest.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DatasetError(f"{manifest}: line {n} is not JSON ({exc.msg})") from None
            return entries
        with manifest.open(newline="") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise DatasetError(f"{manifest}: not a text manifest") from None


def _scan_manifest(manifest: Path) -> tuple[list[tuple[str, str]], list[Problem]]:
    root = manifest.parent.resolve()
    entries = _read_manifest(manifest)
    if entries and not {"path", "label"} <= set(entries[0]):
        raise DatasetError(f"{manifest}: needs 'path' and 'label' columns, found {sorted(entries[0])}")
    rows, problems, seen = [], [], set()
    for n, entry in enumerate(entries, 1):
        raw, label = str(entry.get("path") or "").strip(), str(entry.get("label") or "").strip()
        where = f"{manifest.name} row {n}"
        if not raw:
            problems.append(Problem(f"<{where}>", "", f"{where}: empty path"))
            continue
        path = (root / raw).resolve()
        try:
            image_id = path.relative_to(root).as_posix()
        except ValueError:
            problems.append(Problem(raw, str(path), f"{where}: path points outside the dataset root {root}"))
            continue
        if not label:
            problems.append(Problem(image_id, str(path), f"{where}: empty label"))
        elif not path.is_file():
            problems.append(Problem(image_id, str(path), f"{where}: file not found"))
        elif image_id in seen:
            problems.append(Problem(image_id, str(path), f"{where}: listed twice"))
        else:
            seen.add(image_id)
            rows.append((image_id, label))
    return rows, problems


def scan_dataset(source: str | Path, labels: list[str] | None = None, min_labels: int = 2) -> Dataset:
    """List a dataset folder or manifest.

    Args:
        source: a folder of label sub-folders, or a .csv/.jsonl manifest.
        labels: if given, the labels a model knows; images of any other label are reported as
            problems ("unknown label") instead of listed.
        min_labels: typicality contrasts a label with the null prompt learned on all labels, so
            a collection of one label has nothing to contrast.
    """
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"{source}: no such dataset folder or manifest")
    if source.is_dir():
        root = source.resolve()
        rows, problems = _scan_folder(root)
    elif source.suffix.lower() in (".csv", ".jsonl"):
        root = source.parent.resolve()
        rows, problems = _scan_manifest(source)
    else:
        raise DatasetError(f"{source}: expected a folder of label sub-folders or a .csv/.jsonl manifest")
    if labels is not None:
        known = set(labels)
        problems += [Problem(i, str(root / i), f"unknown label {l!r} (the model knows {sorted(known)})")
                     for i, l in rows if l not in known]
        rows = [(i, l) for i, l in rows if l in known]
    found = sorted({l for _, l in rows})
    if not rows:
        raise DatasetError(f"{source}: no images found (expected <label>/<image> files or a manifest)")
    if len(found) < min_labels:
        raise DatasetError(
            f"{source}: found {len(found)} label ({', '.join(map(repr, found))}); typicality contrasts each "
            f"label with the null prompt learned over all labels, so at least {min_labels} labels are needed")
    return Dataset(root, [i for i, _ in rows], [str(root / i) for i, _ in rows], [l for _, l in rows], problems)


# --------------------------------------------------------------------------------------------
# decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha is composited over white, 16-bit is scaled, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def target_size(width: int, height: int, resolution: int, resize: str, multiple: int) -> tuple[int, int]:
    """(width, height) an image is resized to.

    ``square``: resolution x resolution. ``keep-aspect``: height = resolution, width scaled and
    rounded to a multiple of ``multiple`` (the backend's latent factor), as the paper does for
    cars at height 256.
    """
    if resize == "square":
        return resolution, resolution
    if resize == "keep-aspect":
        w = max(multiple, int(round(width * resolution / height / multiple)) * multiple)
        return w, resolution
    raise ValueError(f"unknown resize mode {resize!r} (square, keep-aspect)")


def load_image(path: str | Path, resolution: int, resize: str = "square", multiple: int = 1) -> np.ndarray:
    """Decode, convert to RGB and resize one image.

    Returns:
        (H, W, 3) uint8 array at the run's size.
    Raises:
        BadImage: missing, empty, corrupt, truncated or oversized files.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(path, f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        raise BadImage(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadImage(path, f"image too large ({img.width}x{img.height} > {MAX_PIXELS} pixels)")
                img = ImageOps.exif_transpose(img)
                img.load()
                rgb = _to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(path, f"image too large (over {MAX_PIXELS} pixels)") from None
    except Exception as exc:  # PIL raises many types for broken files
        raise BadImage(path, f"cannot decode image ({type(exc).__name__}: {exc})") from None
    w, h = target_size(rgb.width, rgb.height, resolution, resize, multiple)
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def to_model_input(images: np.ndarray) -> "torch.Tensor":
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the range diffusion models expect."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a Parquet file atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


class _Decoder:
    """Picklable per-item decoder for DataLoader workers: index -> (index, image or BadImage)."""

    def __init__(self, paths: list[str], resolution: int, resize: str, multiple: int):
        self.paths, self.resolution, self.resize, self.multiple = paths, resolution, resize, multiple

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, load_image(self.paths[i], self.resolution, self.resize, self.multiple)
        except BadImage as exc:
            return i, exc


def iter_images(paths: list[str], resolution: int, resize: str = "square", multiple: int = 1, workers: int = 0):
    """Decode images in order, ``workers`` processes prefetching ahead of the consumer.

    Yields ``(position, (H, W, 3) uint8 array)`` or ``(position, BadImage)``; a bad file is
    reported, never raised, so one broken image cannot stop a long run.
    """
    import torch.utils.data

    decoder = _Decoder(paths, resolution, resize, multiple)
    if workers <= 0:
        yield from (decoder[i] for i in range(len(decoder)))
        return
    loader = torch.utils.data.DataLoader(decoder, batch_size=None, num_workers=workers, prefetch_factor=8)
    yield from loader
