"""Discriminative patch mining: the Doersch et al. 2013 baseline ("What makes Paris look like Paris?").

As the diffusion-mining authors reimplemented it in Python (and compare with in their paper):

1. features: every patch of ``patch`` px on a ``stride``-px grid (optionally on an image pyramid,
   ``scales``) is described by HOG (scikit-image ``hog``: ``orientations`` = 31 bins, cells of
   ``stride`` px, one block = the whole patch, L2-Hys block normalisation) and Lab colour
   (scikit-image ``rgb2lab``: the a and b channels averaged per HOG cell, mapped by
   ``(v + 128) / 255``), concatenated and L2-normalised. With ``c = patch / stride`` cells per side
   that is ``c^2 * (orientations + 2)`` dims: at the default 64 px / 8 px, 8 x 8 cells x 31 HOG
   bins = 1,984 + 8 x 8 x 2 Lab = 128, **2,112 dims** (the authors' number). The stride is the
   HOG cell side, so ``patch`` must be a multiple of ``stride``.
2. seeds: ``seeds`` random patches of the positive images (round-robin over images), dropping
   low-contrast ones (gradient energy below the ``contrast_quantile`` quantile of the positive
   patches).
3. seeding: the nearest neighbours of each seed among all patches of all images (scikit-learn
   ``NearestNeighbors``, Euclidean on unit vectors = cosine), at most one per image; seeds are
   ranked by how many of their top ``neighbors`` are on positive images, and greedily kept unless
   a kept detector's neighbours overlap theirs heavily (more than ``redundancy_overlaps`` shared
   images with IoU > ``redundancy_iou`` among the top ``redundancy_neighbors``), until
   ``detectors`` are kept.
4. training: positive and negative images are split into ``folds``; for fold i, a linear SVM
   (scikit-learn ``LinearSVC``, C = 0.1) is trained on the current detector's ``top_positives``
   best detections (one per image) in positive fold i against ``max(negatives_max - hard,
   negatives_min)`` random patches of negative fold i plus the hard negatives gathered so far;
   then the negative fold is searched with the new detector and its patches scoring above
   ``hard_negative_margin`` become hard negatives for the next fold.
5. ranking: every image is searched (best patch per image); a detector's discriminativeness is
   the share of positive images among its ``top_detections`` (100) best detections; detectors are
   ranked by it (ties: seed rank). Each detector's ``examples`` best detections on positive images
   are written (one per image).

The output ``RUN/baselines/doersch/patches.parquet`` has the columns of the typicality cluster
table (``RUN/clusters/patches.parquet``) so the report and evaluation treat both alike: one
"cluster" per detector (``cluster`` = ``cluster_rank``, 0 = most discriminative),
``typicality`` = the SVM score of the detection, plus ``discriminativeness``.

Sizing (``preset``): the paper's 25,000 seeds and 1,000 detectors were set for thousands of
positive images at several scales (millions of patches; 25,000 seeds are well under 1% of them).
On a small collection they cost far more than they tell: 120 images of 64 px listed at 256 px
(30 positives of 625 patches per label) took > 25 minutes on 2 cores, ~14,000 seeds per label
searched against 75,000 patches and 1,212 SVMs of ~19,000 samples. The default preset ``data``
sizes both to each label's positive patches P:

    seeds     = min(25,000, ceil(seed_share * P))                (seed_share = 0.02)
    detectors = min(1,000, max(min(seeds, 5), seeds // seeds_per_detector))   (25: the paper's ratio)

and each SVM gets 2,000-5,000 random negatives (plus the hard ones, at most 5,000) instead of
the paper's 10,000-25,000: an SVM's cost grows with its samples (liblinear copies them; 14 s at
18,750, 2.6 s at 5,000 on a busy 2-core machine). So seeding grows as P x all patches x 0.02 and
training as detectors x folds SVMs of at most 5,005 samples (benchmarks/README.md has the time and
the quality of both presets). ``--preset paper`` restores 25,000 seeds, 1,000 detectors and
10,000-25,000 negatives; an explicit ``--seeds`` / ``--detectors`` / ``--negatives-*`` wins over
either preset. Before mining
the plan is printed (seeds, detectors, SVMs per label) with an ETA from one SVM timed on this
machine's data.

Resume: labels are mined one after the other, each from its own random stream
(``[seed, label's index]``), so each label's detections are a result of their own. A finished
label's are written at once, atomically, to ``RUN/baselines/doersch/labels/DIGEST.parquet`` (a
digest of the label: a label is untrusted text), stamped in the file's Parquet metadata with the
label and with what they were made from (:func:`part_identity`): the identity the lineage record
gives the result of every label with these settings from this listing, and the images the
feature bank left out. An interrupted run (Ctrl-C, a killed job) loses only the label it was
mining. The next call rebuilds the feature bank, reads every label whose part carries the
identity it has now, prints ``doersch: resuming: N of M labels already mined`` and mines the
others: the same table, bit for bit, as a run never interrupted. Rebuilding the bank is one
decode and HOG pass: for the 120 images listed at 256 px above (preset data, 1 thread, alone on
a 2-core Intel Xeon), 8.6 s of a resume that took 41.6 s after 3 of 4 labels, where the whole
run took 144.5 s, 123.8 s of it SVMs (benchmarks/README.md, ``doersch_resume.py``). A part made
with other settings, from another listing or from another bank (an image unreadable then, read now) is never reused: it is mined again, and the parts of
other identities are removed once the result is written (the pipeline replaces a result made
otherwise only on ``--force`` or once its listing changed). ``patches.parquet`` is the parts in
label order; they are kept beside it, because ``--positive LABEL`` reads and writes the same
parts (a part's identity leaves ``--positive`` out): a full run reuses the labels mined one by
one, and ``--positive LABEL`` after a full run reads its label's.

Memory: the patch features of every image are held in memory, float32:
images x positions per image x dims x 4 bytes (e.g. 120 images of 256 px at the defaults,
625 positions (25 x 25) x 2,112 dims: 604 MiB; 3,200 such images would need 16 GiB). Time: the seeding search is seeds x all patches; training is
detectors x folds SVMs of at most ``negatives_max + top_positives`` samples each.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from ..atomic import write_json, write_table
from ..data import BadImage, Dataset, Problem, iter_images, listed_of
from ..flags import add_config, add_run_args
from ..lineage import digest, identity_of
from ..rundir import Run
from ..terminal import printable

OUTPUT = Path("baselines") / "doersch"
PARTS = "labels"  # RUN/baselines/doersch/labels/: one finished label's detections per file (module doc, Resume)
PART_METADATA = b"diffmine.doersch"  # a part's Parquet schema metadata key: what it was made from
RESULT = "baseline-doersch"  # the result's name in the run's lineage record
EXECUTION = ("workers",)  # settings that only say how the work is executed: no part of the detections
PRESETS = ("data", "paper")
PAPER_SEEDS, PAPER_DETECTORS = 25_000, 1_000
PRESET_NEGATIVES = {"data": (2_000, 5_000), "paper": (10_000, 25_000)}  # random negatives per SVM, at least / at most
MIN_DETECTORS = 5  # preset data: never fewer (unless there are fewer seeds)
COLUMNS = ["image_id", "label", "x0", "y0", "x1", "y1", "typicality", "kind", "cluster", "cluster_rank",
           "rank_in_cluster", "distance", "cluster_median", "discriminativeness"]


@dataclass
class DoerschConfig:
    patch: int = 64  # patch side in pixels (at every pyramid scale)
    stride: int = 8  # grid step in pixels = HOG cell side; patch must be a multiple of it
    scales: tuple[float, ...] = (1.0,)  # image pyramid, e.g. (1.0, 0.75, 0.5)
    orientations: int = 31  # HOG orientation bins
    preset: str = "data"  # data: seeds and detectors sized to each label's positive patches; paper: 25,000 / 1,000
    seeds: int = 0  # random seed patches from the positive images; 0: the preset's
    seed_share: float = 0.02  # preset data: seeds = this share of the label's positive patches
    seeds_per_detector: int = 25  # preset data: detectors = seeds / this (the paper's 25,000 / 1,000)
    contrast_quantile: float = 0.25  # seeds in this lowest quantile of gradient energy are dropped
    neighbors: int = 20  # seeds are ranked by positives among their top-k neighbours
    redundancy_neighbors: int = 50  # neighbours compared to find redundant detectors
    overfetch: int = 3  # neighbours fetched per kept one (several may fall on one image)
    redundancy_iou: float = 0.3  # a neighbour overlaps a kept detector's above this IoU ...
    redundancy_overlaps: int = 5  # ... and a seed overlapping one on more images than this is dropped
    detectors: int = 0  # detectors kept and trained (at most); 0: the preset's
    folds: int = 3  # cross-validation folds of iterative SVM training
    top_positives: int = 5  # positives per fold: the detector's best detections in the positive fold
    negatives_min: int = 0  # random negatives per SVM, at least ... (0: the preset's, 2,000 / paper 10,000)
    negatives_max: int = 0  # ... and at most, hard negatives included (0: the preset's, 5,000 / paper 25,000)
    hard_negative_margin: float = -1.0  # negative patches scoring above this become hard negatives
    C: float = 0.1  # LinearSVC regularisation
    svm_max_iter: int = 2000
    top_detections: int = 100  # discriminativeness: share of positives among this many detections
    examples: int = 8  # detections kept per detector (positive images, one per image)
    batch_size: int = 64  # detectors searched at once (bounds the score matrix)
    workers: int = 0  # image-decoding processes
    seed: int = 0

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        # concrete negatives (and, for the paper, seeds and detectors): the run's record says what was mined
        low, high = PRESET_NEGATIVES[self.preset]
        self.negatives_min, self.negatives_max = self.negatives_min or low, self.negatives_max or high
        if self.preset == "paper":
            self.seeds, self.detectors = self.seeds or PAPER_SEEDS, self.detectors or PAPER_DETECTORS
        if self.seeds < 0 or self.detectors < 0:
            raise ValueError("seeds and detectors must be >= 0 (0: sized by the preset)")
        if not 0 < self.seed_share <= 1 or self.seeds_per_detector < 1:
            raise ValueError(f"seed_share must be in (0, 1] and seeds_per_detector >= 1, got {self.seed_share}, "
                             f"{self.seeds_per_detector}")
        self.scales = tuple(float(s) for s in (self.scales if isinstance(self.scales, (list, tuple)) else [self.scales]))
        if self.stride < 1 or self.patch < self.stride or self.patch % self.stride:
            raise ValueError(f"patch ({self.patch}) must be a positive multiple of stride ({self.stride}), the HOG cell side")
        if not self.scales or any(not 0 < s <= 4 for s in self.scales):
            raise ValueError(f"scales must be in (0, 4], got {self.scales}")
        if not 0 <= self.contrast_quantile < 1:
            raise ValueError(f"contrast_quantile must be in [0, 1), got {self.contrast_quantile}")
        if self.folds < 1:
            raise ValueError("folds must be >= 1")
        if self.negatives_min < 0 or self.negatives_min > self.negatives_max:
            raise ValueError(f"need 0 <= negatives_min <= negatives_max, got {self.negatives_min}, {self.negatives_max}")
        for name in ("neighbors", "redundancy_neighbors", "overfetch", "top_positives",
                     "top_detections", "examples", "batch_size", "orientations", "svm_max_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.workers < 0 or not 0 < self.C < math.inf:
            raise ValueError(f"workers must be >= 0 and C > 0, got {self.workers}, {self.C}")

    def sized(self, positive_patches: int) -> tuple[int, int]:
        """(seeds, detectors) for a label with this many positive patches (module doc, Sizing)."""
        seeds = self.seeds or min(PAPER_SEEDS, max(1, math.ceil(self.seed_share * positive_patches)))
        detectors = self.detectors or min(PAPER_DETECTORS, max(min(seeds, MIN_DETECTORS), seeds // self.seeds_per_detector))
        return seeds, detectors

    @property
    def cells(self) -> int:
        """HOG cells per patch side."""
        return self.patch // self.stride

    @property
    def dims(self) -> int:
        """Feature length: cells^2 x (orientations HOG bins + 2 Lab channels); 2,112 at the defaults."""
        return self.cells ** 2 * (self.orientations + 2)


# --------------------------------------------------------------------------------------------
# features


def patch_features(image: np.ndarray, config: DoerschConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HOG + Lab of every patch of one image, on every pyramid scale.

    Args:
        image: (H, W, 3) uint8
    Returns:
        features: (P, dims) float32, unit L2 norm
        boxes: (P, 4) int32, x0, y0, x1, y1 in pixels of ``image`` (x1, y1 exclusive)
        energy: (P,) float32, mean squared gradient magnitude over the patch (contrast filter)
    """
    from PIL import Image
    from skimage.color import rgb2lab
    from skimage.feature import hog

    H, W = image.shape[:2]
    cell, k = config.stride, config.cells
    feats, boxes, energies = [], [], []
    for s in config.scales:
        if s == 1.0:
            img = image
        else:
            h, w = int(round(H * s)), int(round(W * s))
            if min(h, w) < config.patch:
                continue
            img = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
        ncy, ncx = img.shape[0] // cell, img.shape[1] // cell
        if ncy < k or ncx < k:
            continue
        # one block = the whole patch: block (r, c) covers cells r..r+k-1, c..c+k-1 (pixels r*cell ...)
        blocks = hog(img, orientations=config.orientations, pixels_per_cell=(cell, cell), cells_per_block=(k, k),
                     block_norm="L2-Hys", channel_axis=-1, feature_vector=False)
        nby, nbx = blocks.shape[:2]
        hog_f = blocks.reshape(nby * nbx, -1)
        crop = img[: ncy * cell, : ncx * cell]
        ab = rgb2lab(crop)[..., 1:3]
        ab_cells = ab.reshape(ncy, cell, ncx, cell, 2).mean(axis=(1, 3))
        ab_win = np.lib.stride_tricks.sliding_window_view(ab_cells, (k, k), axis=(0, 1))  # (nby, nbx, 2, k, k)
        lab_f = (ab_win.transpose(0, 1, 3, 4, 2).reshape(nby * nbx, -1) + 128.0) / 255.0
        gray = crop.astype(np.float32).mean(axis=-1)
        gy, gx = np.gradient(gray)
        e_cells = (gx * gx + gy * gy).reshape(ncy, cell, ncx, cell).mean(axis=(1, 3))
        energy = np.lib.stride_tricks.sliding_window_view(e_cells, (k, k)).mean(axis=(-2, -1)).reshape(-1)
        r, c = np.mgrid[0:nby, 0:nbx]
        r, c = r.reshape(-1), c.reshape(-1)
        x0 = np.floor(c * cell / s + 0.5).astype(np.int32)
        y0 = np.floor(r * cell / s + 0.5).astype(np.int32)
        side = int(np.floor(config.patch / s + 0.5))  # one box size per scale
        x1, y1 = np.minimum(W, x0 + side), np.minimum(H, y0 + side)
        feats.append(np.concatenate([hog_f, lab_f], axis=1).astype(np.float32))
        boxes.append(np.stack([x0, y0, x1, y1], axis=1))
        energies.append(energy.astype(np.float32))
    if not feats:
        return np.zeros((0, config.dims), np.float32), np.zeros((0, 4), np.int32), np.zeros(0, np.float32)
    features = np.concatenate(feats)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    return features, np.concatenate(boxes), np.concatenate(energies)


