"""Clustering mined patches into visual elements, per label (paper section 3.3).

k-means on the DIFT features of each label's top patches; clusters are ranked by the median
typicality of their members (most typical first), members by distance to their centroid
(nearest first; the authors' co-typicality code takes the farthest by mistake).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.cluster import KMeans, MiniBatchKMeans

from .atomic import write_table


@dataclass
class ClusterConfig:
    k: int = 32
    seed: int = 0
    # above this many points per label, mini-batch k-means bounds time and memory
    minibatch_above: int = 50_000

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")


def kmeans(features: np.ndarray, k: int, seed: int, minibatch_above: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (assignments (N,), centroids (k', D)) with k' = min(k, N)."""
    k = min(k, len(features))
    if len(features) > minibatch_above:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=4, init="k-means++")
    assignments = model.fit_predict(features.astype(np.float32))
    return assignments, model.cluster_centers_


def rank_clusters(assignments: np.ndarray, centroids: np.ndarray, features: np.ndarray,
                  typicality: np.ndarray) -> pd.DataFrame:
    """Per point: cluster_rank (0 = highest median typicality), rank_in_cluster (0 = nearest)."""
    distance = np.linalg.norm(features - centroids[assignments], axis=1)
    frame = pd.DataFrame({"cluster": assignments, "distance": distance, "typicality": typicality})
    medians = frame.groupby("cluster")["typicality"].median().sort_values(ascending=False, kind="mergesort")
    order = {c: r for r, c in enumerate(medians.index)}
    frame["cluster_rank"] = frame["cluster"].map(order)
    frame["cluster_median"] = frame["cluster"].map(medians)
    frame["rank_in_cluster"] = frame.groupby("cluster")["distance"].rank(method="first").astype(int) - 1
    # cluster ids renumbered by rank, so cluster 0 is the most typical one
    frame["cluster"] = frame["cluster_rank"]
    return frame[["cluster", "cluster_rank", "rank_in_cluster", "distance", "cluster_median"]]


def cluster_patches(patches: pd.DataFrame, features: np.ndarray, config: ClusterConfig) -> pd.DataFrame:
    """Cluster each label's patches separately; returns ``patches`` with the cluster columns."""
    parts = []
    for label, group in patches.groupby("label", sort=True):
        rows = group.index.to_numpy()
        assignments, centroids = kmeans(features[rows], config.k, config.seed, config.minibatch_above)
        ranked = rank_clusters(assignments, centroids, features[rows], group["typicality"].to_numpy())
        parts.append(pd.concat([group.reset_index(drop=True), ranked.reset_index(drop=True)], axis=1))
    out = pd.concat(parts, ignore_index=True)
    return out.sort_values(["label", "cluster_rank", "rank_in_cluster"], kind="mergesort").reset_index(drop=True)


def run_clustering(run, config: ClusterConfig, patches: pd.DataFrame | None = None, features: Path | None = None,
                   out: Path | None = None) -> pd.DataFrame:
    """Cluster the run's top patches (or ``patches``, with ``features`` from that file) into
    ``clusters/patches.parquet`` (or ``out``)."""
    patches = run.mined_patches("top") if patches is None else patches
    features = np.load(run.features_path if features is None else features)
    if len(features) != len(patches):
        raise ValueError(f"{run.path}: {len(features)} features for {len(patches)} patches; re-run `diffmine cluster`")
    clustered = cluster_patches(patches, features, config)
    write_table(pa.Table.from_pandas(clustered, preserve_index=False), run.clusters_path if out is None else out)
    return clustered
