"""How the Doersch et al. baseline (and, with --with-typicality, the typicality pipeline) scales
with the number of images, on the built-in synthetic dataset.

For each size N the dataset (N images over --labels labels) is generated once, then each method
runs in a fresh process (so its peak memory is its own): wall seconds and peak RSS (MB, the
process's ru_maxrss, interpreter and imports included) are measured, and the growth exponent is
the slope of log(seconds) against log(N).

    python benchmarks/baseline_scaling.py                       # 200, 800, 3200 images
    python benchmarks/baseline_scaling.py --sizes 50 100 200 --with-typicality
    python benchmarks/baseline_scaling.py --sizes 120 --resolution 256 --defaults   # `diffmine baseline doersch` as shipped

Typicality: a tiny model is trained once on the smallest size (the one-off cost is printed apart);
for every size a new run directory gets a copy of that model/ folder and runs typicality
(TypicalityConfig(samples=8)), mining and clustering. The Doersch rows time the whole baseline
(features, seeding, SVM training) for every label; its per-phase seconds come from settings.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np


# --------------------------------------------------------------------------------------------
# measuring


PRELOAD = ("diffmine.pipeline", "diffmine.baselines.doersch", "skimage.feature", "skimage.color", "sklearn.svm",
           "sklearn.neighbors")


def _child(fn, args, queue, preload):
    import importlib

    for module in preload:  # imports are not what is measured
        importlib.import_module(module)
    t0 = time.perf_counter()
    try:
        result, error = fn(*args), None
    except BaseException as exc:  # reported to the parent, not raised in the child
        result, error = None, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    queue.put((seconds, peak_mb, result, error))


def measure(fn, *args, extra: bool = False, preload: tuple[str, ...] = PRELOAD):
    """Run ``fn(*args)`` in a fresh (spawned) process; returns (seconds, peak_rss_mb).

    ``fn`` must be importable (a module-level function). Seconds are the call's own wall time
    (interpreter start and the ``preload`` imports excluded); the peak RSS is the whole process's. With ``extra=True`` also
    returns what ``fn`` returned (must be picklable).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue, preload))
    proc.start()
    seconds, peak_mb, result, error = queue.get()
    proc.join()
    if error is not None:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed: {error}")
    return (seconds, peak_mb, result) if extra else (seconds, peak_mb)


def growth_exponent(sizes, seconds) -> float:
    """Slope of log(seconds) against log(images): 1 = linear."""
    if len(sizes) < 2:
        return float("nan")
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


# --------------------------------------------------------------------------------------------
# the jobs (each runs in its own process)


def doersch_job(data_dir: str, run_dir: str, resolution: int, config: dict) -> dict:
    from diffmine import pipeline
    from diffmine.baselines.doersch import DoerschConfig
    from diffmine.rundir import Run

    run = Run(run_dir)
    pipeline.prepare(run, data_dir, "An image of {label}.", "An image.", resolution)
    config = DoerschConfig(**config)
    table = pipeline.baseline_step(run, config, progress=False)
    seconds = json.loads((Path(run_dir) / "baselines" / "doersch" / "settings.json").read_text())["seconds"]
    return {**seconds, "svms": int(table.groupby("label")["cluster"].nunique().sum()) * config.folds}


def train_job(data_dir: str, run_dir: str, resolution: int, steps: int, seed: int) -> str:
    from diffmine import pipeline
    from diffmine.rundir import Run
    from diffmine.train import TrainConfig

    run = Run(run_dir)
    pipeline.prepare(run, data_dir, "A scene from {label}.", "A scene.", resolution)
    pipeline.train_step(run, TrainConfig(steps=steps, seed=seed, checkpoint_every=max(steps, 1)), progress=False)
    return str(run.model_dir)