@dataclass
class FeatureBank:
    """Patch features of a set of images; the rows of one image are contiguous."""

    image_ids: list[str]
    labels: np.ndarray  # (N,) str, per image
    features: np.ndarray  # (M, dims) float32
    image: np.ndarray  # (M,) int32, image position of each row
    boxes: np.ndarray  # (M, 4) int32, x0 y0 x1 y1
    energy: np.ndarray  # (M,) float32
    offsets: np.ndarray  # (N + 1,) int64: rows of image i are offsets[i]:offsets[i+1]
    problems: list[Problem]
    seconds: float = 0.0

    def rows_of(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows of ``images`` in order, start of each image within them)."""
        counts = self.offsets[np.asarray(images) + 1] - self.offsets[np.asarray(images)]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in images]) if len(images) else np.zeros(0, np.int64)
        return rows, starts


def build_bank(paths: list[str], image_ids: list[str], labels: list[str], resolution: int, config: DoerschConfig,
               resize: str = "square", multiple: int = 1, progress: bool = True, listed: list | None = None) -> FeatureBank:
    """Decode every image at the run's size and describe all its patches; bad images are skipped
    (with ``listed``, a run's (size, mtime_ns, fingerprint) per image, so are images edited since
    they were listed: ``data.load_image``)."""
    t0 = time.time()
    feats, boxes, energies, owner, kept_ids, kept_labels, counts, problems = [], [], [], [], [], [], [], []
    items = iter_images(paths, resolution, resize, multiple, config.workers, listed)
    for pos, item in tqdm(items, total=len(paths), desc="doersch features", unit="img", disable=not progress):
        if isinstance(item, BadImage):
            problems.append(Problem(image_ids[pos], paths[pos], item.problem))
            continue
        f, b, e = patch_features(item, config)
        if not len(f):
            problems.append(Problem(image_ids[pos], paths[pos],
                                    f"image {item.shape[1]}x{item.shape[0]} smaller than the {config.patch}px patch"))
            continue
        owner.append(np.full(len(f), len(kept_ids), np.int32))
        feats.append(f), boxes.append(b), energies.append(e), counts.append(len(f))
        kept_ids.append(image_ids[pos]), kept_labels.append(labels[pos])
    if not feats:
        raise ValueError(f"no usable image: every image was bad or smaller than the {config.patch}px patch "
                         f"(at {resolution}px, try --patch {max(config.stride, resolution // 4 // config.stride * config.stride)})")
    return FeatureBank(kept_ids, np.asarray(kept_labels, dtype=object), np.concatenate(feats), np.concatenate(owner),
                       np.concatenate(boxes).astype(np.int32), np.concatenate(energies),
                       np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), problems, time.time() - t0)


# --------------------------------------------------------------------------------------------
# mining


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of boxes (n, 4) x0 y0 x1 y1 against (n, 4)."""
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, 1)


