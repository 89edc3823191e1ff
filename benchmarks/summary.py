"""The summary a reader meets first, against the planted-element masks, over the settings of the
significance filter and of clustering: seconds per setting, no model run.

One run mined with the unit maps (every image's candidates with their z) and clustered once
(features of every candidate) serves every setting: a z threshold only moves candidates between
kind top and rejected, so the features stay valid. For each (z_min, k, merge, rank) the top
patches are re-clustered and scored with ``evaluate.cluster_purity``: per label the hit rate of
the top-ranked cluster's members, of the top 3 clusters', and the rank of the first cluster
that is mostly element. (Clustering runs on the process's threads: set OMP_NUM_THREADS.) A Doersch baseline in the run (``diffmine baseline``) gets the same
metrics on the same images.

    python benchmarks/summary.py --run runs/demo --masks runs/demo/data/masks
    python benchmarks/summary.py --run R --masks M --z-min off 2 3 4 --rank median discriminative
    python benchmarks/summary.py --run R --masks M --z-min 2 --seeds 0 1 2 --features run t=0.3 block=2 ensemble=16

``--features``: the DIFT settings to compare (``run``: the run's stored features; otherwise the
run's feature settings with the given ones changed, recomputed with the run's model: one feature
pass over the mined images each).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np


def load(run_path: Path, masks: Path):
    from diffmine.evaluate import find_mask, load_mask
    from diffmine.features import FEATURE_KINDS
    from diffmine.rundir import Run

    run = Run(run_path)
    patches = run.mined_patches(FEATURE_KINDS)
    features = np.load(run.features_path)
    if len(features) != len(patches):
        raise SystemExit(f"{run_path}: features do not match the mined patches; run `diffmine cluster` first")
    index = run.typicality_index()
    sizes = {r.image_id: (r.height, r.width) for r in index[index["status"] == "ok"].itertuples()}
    loaded = {}
    for image_id in patches["image_id"].unique():
        path = find_mask(masks, image_id)
        if path is not None:
            loaded[image_id] = load_mask(path, sizes[image_id])
    return run, patches, features, loaded


def recomputed_features(run, patches, spec: str) -> np.ndarray:
    """The DIFT features of ``patches`` with the run's feature settings changed by ``spec``
    ("t=0.3,ensemble=16,block=2")."""
    import torch

    from diffmine.features import FeatureConfig, patch_features
    from diffmine.pipeline import scoring_model

    settings = dict(run.step_config("features"))
    for item in spec.split(","):
        key, value = item.split("=")
        settings[key] = type(getattr(FeatureConfig(), key) or 0)(value)
    images, dataset = run.images(), run.step_config("dataset")
    return patch_features(scoring_model(run, torch.device("cpu")), patches, dict(zip(images["image_id"], images["path"])),
                          {label: run.prompt(label) for label in run.labels}, dataset["resolution"], dataset["resize"],
                          FeatureConfig(**settings), progress=False)


def summary(clustered, loaded, depths=()) -> dict:
    from diffmine.evaluate import cluster_purity, patch_hits

    hits = patch_hits(clustered, loaded)
    per_label = cluster_purity(clustered, hits, min_size=2)
    for depth in depths:  # the top cluster's hit rate over its first `depth` members (its own order)
        for label, v in cluster_purity(clustered, hits, min_size=2, depth=depth).items():
            per_label[label].setdefault("top1_at", {})[depth] = v["top_shown_hit_rate"]
    first = [v["first_element_rank"] for v in per_label.values()]
    return {"per_label": per_label,
            "top1": float(np.mean([v["top_cluster_hit_rate"] for v in per_label.values()])),
            "top1_shown": float(np.mean([v["top_shown_hit_rate"] for v in per_label.values()])),
            "top3": float(np.mean([v["top3_hit_rate"] for v in per_label.values()])),
            "element_first": sum(f == 1 for f in first), "labels": len(per_label)}


def print_depths(s: dict, depths: list[int]) -> None:
    if not depths:
        return
    for label, v in s["per_label"].items():
        print(f"    {label:<14} top cluster of {v['top_cluster_size']:>3}: "
              + " ".join(f"@{d} {v['top1_at'][d]:.3f}" for d in depths))


def main(argv=None) -> int:
    from diffmine.clustering import RANKINGS, ClusterConfig, cluster_patches
    from diffmine.evaluate import patch_hits

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True)
    p.add_argument("--z-min", type=lambda v: float("-inf") if v == "off" else float(v), nargs="+",
                   default=[float("-inf"), 2.0, 3.0, 4.0], help="thresholds; off: no significance filter")
    p.add_argument("--k", type=int, nargs="+", default=[0, 32], help="0: the automatic k")
    p.add_argument("--merge", type=float, nargs="+", default=[0.9, 2.0], help="above 1: no merging")
    p.add_argument("--rank", nargs="+", default=list(RANKINGS), choices=RANKINGS)
    p.add_argument("--match-quantile", type=float, nargs="+", default=[0.1])
    p.add_argument("--members", type=int, nargs="+", default=[5], help="of the automatic k")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="k-means seeds")
    p.add_argument("--features", nargs="+", default=["run"],
                   help="run (the stored features) or changed feature settings, e.g. t=0.3,ensemble=16")
    p.add_argument("--depths", type=int, nargs="+", default=[],
                   help="also print each label's top-cluster hit rate over its first D members (its own order), "
                        "for every setting and baseline: methods compared at equal depth")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    run, patches, stored, loaded = load(args.run, args.masks)
    hits = patch_hits(patches, loaded)
    rows = []
    print(f"{'features':<20} {'z_min':>6} {'k':>3} {'mem':>3} {'seed':>4} {'merge':>5} {'match':>5} {'rank':<16} {'kept':>5} {'kept hit':>8} {'top1':>6} {'top1@8':>6} {'top3':>6} "
          f"{'elem 1st':>8}  first element rank per label  seconds")
    described = {spec: stored if spec == "run" else recomputed_features(run, patches, spec) for spec in args.features}
    for spec, z_min, k, members, seed, merge, match, rank in itertools.product(
            args.features, args.z_min, args.k, args.members, args.seeds, args.merge, args.match_quantile, args.rank):
        features = described[spec]
        keep = (patches["z"].fillna(np.inf) >= z_min).to_numpy()
        table = patches.assign(kind=np.where(keep, "top", "rejected"))
        t0 = time.perf_counter()
        clustered = cluster_patches(table, features, ClusterConfig(k=k, members=members, seed=seed, merge=merge, rank=rank,
                                                                  match_quantile=match))
        seconds = time.perf_counter() - t0
        s = summary(clustered, loaded, args.depths)
        firsts = {label: v["first_element_rank"] for label, v in s["per_label"].items()}
        rows.append({"features": spec, "z_min": z_min, "k": k, "members": members, "seed": seed, "merge": merge, "match_quantile": match, "rank": rank, "kept": int(keep.sum()),
                     "kept_hit_rate": float(np.nanmean(hits[keep])), "seconds": seconds, **s})
        print(f"{spec:<20} {z_min:>6} {k:>3} {members:>3} {seed:>4} {merge:>5} {match:>5} {rank:<16} {int(keep.sum()):>5} {np.nanmean(hits[keep]):>8.3f} "
              f"{s['top1']:>6.3f} {s['top1_shown']:>6.3f} {s['top3']:>6.3f} {s['element_first']:>4}/{s['labels']:<3}  "
              f"{' '.join(f'{l}:{f}' for l, f in firsts.items())}  {seconds:.2f}", flush=True)
        print_depths(s, args.depths)
    for path in sorted(run.path.glob("baselines/*/patches.parquet")):
        import pandas as pd

        s = summary(pd.read_parquet(path), loaded, args.depths)
        firsts = {label: v["first_element_rank"] for label, v in s["per_label"].items()}
        rows.append({"baseline": path.parent.name, **s})
        print(f"baseline {path.parent.name}: top1 {s['top1']:.3f} top1@8 {s['top1_shown']:.3f} top3 {s['top3']:.3f} element first "
              f"{s['element_first']}/{s['labels']}  {' '.join(f'{l}:{f}' for l, f in firsts.items())}")
        print_depths(s, args.depths)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