def typicality_job(data_dir: str, run_dir: str, resolution: int, model_dir: str, samples: int, seed: int) -> dict:
    from diffmine import pipeline
    from diffmine.clustering import ClusterConfig
    from diffmine.features import FeatureConfig
    from diffmine.mining import MineConfig
    from diffmine.rundir import Run
    from diffmine.typicality import TypicalityConfig

    run = Run(run_dir)
    phases = {}
    t0 = time.perf_counter()
    pipeline.prepare(run, data_dir, "A scene from {label}.", "A scene.", resolution)
    shutil.copytree(model_dir, run.model_dir, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
    t1 = time.perf_counter()
    pipeline.typicality_step(run, TypicalityConfig(samples=samples, seed=seed), progress=False)
    t2 = time.perf_counter()
    pipeline.mine_step(run, MineConfig(seed=seed), progress=False)
    t3 = time.perf_counter()
    pipeline.cluster_step(run, ClusterConfig(seed=seed), FeatureConfig(seed=seed), progress=False)
    t4 = time.perf_counter()
    phases.update(prepare=t1 - t0, typicality=t2 - t1, mine=t3 - t2, cluster=t4 - t3)
    return {k: round(v, 3) for k, v in phases.items()}


def quality(patches_path: Path, masks: Path, image_size: int) -> dict:
    """The same metrics for either method's ranked patches: planted-element hit rate of all kept
    patches, of each label's top-ranked cluster and top 3 clusters (means over labels), the
    number of labels whose top cluster is mostly element, and cluster purity."""
    import pandas as pd

    from diffmine.evaluate import cluster_purity, find_mask, load_mask, patch_hits

    table = pd.read_parquet(patches_path)
    loaded = {}
    for image_id in table["image_id"].unique():
        path = find_mask(masks, image_id)
        if path is not None:
            loaded[image_id] = load_mask(path, (image_size, image_size))
    hits = patch_hits(table, loaded)
    purity = cluster_purity(table, hits, min_size=2)
    first = [v["first_element_rank"] for v in purity.values()]
    return {"hit_rate": float(np.nanmean(hits)),
            "top_cluster_hit_rate": float(np.mean([v["top_cluster_hit_rate"] for v in purity.values()])),
            "top3_hit_rate": float(np.mean([v["top3_hit_rate"] for v in purity.values()])),
            # labels whose top-ranked cluster is mostly element, and the mean rank of the first such
            "labels_element_first": sum(f == 1 for f in first),
            "first_element_rank": float(np.mean([f for f in first if f is not None])) if any(first) else float("nan"),
            "purity": float(np.mean([v["purity"] for v in purity.values()]))}


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    from diffmine.baselines.doersch import HELP, DoerschConfig
    from diffmine.cli import add_config, build_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[200, 800, 3200], help="numbers of images (default: 200 800 3200)")
    p.add_argument("--labels", type=int, default=4, help="labels of the synthetic dataset (default: 4)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/baseline_scaling"), help="work folder (datasets, runs, results.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-typicality", action="store_true", help="also time the typicality pipeline (tiny model)")
    p.add_argument("--train-steps", type=int, default=300, help="tiny-model training steps (with --with-typicality)")
    p.add_argument("--samples", type=int, default=8, help="typicality samples K (with --with-typicality)")
    p.add_argument("--keep", action="store_true", help="keep the generated datasets and runs")
    p.add_argument("--resolution", type=int, default=None,
                   help="side the images are listed at (default: --image-size; `diffmine baseline doersch` lists at 256)")
    p.add_argument("--defaults", action="store_true", help="DoerschConfig's own defaults (preset data) instead of the "
                                                           "benchmark-sized config below")
    add_config(p, DoerschConfig, help=HELP)
    # a benchmark-sized Doersch config (the paper-sized defaults: --patch 64 --stride 8 --seeds 25000 ...)
    if "--defaults" not in (argv if argv is not None else sys.argv[1:]):
        p.set_defaults(patch=24, stride=8, seeds=2000, detectors=100, negatives_min=2000, negatives_max=5000)
    args = p.parse_args(argv)
    resolution = args.resolution or args.image_size
    config = build_config(DoerschConfig, args)

    from diffmine.synthetic import SynthConfig, generate

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    rows = []
    model_dir = None
    for n in sizes:
        per_label = max(2, n // args.labels)
        data = generate(out / f"data-{n}", SynthConfig(labels=args.labels, per_label=per_label, size=args.image_size,
                                                        seed=args.seed), progress=False)
        images = per_label * args.labels
        run = out / f"doersch-{n}"
        shutil.rmtree(run, ignore_errors=True)
        seconds, peak, phases = measure(doersch_job, str(data), str(run), resolution, dataclasses.asdict(config), extra=True)
        rows.append({"method": "doersch", "images": images, "seconds": seconds, "peak_rss_mb": peak, "phases": phases,
                     **quality(run / "baselines" / "doersch" / "patches.parquet", out / f"data-{n}" / "masks", resolution)})
        print(f"doersch     {images:>6} images {seconds:9.1f} s {peak:9.0f} MB  {phases}", flush=True)
        if args.with_typicality:
            if model_dir is None:
                train_run = out / f"train-{n}"
                shutil.rmtree(train_run, ignore_errors=True)
                t, m, model_dir = measure(train_job, str(data), str(train_run), resolution, args.train_steps, args.seed, extra=True)
                rows.append({"method": "train (once)", "images": images, "seconds": t, "peak_rss_mb": m,
                             "phases": {"steps": args.train_steps}})
                print(f"train once  {images:>6} images {t:9.1f} s {m:9.0f} MB  ({args.train_steps} steps)", flush=True)
            run = out / f"typicality-{n}"
            shutil.rmtree(run, ignore_errors=True)
            seconds, peak, phases = measure(typicality_job, str(data), str(run), resolution, model_dir, args.samples,
                                            args.seed, extra=True)
            rows.append({"method": "typicality", "images": images, "seconds": seconds, "peak_rss_mb": peak, "phases": phases,
                         **quality(run / "clusters" / "patches.parquet", out / f"data-{n}" / "masks", resolution)})
            print(f"typicality  {images:>6} images {seconds:9.1f} s {peak:9.0f} MB  {phases}", flush=True)
        if not args.keep:
            shutil.rmtree(out / f"data-{n}", ignore_errors=True)

    print()
    print(f"{'method':<14} {'images':>7} {'seconds':>9} {'ms/image':>9} {'peak MB':>8} {'hit rate':>9} {'top-cluster hit':>16} "
          f"{'top-3 hit':>10} {'elem first':>11} {'purity':>7}")
    for r in rows:
        quality_cells = (f"{r['hit_rate']:>9.3f} {r['top_cluster_hit_rate']:>16.3f} {r['top3_hit_rate']:>10.3f} "
                         f"{r['labels_element_first']:>6}/{args.labels:<4} {r['purity']:>7.3f}" if "hit_rate" in r else "")
        print(f"{r['method']:<14} {r['images']:>7} {r['seconds']:>9.1f} {1000 * r['seconds'] / r['images']:>9.1f} "
              f"{r['peak_rss_mb']:>8.0f} {quality_cells}")
    exponents = {}
    for method in ("doersch", "typicality"):
        mine = [r for r in rows if r["method"] == method]
        if len(mine) >= 2:
            exponents[method] = growth_exponent([r["images"] for r in mine], [r["seconds"] for r in mine])
            print(f"growth exponent ({method}): time ~ images^{exponents[method]:.2f}")
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(config), "sizes": sizes, "rows": rows,
                                                  "exponents": exponents, "image_size": args.image_size,
                                                  "labels": args.labels}, indent=2))
    if not args.keep:
        for n in sizes:
            for name in (f"doersch-{n}", f"typicality-{n}", f"train-{n}"):
                shutil.rmtree(out / name, ignore_errors=True)
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