def sample_seeds(bank: FeatureBank, positives: np.ndarray, config: DoerschConfig, rng: np.random.Generator) -> np.ndarray:
    """Rows of up to ``seeds`` random contrasted patches of the positive images, round-robin over images."""
    rows, _ = bank.rows_of(positives)
    energy = bank.energy[rows]
    threshold = np.quantile(energy, config.contrast_quantile) if config.contrast_quantile > 0 else -np.inf
    keep = energy > threshold
    if not keep.any():  # flat images: nothing beats the quantile
        keep[:] = True
    rows = rows[keep]
    # round-robin: the j-th random patch of every image (images in random order) before any (j+1)-th
    key = rng.random(len(rows))
    image_order = rng.permutation(len(bank.image_ids))
    owner = bank.image[rows]
    by_key = np.lexsort((key, owner))
    rank_in_image = np.empty(len(rows), np.int64)
    firsts = np.r_[0, np.flatnonzero(np.diff(owner[by_key])) + 1]
    sizes = np.diff(np.r_[firsts, len(rows)])
    rank_in_image[by_key] = np.arange(len(rows)) - np.repeat(firsts, sizes)
    order = np.lexsort((image_order[owner], rank_in_image))
    return rows[order[: config.seeds]]


def seed_neighbours(bank: FeatureBank, seeds: np.ndarray, config: DoerschConfig, progress: bool) -> list[np.ndarray]:
    """Per seed: rows of its nearest patches among all images, best first, at most one per image."""
    from sklearn import config_context
    from sklearn.neighbors import NearestNeighbors

    want = max(config.neighbors, config.redundancy_neighbors)
    k = int(min(len(bank.features), want * config.overfetch))
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(bank.features)
    out = []
    chunk = 256
    for start in tqdm(range(0, len(seeds), chunk), desc="doersch seeding", unit="chunk", disable=not progress):
        with config_context(working_memory=256):
            _, idx = nn.kneighbors(bank.features[seeds[start:start + chunk]], n_neighbors=k)
        for row in idx:
            _, first = np.unique(bank.image[row], return_index=True)
            out.append(row[np.sort(first)][:want])
    return out


