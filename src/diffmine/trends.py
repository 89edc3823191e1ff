"""Trends: when did an element appear, and when did it fade, over ordered labels (eras, decades).

For every element cluster of the run (all labels; clusters of at least ``min_size`` members):

- its centroid: the mean of its members' DIFT features, L2-normalised;
- every image of the ordered labels is described once: its DIFT feature map (one UNet pass, its
  own label's prompt, the run's feature settings) pooled over candidate boxes of the mined patch
  side: a grid (stride an eighth of a side; default), or its ``per_image`` most typical boxes
  (greedy, as mined). Its best patch for an element is the candidate nearest to the centroid, its
  best match that similarity;
- the image contains the element when its best match reaches the element's threshold. ``split``
  (default): the threshold splits the best matches of all images of the ordered labels into two
  or three groups, Otsu's cuts (those that maximise the between-group variance), so that an image
  contains the element when its best match lies in the upper group. Three groups when a Gaussian
  per group explains the matches better (AIC) than two: the images without the element often
  part into those with nothing like it (~0.15 on the ordered set) and those with a look-alike,
  another element (~0.5), below the images with it (0.7-0.97), and the two-group cut then fell
  between the first two (benchmarks/README.md, "The standard error of a patch"). It assumes that some images
  contain the element and some do not, as any trend over the order does (an element in every
  image, or in none, is split anyway). ``members``: the ``percentile``-th percentile of the
  cluster's own members' similarity to the centroid of the other members (leave-one-out; nine in
  ten of the patches that define the element would pass it at the 10th) -- a threshold from 3-10
  member boxes, mined where typicality peaks, that new images' best matches rarely reach;
- prevalence in a label: the share of its images that contain the element; typicality: the
  median typicality (under the image's own label, from the run's maps) of the best patches of the
  images that contain it (None where none does).

Elements are sorted by the strength of their trend: Spearman's rho of prevalence against the
order, times the range of prevalence (rising first when positive). Cost: one feature pass per
image and E dot products per candidate box, then one sort of the N best matches per element:
linear in the number of images (up to the sort); no comparison between patches of different
images.

    RUN/trends/trends.json   {"order": [...], "elements": [{"id", "label", "size", "prevalence",
                              "typicality", "members", ...}]}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from skimage.filters import threshold_multiotsu

from .atomic import read_npy, write_json
from .clustering import described
from .data import listed_by_id
from .features import FEATURE_KINDS, FeatureConfig, patch_features
from .mining import greedy_boxes, patch_scores
from .models import Backend


THRESHOLDS = ("split", "members")


@dataclass
class TrendsConfig:
    min_size: int = 3  # clusters with fewer members are not elements (at least 2: see element_centroids)
    # split: the threshold parts all images' best matches into two or three groups (Otsu, the
    # count by AIC) and keeps the upper one; members: the
    # ``percentile``-th percentile of the members' similarity to their centroid (see the module doc)
    threshold: str = "split"
    percentile: float = 10.0
    # step of the grid of candidate boxes in pixels (0: an eighth of the patch side). Fine enough
    # that some box lines up with the feature grid as the mined members did: at half a side, the
    # misalignment alone cost most matches on the ordered test set
    stride: int = 0
    chunk: int = 256  # images whose candidate boxes are held in memory at once
    # grid: every box of a grid; typical: the image's most typical boxes only (greedy, as mined,
    # ``per_image`` of them), where its elements are if typicality found them. On the ordered set
    # (red cross growing, 400 steps, seed 0) the growing element's cluster finds it in an image with
    # AUC 0.99 on the grid, 0.91-0.93 on typical boxes: typicality under the image's own label is
    # low where the element is common, so its boxes are often not among the most typical
    candidates: str = "grid"
    per_image: int = 5

    def __post_init__(self):
        if self.min_size < 2 or not 0.0 <= self.percentile <= 100.0 or self.stride < 0 or self.chunk < 1:
            raise ValueError("need min_size >= 2, 0 <= percentile <= 100, stride >= 0, chunk >= 1")
        if self.candidates not in ("typical", "grid") or self.per_image < 1:
            raise ValueError(f"candidates must be typical or grid (got {self.candidates!r}), per_image >= 1")
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {self.threshold!r}")


def element_centroids(clustered: pd.DataFrame, features: np.ndarray, min_size: int, percentile: float):
    """Per element cluster: unit centroid and threshold.

    Args:
        clustered: the run's clustered top patches, with a ``row`` column into ``features``
        features: (N, C) unit DIFT features of the mined top patches
    Returns:
        groups: [(label, cluster, members frame)]; centroids (E, C); thresholds (E,)
    """
    groups, centroids, thresholds = [], [], []
    for (label, cluster), members in clustered.groupby(["label", "cluster"], sort=True):
        if len(members) < min_size:
            continue
        f = features[members["row"].to_numpy()]
        total = f.sum(0)
        centroid = total / max(float(np.linalg.norm(total)), 1e-12)
        # each member against the centroid of the others: a member counted in its own centroid
        # looks closer than any new image can be (in a cluster of 3, by a third of itself)
        others = total[None] - f
        others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-12)
        groups.append((label, int(cluster), members.sort_values("rank_in_cluster")))
        centroids.append(centroid)
        thresholds.append(float(np.percentile((f * others).sum(1), percentile)))
    if not groups:
        raise ValueError(f"no cluster has {min_size} or more members; lower --min-size")
    return groups, np.stack(centroids), np.array(thresholds)


def two_group_split(values: np.ndarray) -> float:
    """Otsu's threshold of (N,) values, exact: of the cuts between neighbours in sorted order, the
    one that maximises the between-group variance n0 * n1 * (mean0 - mean1)^2, returned as the
    midpoint of the two neighbours (``values >= threshold`` is the upper group). NaN with fewer
    than two distinct finite values."""
    v = np.sort(values[np.isfinite(values)])
    if len(v) < 2 or v[0] == v[-1]:
        return float("nan")
    below = np.arange(1, len(v))  # size of the lower group for each cut
    total = np.cumsum(v)
    mean0 = total[:-1] / below
    mean1 = (total[-1] - total[:-1]) / (len(v) - below)
    between = below * (len(v) - below) * (mean0 - mean1) ** 2
    between[v[1:] == v[:-1]] = -1.0  # equal values stay in one group
    cut = int(np.argmax(between))
    return float((v[cut] + v[cut + 1]) / 2)


def upper_group_cut(values: np.ndarray) -> float:
    """The cut below the upper group of (N,) values parted into two or three groups, whichever
    a Gaussian per group explains better (AIC): three when the images without the element split
    into those with nothing like it and those with a look-alike (another element), two else.
    AIC, not BIC: BIC's penalty (ln N per parameter, 4.4 at 80 images) kept two groups where a
    few images with nothing like the element sat below many look-alikes, and the cut then counted
    the look-alikes as the element; AIC (2 per parameter) split them on the ordered sets and made
    as few errors as BIC on two clean groups, simulated at 80 to 8,000 values (at large N the two
    agree: benchmarks/README.md, "Two or three groups: AIC"). Two
    groups: :func:`two_group_split`; three: the lower of Otsu's two cuts
    (``skimage.filters.threshold_multiotsu``, on a 256-bin histogram), then the exact two-group cut
    of the values above it. NaN with fewer than two distinct finite values."""
    v = values[np.isfinite(values)]
    two = two_group_split(v)
    if np.isnan(two):
        return two
    try:
        three = [float(c) for c in threshold_multiotsu(v, classes=3)]
    except ValueError:  # fewer than three distinct values (after binning): two groups at most
        return two
    if _groups_aic(v, three) >= _groups_aic(v, [two]):
        return two
    upper = two_group_split(v[v >= three[0]])  # the histogram's upper cut, made exact
    return three[1] if np.isnan(upper) else upper


def _groups_aic(values: np.ndarray, cuts: list[float]) -> float:
    """AIC of ``values`` as groups split at ``cuts``, each a Gaussian with its own mean and
    variance, weighted by its share (3 parameters per group); inf if a group has < 2 values."""
    edges, n, log_likelihood = [-np.inf, *cuts, np.inf], len(values), 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        group = values[(values >= low) & (values < high)]
        if len(group) < 2:
            return float("inf")
        log_likelihood += -0.5 * len(group) * np.log(group.var() + 1e-12) + len(group) * np.log(len(group) / n)
    return float(-2 * log_likelihood + 2 * 3 * (len(cuts) + 1))


def element_thresholds(best: np.ndarray, member_thresholds: np.ndarray, rule: str) -> np.ndarray:
    """(E,) match thresholds from (N, E) best matches (NaN for unreadable images) by ``rule``:
    ``split`` (:func:`upper_group_cut` over the images; an element without two distinct values
    keeps its members' threshold) or ``members`` (``member_thresholds``)."""
    if rule == "members":
        return member_thresholds.copy()
    split = np.array([upper_group_cut(best[:, e]) for e in range(best.shape[1])])
    return np.where(np.isnan(split), member_thresholds, split)


def candidate_boxes(height: int, width: int, k: int, stride: int) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 of k x k boxes on a grid of ``stride``, the last row and column
    flush with the image's edge."""
    ys = sorted(set(range(0, height - k + 1, stride)) | {height - k})
    xs = sorted(set(range(0, width - k + 1, stride)) | {width - k})
    return np.array([(x, y, x + k, y + k) for y in ys for x in xs], np.int64)


def typical_boxes(pixel_map: np.ndarray, k: int, n: int) -> np.ndarray:
    """(n', 4) the image's ``n`` most typical k x k boxes, greedy and non-overlapping as mined."""
    return np.array([(x, y, x + k, y + k) for y, x, _ in greedy_boxes(patch_scores(pixel_map, k), k, n)], np.int64)


def trend_strength(prevalence: np.ndarray) -> float:
    """Spearman's rho of prevalence against the order, times its range (0 when flat)."""
    if np.ptp(prevalence) == 0:
        return 0.0
    rho = spearmanr(np.arange(len(prevalence)), prevalence).statistic
    return float(np.nan_to_num(rho) * np.ptp(prevalence))


def check_order(run, order: list[str]) -> None:
    """ValueError unless ``order`` is two or more distinct labels of the run."""
    unknown = [label for label in order if label not in run.labels]
    if len(order) < 2 or unknown or len(set(order)) != len(order):
        raise ValueError(f"--order needs two or more distinct labels of the run ({', '.join(run.labels)}); "
                         f"got {', '.join(map(repr, order))}")


def check_min_size(run, min_size: int) -> None:
    """ValueError unless some cluster of the run has ``min_size`` members: before the stored trends' record is dropped."""
    sizes = run.patches("top").groupby(["label", "cluster"]).size()
    if sizes.empty or sizes.max() < min_size:
        raise ValueError(f"no cluster has {min_size} or more members; lower --min-size")


def trends_settings(order: list[str], config: TrendsConfig) -> dict:
    """What the stored trends were made from, for their record: the order and the settings that
    change the result. Not ``chunk`` (how many images are held at once), nor the candidate setting
    the chosen ``candidates`` does not read (``stride`` for typical boxes, ``per_image`` for the
    grid): changing them keeps the trends up to date."""
    unused = {"grid": "per_image", "typical": "stride"}[config.candidates]
    return {"order": list(order), **{k: v for k, v in asdict(config).items() if k not in ("chunk", unused)}}


def check_stride(run, config: TrendsConfig) -> None:
    """ValueError where the grid's step exceeds the mined patch side: its boxes would leave the
    pixels between them unscored (an element there never matched). Before the stored trends' record is dropped."""
    k = int(run.lineage.get("mine")["patch"])
    if config.candidates == "grid" and config.stride > k:
        raise ValueError(f"--stride {config.stride} is larger than the patch ({k} px, the run's mined --patch): the grid's "
                         f"boxes would leave the pixels between them unscored; give --stride {k} or less "
                         f"(0: an eighth of the patch, {max(1, k // 8)} px)")


def run_trends(run, backend: Backend, order: list[str], config: TrendsConfig, progress: bool = True) -> dict:
    """Measure every element in every label of ``order``; writes RUN/trends/trends.json."""
    check_order(run, order)
    check_stride(run, config)
    # rows of features.npy are those of the mined patches that got a feature (top, then rejected)
    mined = run.mined_patches(FEATURE_KINDS).assign(row=lambda f: np.arange(len(f)))
    mined = mined[mined["kind"] == "top"]
    clustered = run.patches("top").merge(mined[["image_id", "label", "x0", "y0", "row"]], on=["image_id", "label", "x0", "y0"])
    groups, centroids, thresholds = element_centroids(clustered, read_npy(run.features_path), config.min_size,
                                                      config.percentile)
    k = int(run.lineage.get("mine")["patch"])
    stride = config.stride or max(1, k // 8)
    feature_config = FeatureConfig(**run.step_config("features"))
    dataset = run.step_config("dataset")
    prompt_of = {label: run.prompt(label) for label in run.labels}
    store = run.typicality_store
    ok = store.ok()
    images = ok[ok["label"].isin(order)].reset_index(drop=True)
    paths = dict(zip(images["image_id"], images["path"]))
    listed = listed_by_id(images)
    E = len(groups)
    best_match = np.full((len(images), E), np.nan)
    best_typicality = np.full((len(images), E), np.nan)
    skipped = []  # the images that could not be read: named, and left out of the measures
    for start in range(0, len(images), config.chunk):
        chunk = images.iloc[start:start + config.chunk]
        boxes = [candidate_boxes(int(r.height), int(r.width), k, stride) if config.candidates == "grid"
                 else typical_boxes(store.pixel(r.image_id), k, config.per_image) for r in chunk.itertuples()]
        candidates = pd.DataFrame(np.concatenate(boxes), columns=["x0", "y0", "x1", "y1"])
        candidates["image_id"] = np.repeat(chunk["image_id"].to_numpy(), [len(b) for b in boxes])
        candidates["label"] = np.repeat(chunk["label"].to_numpy(), [len(b) for b in boxes])
        features, bad = patch_features(backend, candidates, paths, prompt_of, dataset["resolution"],
                                       dataset["resize"], feature_config, progress, listed=listed)
        skipped += bad
        if not features.shape[1]:
            continue  # no readable image in this chunk
        similarity = features @ centroids.T  # (candidates, E)
        offsets = np.cumsum([0] + [len(b) for b in boxes])
        readable = described(features)
        for n, r in enumerate(chunk.itertuples()):
            if not readable[offsets[n]]:
                continue  # left out below
            sim = similarity[offsets[n]:offsets[n + 1]]
            best = sim.argmax(0)  # (E,) the box nearest to each centroid
            best_match[start + n] = sim[best, np.arange(E)]
            scores = patch_scores(store.pixel(r.image_id), k)
            x0, y0 = boxes[n][best, 0], boxes[n][best, 1]
            best_typicality[start + n] = scores[y0, x0]
    run.report_skipped("trends", skipped)
    # an image that could not be read is left out: neither with the element nor without it
    measured = ~images["image_id"].isin([p.image_id for p in skipped]).to_numpy()
    best_match, best_typicality = best_match[measured], best_typicality[measured]
    labels = images["label"].to_numpy()[measured]
    thresholds = element_thresholds(best_match, thresholds, config.threshold)
    present = best_match >= thresholds
    elements = []
    for e, (label, cluster, members) in enumerate(groups):
        prevalence, typicality = [], []
        for name in order:
            mask = labels == name
            prevalence.append(float(present[mask, e].mean()) if mask.any() else 0.0)
            hits = best_typicality[mask & present[:, e], e]
            typicality.append(float(np.median(hits)) if len(hits) else None)
        strength = trend_strength(np.array(prevalence))
        elements.append({
            "id": e, "label": label, "cluster": cluster, "size": int(len(members)), "threshold": float(thresholds[e]),
            "prevalence": prevalence, "typicality": typicality, "trend": strength,
            "direction": "rising" if strength > 0 else "falling" if strength < 0 else "flat",
            "members": [[r.image_id, int(r.x0), int(r.y0), int(r.x1), int(r.y1)] for r in members.itertuples()],
        })
    elements.sort(key=lambda el: (-abs(el["trend"]), el["id"]))
    result = {"order": list(order), "images": {name: int((labels == name).sum()) for name in order},
              "patch": k, "stride": stride, "elements": elements}
    write_json(run.result_files("trends")[0], result)
    return result
