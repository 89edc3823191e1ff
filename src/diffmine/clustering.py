"""Clustering mined patches into visual elements, per label (paper section 3.3).

k-means on the DIFT features of each label's top (significant) patches, then:

- k sized to the data: ``k = ceil(n / members)`` for n patches (about ``members`` = 5 per
  cluster), at most ``k_max``; ``--k`` overrides. Deliberately more clusters than elements:
  k-means with few clusters mixes an element with look-alike distractors, and the split halves
  of one element are joined again by the merge (measured against ceil(sqrt(n / 2)) and fixed k
  in benchmarks/README.md);
- near-duplicates merged: while two centroids have a cosine similarity >= ``merge``, the pair is
  joined (its centroid the mean of all members);
- coverage, a Doersch-like check of discriminativeness, linear in the number of patches: a
  mined patch (top or rejected: every image's candidates) *matches* a cluster when its cosine
  similarity to the centroid is at least the ``match_quantile`` of the members' similarities;
  ``coverage`` is the share of the label's images with a match, ``coverage_other`` the share of
  the other labels' images with one. A distractor shared by all labels covers both alike;
- ranking (``rank``): ``median`` (the paper's: median typicality of the members),
  ``median-coverage`` (x coverage) or ``discriminative`` (x max(0, coverage - coverage_other),
  the default: see benchmarks/README.md for the measurement). Clusters of fewer than
  ``min_size`` members rank after all others, so the report, which hides them, shows ranks
  1, 2, 3... without gaps.

A patch without a feature (its image unreadable, or changed since it was listed, when the features
were made) is left out of all of it: the features step names the image, and records it in the
features' identity, so the clusters made once it is fixed are another result.

Members are ordered by distance to their centroid (nearest first; the authors' co-typicality
code takes the farthest by mistake).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.cluster import KMeans, MiniBatchKMeans

from .atomic import read_npy, write_table

RANKINGS = ("median", "median-coverage", "discriminative")


@dataclass
class ClusterConfig:
    k: int = 0  # clusters per label; 0: ceil(n / members) for n patches, at most k_max
    k_max: int = 32
    members: int = 5  # patches per cluster of the automatic k, before merging
    merge: float = 0.95  # join clusters whose centroids' cosine similarity is at least this (> 1: never)
    rank: str = "discriminative"  # median | median-coverage | discriminative
    min_size: int = 2  # smaller clusters rank last
    match_quantile: float = 0.1  # a patch matches a cluster above this quantile of its members' similarity
    seed: int = 0
    # above this many points per label, mini-batch k-means bounds time and memory
    minibatch_above: int = 50_000

    def __post_init__(self):
        if self.k < 0 or self.k_max < 1 or self.members < 1:
            raise ValueError(f"k must be >= 0, k_max and members >= 1, got {self.k}, {self.k_max}, {self.members}")
        if self.rank not in RANKINGS:
            raise ValueError(f"rank must be one of {RANKINGS}, got {self.rank!r}")
        if math.isnan(self.merge) or self.min_size < 0:
            raise ValueError(f"merge must be a number and min_size >= 0, got {self.merge}, {self.min_size}")
        if not 0.0 <= self.match_quantile <= 1.0:
            raise ValueError(f"match_quantile must be in [0, 1], got {self.match_quantile}")


def choose_k(n: int, k: int = 0, k_max: int = 32, members: int = 5) -> int:
    """Clusters for n patches: ``k`` if given, else ceil(n / members) capped at k_max; never above n."""
    if n < 1:
        return 0
    return min(n, k if k else min(k_max, math.ceil(n / members)))


def kmeans(features: np.ndarray, k: int, seed: int, minibatch_above: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (assignments (N,), centroids (k', D)) with k' = min(k, N)."""
    k = min(k, len(features))
    if len(features) > minibatch_above:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=4, init="k-means++")
    assignments = model.fit_predict(features.astype(np.float32))
    return assignments, model.cluster_centers_


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centroids_of(assignments: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(N,) cluster ids 0..k-1, (N, D) -> (k, D) member means."""
    k = int(assignments.max()) + 1
    sums = np.zeros((k, features.shape[1]), np.float64)
    np.add.at(sums, assignments, features)
    return (sums / np.bincount(assignments, minlength=k)[:, None]).astype(np.float32)


def merge_clusters(assignments: np.ndarray, features: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Join the most similar pair of clusters while their centroids' cosine similarity is >= threshold.

    Args:
        assignments: (N,) cluster ids; features: (N, D)
    Returns:
        assignments renumbered 0..k'-1 (by first member), centroids (k', D) member means
    """
    _, assignments = np.unique(assignments, return_inverse=True)
    while True:
        centroids = centroids_of(assignments, features)
        if len(centroids) < 2:
            return assignments, centroids
        similarity = _unit(centroids) @ _unit(centroids).T
        np.fill_diagonal(similarity, -np.inf)
        a, b = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
        if similarity[a, b] < threshold:
            return assignments, centroids
        assignments = np.where(assignments == max(a, b), min(a, b), assignments)
        _, assignments = np.unique(assignments, return_inverse=True)


def coverage(centroids: np.ndarray, assignments: np.ndarray, features: np.ndarray, candidates: np.ndarray,
             candidate_images: np.ndarray, in_label: np.ndarray, quantile: float) -> pd.DataFrame:
    """How many images of the label, and of the other labels, hold a patch like each cluster.

    Args:
        centroids: (k, D); assignments: (n,) and features: (n, D) of the members
        candidates: (N, D) features of every mined patch of every label (unit norm)
        candidate_images: (N,) image ids; in_label: (N,) bool, the patch's image is of this label
    Returns:
        one row per cluster: images (of the label with a match), coverage (their share),
        images_other, coverage_other (the same over the other labels' images)
    """
    directions = _unit(centroids)
    threshold = np.array([np.quantile(features[assignments == c] @ directions[c], quantile)
                          for c in range(len(centroids))])
    matches = (candidates @ directions.T) >= threshold  # (N, k)
    frame = pd.DataFrame(matches).assign(image=candidate_images, inside=in_label)
    per_image = frame.groupby(["inside", "image"]).any()  # (images, k): the image holds a match
    rows = []
    for c in range(len(centroids)):
        inside = per_image.loc[True, c] if True in per_image.index.get_level_values(0) else pd.Series(dtype=bool)
        outside = per_image.loc[False, c] if False in per_image.index.get_level_values(0) else pd.Series(dtype=bool)
        rows.append({"images": int(inside.sum()), "coverage": float(inside.mean()) if len(inside) else 0.0,
                     "images_other": int(outside.sum()), "coverage_other": float(outside.mean()) if len(outside) else 0.0})
    return pd.DataFrame(rows)


def rank_clusters(assignments: np.ndarray, centroids: np.ndarray, features: np.ndarray, typicality: np.ndarray,
                  stats: pd.DataFrame | None = None, rank: str = "median", min_size: int = 1) -> pd.DataFrame:
    """Per point: cluster_rank (0 = best cluster), rank_in_cluster (0 = nearest) and its cluster's
    statistics: cluster_size, cluster_median, cluster_score and the columns of ``stats`` (one row
    per cluster id, e.g. :func:`coverage`; needed by the coverage rankings)."""
    distance = np.linalg.norm(features - centroids[assignments], axis=1)
    frame = pd.DataFrame({"cluster": assignments, "distance": distance, "typicality": typicality})
    clusters = frame.groupby("cluster").agg(cluster_size=("typicality", "size"), cluster_median=("typicality", "median"))
    if stats is not None:
        clusters = clusters.join(stats)
    score = clusters["cluster_median"]
    if rank == "median-coverage":
        score = score * clusters["coverage"]
    elif rank == "discriminative":
        score = score * (clusters["coverage"] - clusters["coverage_other"]).clip(lower=0)
    clusters["cluster_score"] = score
    clusters["_small"] = clusters["cluster_size"] < min_size
    clusters = clusters.sort_values(["_small", "cluster_score", "cluster_median"], ascending=[True, False, False],
                                    kind="mergesort").drop(columns="_small")
    clusters["cluster_rank"] = np.arange(len(clusters))
    frame = frame.join(clusters, on="cluster")
    frame["rank_in_cluster"] = frame.groupby("cluster")["distance"].rank(method="first").astype(int) - 1
    # cluster ids renumbered by rank, so cluster 0 is the best one
    frame["cluster"] = frame["cluster_rank"]
    return frame[["cluster", "cluster_rank", "rank_in_cluster", "distance", *clusters.columns.drop("cluster_rank")]]


def described(features: np.ndarray) -> np.ndarray:
    """(N,) bool: the patches that have a feature. ``features.patch_features`` gives the patches of
    an image it could not read NaN (and no column at all when it could read none)."""
    return np.isfinite(features).all(1) & (features.shape[1] > 0)


def cluster_patches(patches: pd.DataFrame, features: np.ndarray, config: ClusterConfig) -> pd.DataFrame:
    """Cluster each label's top patches separately; returns them with the cluster columns.

    Args:
        patches: mined patches of kinds top and rejected (a table without ``kind``: all top)
        features: (len(patches), D) their DIFT features, unit norm; NaN for a patch whose image
            could not be read (:func:`described`): left out, of the clusters and of coverage
    """
    keep = described(features)
    patches, features = patches[keep].reset_index(drop=True), features[keep]
    kind = patches["kind"] if "kind" in patches else pd.Series("top", index=patches.index)
    parts = []
    for label, group in patches[kind == "top"].groupby("label", sort=True):
        rows = group.index.to_numpy()
        k = choose_k(len(rows), config.k, config.k_max, config.members)
        assignments, _ = kmeans(features[rows], k, config.seed, config.minibatch_above)
        assignments, centroids = merge_clusters(assignments, features[rows], config.merge)
        stats = coverage(centroids, assignments, features[rows], features, patches["image_id"].to_numpy(),
                         (patches["label"] == label).to_numpy(), config.match_quantile)
        ranked = rank_clusters(assignments, centroids, features[rows], group["typicality"].to_numpy(), stats,
                               config.rank, config.min_size)
        parts.append(pd.concat([group.reset_index(drop=True), ranked.reset_index(drop=True)], axis=1))
    if not parts:  # no significant patch at all (e.g. an untrained model): an empty table
        columns = ["cluster", "cluster_rank", "rank_in_cluster", "distance", "cluster_size", "cluster_median",
                   "images", "coverage", "images_other", "coverage_other", "cluster_score"]
        empty = patches.iloc[:0].assign(**{c: pd.Series(dtype="int64" if c.startswith(("cluster", "rank", "images"))
                                                         and c not in ("cluster_median", "cluster_score") else "float64")
                                            for c in columns})
        return empty.reset_index(drop=True)
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["label", "cluster_rank", "rank_in_cluster"], kind="mergesort").reset_index(drop=True)


def run_clustering(run, config: ClusterConfig, patches: pd.DataFrame | None = None, features: Path | None = None,
                   out: Path | None = None) -> pd.DataFrame:
    """Cluster the run's top patches (counting coverage on the rejected ones too), or ``patches``
    with ``features`` from that file, into ``clusters/patches.parquet`` (or ``out``); the patches
    without a feature are left out (their images were named by the features step)."""
    from .features import FEATURE_KINDS

    patches = run.mined_patches(FEATURE_KINDS) if patches is None else patches
    features = read_npy(run.features_path if features is None else features)
    if len(features) != len(patches):
        raise ValueError(f"{run.path}: {len(features)} features for {len(patches)} patches; re-run `diffmine cluster`")
    clustered = cluster_patches(patches, features, config)
    write_table(pa.Table.from_pandas(clustered, preserve_index=False), run.clusters_path if out is None else out)
    return clustered