def select_detectors(bank: FeatureBank, seeds: np.ndarray, neighbours: list[np.ndarray], is_positive: np.ndarray,
                     config: DoerschConfig) -> tuple[list[int], np.ndarray]:
    """Seeds ranked by positives among their top neighbours, redundant ones dropped.

    Returns (indices into ``seeds`` of the kept detectors, best first; per-seed positive count).
    """
    counts = np.array([int(is_positive[bank.image[n[: config.neighbors]]].sum()) for n in neighbours])
    order = np.argsort(-counts, kind="stable")
    kept: list[int] = []
    # every kept detector's neighbours, flat: image, box, which detector
    cap = config.detectors * config.redundancy_neighbors
    kept_img, kept_box, kept_owner, n = np.zeros(cap, np.int64), np.zeros((cap, 4), np.int64), np.zeros(cap, np.int64), 0
    cand_box = np.zeros((len(bank.image_ids), 4), np.int64)  # the candidate's neighbour box per image
    cand_has = np.zeros(len(bank.image_ids), bool)
    for s in order:
        if len(kept) == config.detectors:
            break
        mine = neighbours[s][: config.redundancy_neighbors]
        images = bank.image[mine]
        cand_has[images], cand_box[images] = True, bank.boxes[mine]
        shared = np.flatnonzero(cand_has[kept_img[:n]])
        redundant = False
        if len(shared):
            overlap = _iou(cand_box[kept_img[shared]], kept_box[shared]) > config.redundancy_iou
            redundant = np.bincount(kept_owner[shared[overlap]], minlength=1).max() > config.redundancy_overlaps
        cand_has[images] = False
        if redundant:
            continue
        kept_img[n:n + len(mine)], kept_box[n:n + len(mine)], kept_owner[n:n + len(mine)] = images, bank.boxes[mine], len(kept)
        n += len(mine)
        kept.append(int(s))
    return kept, counts


def _image_max(scores: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(rows, K) scores -> (images, K) best score per image (rows grouped by image from ``starts``)."""
    return np.maximum.reduceat(scores, starts, axis=0)


def _best_rows(scores: np.ndarray, rows: np.ndarray, starts: np.ndarray, k: int, images: np.ndarray) -> np.ndarray:
    """Row of the best patch in each of ``images`` (positions into ``starts``) for detector column k."""
    ends = np.r_[starts[1:], len(rows)]
    return np.array([rows[a + int(np.argmax(scores[a:b, k]))] for a, b in zip(starts[images], ends[images])], np.int64)


def _fit_svm(X: np.ndarray, y: np.ndarray, config: DoerschConfig, seed: int) -> tuple[np.ndarray, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # the primal solver: liblinear's dual one (what "auto" picks for fewer samples than features)
        # shuffles with one C random state for the process, so SVMs fitted on threads at once came
        # out different from run to run (~1e-6); the primal one draws nothing
        svm = LinearSVC(C=config.C, dual=False, max_iter=config.svm_max_iter, random_state=seed).fit(X, y)
    return svm.coef_[0].astype(np.float32), float(svm.intercept_[0])


def svm_jobs() -> int:
    """SVMs fitted at once: torch's thread count (``--threads``, or the usable CPUs)."""
    import torch

    return max(1, torch.get_num_threads())


def _split(items: np.ndarray, folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(items)
    return [np.sort(part) for part in np.array_split(perm, folds)]


def train_detectors(bank: FeatureBank, init: np.ndarray, positives: np.ndarray, negatives: np.ndarray,
                    config: DoerschConfig, rng: np.random.Generator, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Iterative cross-validated SVM training of the detectors ``init`` (K, dims); returns (W, b)."""
    pos_folds, neg_folds = _split(positives, config.folds, rng), _split(negatives, config.folds, rng)
    fold_rows = [(bank.rows_of(p), bank.rows_of(n)) for p, n in zip(pos_folds, neg_folds)]
    K = len(init)
    W, b = init.astype(np.float32).copy(), np.zeros(K, np.float32)
    bar = tqdm(total=K * config.folds, desc="doersch svm", unit="svm", disable=not progress)
    pool = ThreadPoolExecutor(svm_jobs())
    for start in range(0, K, config.batch_size):
        batch = slice(start, min(K, start + config.batch_size))
        hard: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(batch.stop - batch.start)]
        for fold, ((prow, pstart), (nrow, nstart)) in enumerate(fold_rows):
            if not len(prow) or not len(nrow):
                bar.update(batch.stop - batch.start)
                continue
            pscores = bank.features[prow] @ W[batch].T + b[batch]
            pbest = _image_max(pscores, pstart)
            perm = rng.permutation(nrow)

            def fit(j: int):  # reads this fold's arrays: every call ends within the iteration
                top = np.argsort(-pbest[:, j], kind="stable")[: config.top_positives]
                pos_rows = _best_rows(pscores, prow, pstart, j, top)
                n_random = min(len(perm), max(config.negatives_max - len(hard[j]), config.negatives_min))
                neg_rows = np.union1d(perm[:n_random], hard[j])
                X = bank.features[np.r_[pos_rows, neg_rows]]
                y = np.r_[np.ones(len(pos_rows)), -np.ones(len(neg_rows))]
                return _fit_svm(X, y, config, config.seed + fold)

            # liblinear releases the GIL: the batch's SVMs (independent, deterministic: _fit_svm) fit
            # on threads; the result does not depend on their number
            for j, (w, c) in enumerate(pool.map(fit, range(batch.stop - batch.start))):
                W[batch.start + j], b[batch.start + j] = w, c
                bar.update()
            # hard negatives: patches of this negative fold the new detectors score within the margin
            nscores = bank.features[nrow] @ W[batch].T + b[batch]
            for j in range(batch.stop - batch.start):
                above = np.flatnonzero(nscores[:, j] > config.hard_negative_margin)
                above = above[np.argsort(-nscores[above, j], kind="stable")][: config.negatives_max]
                # hardest first, then the ones gathered in earlier folds; at most negatives_max
                merged = np.r_[nrow[above], hard[j]]
                _, first = np.unique(merged, return_index=True)
                hard[j] = merged[np.sort(first)][: config.negatives_max]
            del nscores  # pscores: rebound by the next fold
    pool.shutdown()
    bar.close()
    return W, b


def rank_detectors(bank: FeatureBank, W: np.ndarray, b: np.ndarray, is_positive: np.ndarray, config: DoerschConfig):
    """Search every image with every detector; per detector its discriminativeness and best positive detections."""
    rows, starts = bank.rows_of(np.arange(len(bank.image_ids)))
    out = []
    for start in range(0, len(W), config.batch_size):
        batch = slice(start, min(len(W), start + config.batch_size))
        scores = bank.features @ W[batch].T + b[batch]
        best = _image_max(scores, starts)
        for j in range(batch.stop - batch.start):
            order = np.argsort(-best[:, j], kind="stable")
            top = order[: config.top_detections]
            disc = float(is_positive[top].mean())
            shown = order[is_positive[order]][: config.examples]
            det_rows = _best_rows(scores, rows, starts, j, shown)
            out.append((disc, shown, det_rows, best[shown, j]))
        del scores
    return out


def label_plan(bank: FeatureBank, label: str, config: DoerschConfig) -> dict:
    """What mining ``label`` will do: its positive patches, seeds, detectors (at most) and SVMs (at most)."""
    positives = np.flatnonzero(bank.labels == label)
    patches = int((bank.offsets[positives + 1] - bank.offsets[positives]).sum())
    seeds, detectors = config.sized(patches)
    return {"positive_patches": patches, "seeds": seeds, "detectors": detectors, "svms": detectors * config.folds}


def estimate_seconds(bank: FeatureBank, plans: dict[str, dict], config: DoerschConfig) -> dict:
    """ETA of seeding and SVM training from one seed search and one SVM timed on this bank, now.

    An SVM sees the detector's positives and at most ``negatives_max`` patches of one negative
    fold; the hard-negative search and the final ranking add little (matrix products)."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(config.seed)
    k = int(min(len(bank.features), max(config.neighbors, config.redundancy_neighbors) * config.overfetch))
    probe = bank.features[rng.choice(len(bank.features), min(16, len(bank.features)), replace=False)]
    t0 = time.perf_counter()
    _, near = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank.features).kneighbors(probe)
    per_seed = (time.perf_counter() - t0) / len(probe)
    # an SVM like a detector's: a probe's nearest patches against random negatives of one fold
    negatives = min(config.negatives_max, len(bank.features) // max(1, config.folds))
    positives = near[0][: config.top_positives]
    others = np.setdiff1d(np.arange(len(bank.features)), positives)
    rows = np.r_[positives, rng.choice(others, min(len(others), negatives), replace=False)]
    y = np.r_[np.ones(len(positives)), -np.ones(len(rows) - len(positives))]
    t0 = time.perf_counter()
    _fit_svm(bank.features[rows], y, config, config.seed)
    per_svm = time.perf_counter() - t0
    seeding = per_seed * sum(p["seeds"] for p in plans.values())
    # not divided by the SVMs fitted at once: on a busy machine they barely overlap (120 images:
    # 0.68 s for one SVM alone, 0.80 s per SVM in wall time with 2 at once, plus hard negatives)
    svm = per_svm * sum(p["svms"] for p in plans.values())
    return {"seeding": seeding, "svm": svm, "total": seeding + svm, "per_svm": per_svm, "svm_samples": len(rows)}


def print_plan(plans: dict[str, dict], eta: dict, config: DoerschConfig) -> None:
    for label, p in plans.items():
        print(f"doersch plan: {printable(label)}: {p['positive_patches']} positive patches -> {p['seeds']} seeds, "
              f"<= {p['detectors']} detectors, <= {p['svms']} SVMs ({p['detectors']} x {config.folds} folds)")
    svms = sum(p["svms"] for p in plans.values())
    print(f"doersch plan: <= {svms} SVMs in all (preset {config.preset}); ETA ~{eta['total'] / 60:.1f} min "
          f"(seeding {eta['seeding']:.0f} s, SVMs {eta['svm']:.0f} s: one SVM of {eta['svm_samples']} samples "
          f"took {eta['per_svm']:.2f} s here, {svm_jobs()} at once)", flush=True)


def mine_doersch(source, positive_label: str, config: DoerschConfig = DoerschConfig(), *, resolution: int | None = None,
                 resize: str = "square", progress: bool = True, timings: dict | None = None) -> pd.DataFrame:
    """Mine ``positive_label``'s discriminative patches against all other labels.

    Args:
        source: a :class:`FeatureBank` (reused across labels), a :class:`~diffmine.rundir.Run` with a
            listed dataset, or a :class:`~diffmine.data.Dataset` (then ``resolution`` is needed).
        timings: if given, seconds of each phase (features, seeding, svm) are added to it.
    Returns:
        the cluster-table columns (see module doc), best detector first.
    """
    timings = timings if timings is not None else {}
    bank = _as_bank(source, config, resolution, resize, progress)
    timings["features"] = timings.get("features", 0.0) + bank.seconds
    bank.seconds = 0.0  # counted once
    is_positive = bank.labels == positive_label
    positives, negatives = np.flatnonzero(is_positive), np.flatnonzero(~is_positive)
    if not len(positives) or not len(negatives):
        raise ValueError(f"label {positive_label!r}: needs images of it and of other labels "
                         f"({len(positives)} positive, {len(negatives)} negative)")
    labels = sorted(set(bank.labels))
    rng = np.random.default_rng([config.seed, labels.index(positive_label)])
    plan = label_plan(bank, positive_label, config)
    config = replace(config, seeds=plan["seeds"], detectors=plan["detectors"])

    t0 = time.time()
    seeds = sample_seeds(bank, positives, config, rng)
    neighbours = seed_neighbours(bank, seeds, config, progress)
    kept, _ = select_detectors(bank, seeds, neighbours, is_positive, config)
    timings["seeding"] = timings.get("seeding", 0.0) + time.time() - t0

    t0 = time.time()
    W, b = train_detectors(bank, bank.features[seeds[kept]], positives, negatives, config, rng, progress)
    ranked = rank_detectors(bank, W, b, is_positive, config)
    timings["svm"] = timings.get("svm", 0.0) + time.time() - t0

    order = sorted(range(len(ranked)), key=lambda d: -ranked[d][0])  # stable: ties keep the seed rank
    records = []
    for rank, d in enumerate(order):
        disc, shown, det_rows, scores = ranked[d]
        median = float(np.median(scores)) if len(scores) else float("nan")
        for j, (img, row, score) in enumerate(zip(shown, det_rows, scores)):
            x0, y0, x1, y1 = (int(v) for v in bank.boxes[row])
            records.append((bank.image_ids[img], positive_label, x0, y0, x1, y1, float(score), "top", rank, rank, j,
                            float("nan"), median, disc))
    return _frame(records)


def _frame(records: list) -> pd.DataFrame:
    frame = pd.DataFrame(records, columns=COLUMNS)
    return frame.astype({"x0": "int32", "y0": "int32", "x1": "int32", "y1": "int32", "typicality": "float32",
                         "cluster": "int64", "cluster_rank": "int64", "rank_in_cluster": "int64",
                         "distance": "float32", "cluster_median": "float32", "discriminativeness": "float32"})


# --------------------------------------------------------------------------------------------
# run directory


def _as_bank(source, config: DoerschConfig, resolution: int | None, resize: str, progress: bool) -> FeatureBank:
    if isinstance(source, FeatureBank):
        return source
    if isinstance(source, Run):
        images = source.images()
        dataset = source.step_config("dataset")
        check_size(dataset["resolution"], config)
        return build_bank(list(images["path"]), list(images["image_id"]), list(images["label"]), dataset["resolution"],
                          config, dataset.get("resize", "square"), source.width_multiple(), progress, listed_of(images))
    if isinstance(source, Dataset):
        if resolution is None:
            raise ValueError("mining a Dataset needs the image resolution")
        check_size(resolution, config)
        return build_bank(source.paths, source.image_ids, source.labels, resolution, config, resize, 1, progress)
    raise TypeError(f"expected a FeatureBank, Run or Dataset, got {type(source).__name__}")


def check_size(resolution: int, config: DoerschConfig) -> None:
    """ValueError unless a patch and one stride fit in ``resolution`` px images (the grid needs two
    places a side): before a run is listed, or the baseline's record is written."""
    if resolution < config.patch + config.stride:
        patch = max(4, resolution // 4 // 4 * 4)
        raise ValueError(f"{config.patch}px patches fit at most once in {resolution}px images; mine smaller patches "
                         f"(e.g. --patch {patch} --stride {max(1, patch // 4)}) or list the dataset at a higher --resolution")


def output_dir(run: Run) -> Path:
    return run.path / OUTPUT


def part_identity(settings: dict, listing: str, left_out: list[str]) -> str:
    """What a label's part is made from: the identity the lineage record gives the result of every
    label (no ``--positive``) made with ``settings`` (how it is executed aside) from the listing
    ``listing``, and of the images the feature bank left out (unreadable, changed since listing, too
    small): another bank holds other negatives.

    Without ``--positive`` and with nothing left out it is the record's own identity."""
    settings = {**{k: v for k, v in settings.items() if k not in EXECUTION}, "positive": None}
    return identity_of(RESULT, settings, {"listing": listing}, left_out)


def part_path(run: Run, label: str) -> Path:
    """The file of ``label``'s part, named by a digest: a label is untrusted text ("../x", "a/b")."""
    return output_dir(run) / PARTS / f"{digest(['doersch', label])}.parquet"


def write_part(run: Run, label: str, identity: str, table: pd.DataFrame) -> None:
    """Store one finished label's detections, stamped with what they were made from."""
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    made_from = json.dumps({"identity": identity, "label": label}).encode()
    write_table(arrow.replace_schema_metadata({**arrow.schema.metadata, PART_METADATA: made_from}),
                part_path(run, label))


def read_part(path: Path) -> tuple[dict, pa.Table] | None:
    """A part's stamp ({"identity", "label"}) and rows; None when it is missing or unreadable."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        stamp = json.loads((table.schema.metadata or {})[PART_METADATA])
    except (OSError, ValueError, KeyError):  # gone, damaged, or not a part: mined again
        return None
    return (stamp, table) if isinstance(stamp, dict) else None


def mined_part(run: Run, label: str, identity: str) -> pd.DataFrame | None:
    """``label``'s stored detections when they were made from exactly what mining it now would use."""
    part = read_part(part_path(run, label))
    if part is None or part[0] != {"identity": identity, "label": label}:
        return None
    return part[1].to_pandas()


def kept_labels(run: Run) -> tuple[int, int]:
    """For ``diffmine status``: (labels the recorded call, made again, would read from their parts,
    labels it mines), from the record and the images its feature bank left out last time."""
    record = run.lineage.get(RESULT)
    identity = part_identity(record["settings"], record["inputs"].get("listing"), run.skipped_by(RESULT))
    positive = record["settings"].get("positive")
    labels = [positive] if positive is not None else run.labels
    return sum(mined_part(run, label, identity) is not None for label in labels), len(labels)


def remove_other_parts(run: Run, identity: str) -> None:
    """Remove the parts made from other settings, another listing or another bank: never reused.

    Called once the result is written: the result they belonged to is replaced, which the
    pipeline (``lineage.plan``) allows only on ``--force`` or once what it was made from changed."""
    for path in sorted((output_dir(run) / PARTS).glob("*.parquet")):
        part = read_part(path)
        if part is None or part[0].get("identity") != identity:
            path.unlink(missing_ok=True)


def run_doersch(run: Run, config: DoerschConfig = DoerschConfig(), positive: str | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Mine every label (or only ``positive``) against all the others; writes RUN/baselines/doersch/.

    Resumes: a label whose part was made from what mining it now would use is read, not mined
    (module doc, Resume)."""
    dataset = run.step_config("dataset")
    labels = list(dataset["labels"])
    if positive is not None and positive not in labels:
        raise ValueError(f"unknown label {positive!r}; the run has {labels}")
    started = time.time()
    timings: dict[str, float] = {}
    bank = _as_bank(run, config, None, "square", progress)
    timings["features"], bank.seconds = bank.seconds, 0.0  # counted here: a resume with nothing left to mine built it too
    n_features = bank.features.nbytes
    run.report_skipped(RESULT, bank.problems)  # replacing the last run's: fixed ones go
    mined = []
    for label in ([positive] if positive is not None else labels):
        if label not in set(bank.labels):
            print(f"doersch: no usable image of {label!r}; skipped")
            continue
        mined.append(label)
    identity = part_identity(asdict(config), run.fresh("listing")["identity"], [p.image_id for p in bank.problems])
    frames = {label: part for label in mined if (part := mined_part(run, label, identity)) is not None}
    if frames:
        print(f"doersch: resuming: {len(frames)} of {len(mined)} labels already mined")
    todo = [label for label in mined if label not in frames]
    plans = {label: label_plan(bank, label, config) for label in mined}
    eta = estimate_seconds(bank, {label: plans[label] for label in todo}, config) if todo else {"total": 0.0}
    if todo:
        print_plan({label: plans[label] for label in todo}, eta, config)
    for label in todo:
        frames[label] = mine_doersch(bank, label, config, progress=progress, timings=timings)
        write_part(run, label, identity, frames[label])  # an interrupted run keeps every finished label
    table = pd.concat([frames[label] for label in mined], ignore_index=True) if mined else _frame([])
    out = output_dir(run)
    write_table(pa.Table.from_pandas(table, preserve_index=False), out / "patches.parquet")
    remove_other_parts(run, identity)
    settings = {"config": asdict(config), "dims": config.dims, "labels": [positive] if positive else labels,
                "images": len(bank.image_ids), "patches": int(len(bank.features)), "feature_mb": n_features / 2 ** 20,
                "skipped": len(bank.problems), "plan": plans, "resumed": len(mined) - len(todo),
                "eta_seconds": round(eta["total"], 1), "seconds": {**{k: round(v, 3) for k, v in timings.items()},
                                                                   "total": round(time.time() - started, 3)}}
    write_json(out / "settings.json", settings)  # with sizes and timings; lineage.json holds its identity
    del bank
    return table


# --------------------------------------------------------------------------------------------
# command line: `diffmine baseline doersch --data DIR --run RUN [--positive LABEL] [options]`

HELP = {
    "patch": "patch side in pixels", "stride": "grid step in pixels (= HOG cell side; patch must be a multiple)",
    "scales": "image pyramid scales, e.g. 1.0 0.75 0.5", "orientations": "HOG orientation bins",
    "preset": "data: seeds and detectors sized to each label's positive patches (seed share, seeds per detector); "
              "paper: the paper's 25,000 seeds and 1,000 detectors",
    "seeds": "random seed patches from the positive images (0: the preset's)",
    "seed_share": "preset data: seeds = this share of the label's positive patches",
    "seeds_per_detector": "preset data: detectors = seeds / this", "contrast_quantile": "drop seeds in this lowest quantile of gradient energy",
    "neighbors": "rank seeds by positives among their top-k nearest neighbours",
    "redundancy_neighbors": "neighbours compared to drop redundant detectors",
    "overfetch": "neighbours fetched per kept one (several may fall on one image)",
    "redundancy_iou": "IoU above which a neighbour overlaps a kept detector's",
    "redundancy_overlaps": "drop a seed overlapping a kept detector on more images than this",
    "detectors": "detectors kept and trained, at most (0: the preset's)", "folds": "cross-validation folds of SVM training",
    "top_positives": "positives per fold (the detector's best detections)", "negatives_min": "random negatives per SVM, at least (0: the preset's: 2,000; paper 10,000)",
    "negatives_max": "negatives per SVM (random + hard), at most (0: the preset's: 5,000; paper 25,000)", "hard_negative_margin": "negatives scoring above this are hard",
    "C": "LinearSVC C", "svm_max_iter": "LinearSVC max_iter", "top_detections": "discriminativeness = positives among this many detections",
    "examples": "detections written per detector", "batch_size": "detectors searched at once", "workers": "image-decoding processes",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``baseline`` (with its ``doersch`` sub-command) to the CLI's sub-parsers."""
    baseline = subparsers.add_parser("baseline", help="baseline miners to compare typicality with",
                                     description="Baseline data-mining methods, written to RUN/baselines/<name>/.")
    methods = baseline.add_subparsers(dest="baseline", required=True, metavar="METHOD")
    p = methods.add_parser("doersch", help="discriminative patches (Doersch et al. 2013): HOG+Lab, seeds, iterative SVMs",
                           description="Mine each label's discriminative patches against the other labels; writes "
                                       "RUN/baselines/doersch/patches.parquet (cluster-table columns) and settings.json.")
    p.add_argument("--data", type=Path, default=None, help="the dataset, as `train --data` takes it (needed when the run has none listed)")
    add_run_args(p)
    p.add_argument("--positive", default=None, help="mine only this label (default: every label)")
    p.add_argument("--resolution", type=int, default=256, help="image side when listing a new run (default: 256)")
    p.add_argument("--resize", default="square", choices=["square", "keep-aspect"], help="resize mode when listing a new run")
    p.add_argument("--prompt", default="An image of {label}.", help=argparse.SUPPRESS)
    p.add_argument("--null-prompt", default="An image.", help=argparse.SUPPRESS)
    add_config(p, DoerschConfig, help=HELP)
    return baseline


__all__ = ["DoerschConfig", "FeatureBank", "patch_features", "build_bank", "check_size", "mine_doersch", "run_doersch", "add_parser"]
