"""Scale: seconds per image and peak memory of the pipeline at 1k, 10k and 100k images.

    .venv/bin/python benchmarks/scale.py --sizes 1000,10000,100000 --samples 2 --out /tmp/scale
    .venv/bin/python benchmarks/scale.py --sizes 200,400,800                    # a quick check

What it measures, on the embedded (tiny) model and 64 px synthetic images:

- for each size N, in a FRESH Python process (so the peak RSS is that size's own), the wall
  seconds of each step called through diffmine.pipeline (imports excluded, loading the model
  included, so small sizes carry a fixed cost): prepare (listing the manifest),
  typicality (K = --samples draws, shards of --shard-size images), mining (top --top patches per
  label) and features + clustering (DIFT features of the top patches, k-means with --k); and the
  process's peak RSS (ru_maxrss: interpreter, torch and the model included; the RSS right after
  the imports is printed too, so the growth is visible apart from the fixed cost);
- the growth of each step: the slope of log(seconds) against log(N) (1 = linear = flat cost per
  image), and the slope of peak RSS against N (MB per 1,000 images; 0 = flat memory).

Features + clustering only ever see the top patches (at most --top per label), so their total
cost is bounded by design: once N exceeds labels x top / 5 (mining keeps 5 patches per image;
800 images at the defaults) their exponent is ~0 and their cost per image falls as 1/N.

Data: a pool of --pool distinct synthetic images is generated once (diffmine.synthetic), then
symlinked under distinct names as many times as the largest size needs; size N lists the first N
links (labels interleaved) in a CSV manifest (path,label). diffmine refuses a path listed twice,
and symlinks keep their own names, so every row is a distinct image to the pipeline. The pool is
small enough to stay in the page cache: decoding is measured, disk reads mostly are not.

Model: trained ONCE (--train-steps steps, quality is irrelevant here) in its own process; each
size's run gets a copy of its model/ folder and of the "train" entry of its config.json.

Run it on an otherwise idle machine: torch uses --threads threads (default: all cores), and
with fewer free cores than threads, OpenMP threads wait on each other and the times inflate
several-fold and erratically.

Prints a markdown table and writes it to OUT/scale.md (raw numbers in OUT/scale.json). The pool,
the links and the trained model are kept in OUT and reused by later runs with the same --pool,
--train-steps and --seed; the runs of each size are removed unless --keep.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LABELS = 4  # synthetic labels (norland, sudland, eastland, westland)
STEPS = ("prepare", "typicality", "mining", "features+cluster")


def cores() -> int:
    from diffmine.machine import usable_cpus

    return usable_cpus()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


# --------------------------------------------------------------------------------------------
# data: a pool of distinct images, symlinked under distinct names, listed by per-size manifests


def make_data(out: Path, pool: int, largest: int, sizes: list[int], image_size: int, seed: int) -> dict[int, Path]:
    """Returns {N: manifest of the first N images}."""
    from diffmine.synthetic import SynthConfig, generate

    data = out / "data"
    per_label = max(1, pool // LABELS)
    stamp = data / "pool.json"
    wanted = {"per_label": per_label, "size": image_size, "seed": seed}
    if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        shutil.rmtree(data, ignore_errors=True)
        t0 = time.perf_counter()
        generate(data / "pool", SynthConfig(labels=LABELS, per_label=per_label, size=image_size, seed=seed), progress=False)
        stamp.write_text(json.dumps(wanted))
        print(f"generated a pool of {per_label * LABELS} images in {time.perf_counter() - t0:.1f} s", flush=True)
    labels = sorted(p.name for p in (data / "pool" / "images").iterdir())
    # row j of every manifest: label j % LABELS, its (j // LABELS)-th link, which points at pool image
    # (j // LABELS) % per_label of that label
    rows = []
    for j in range(largest):
        label, i = labels[j % LABELS], j // LABELS
        link = data / "links" / label / f"img_{i:06d}.png"
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(data / "pool" / "images" / label / f"img_{i % per_label:04d}.png")
        rows.append((link.relative_to(data).as_posix(), label))
    manifests = {}
    for n in sizes:
        manifests[n] = data / f"manifest-{n}.csv"
        with manifests[n].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows(rows[:n])
    return manifests


# --------------------------------------------------------------------------------------------
# the child processes: `scale.py --child train|size JSON`


def child_train(job: dict) -> dict:
    from diffmine import pipeline
    from diffmine.rundir import Run
    from diffmine.train import TrainConfig

    run = Run(job["run"])
    shutil.rmtree(run.path, ignore_errors=True)
    t0 = time.perf_counter()
    pipeline.prepare(run, job["manifest"], "A scene from {label}.", "A scene.", job["image_size"])
    pipeline.train_step(run, TrainConfig(steps=job["steps"], seed=job["seed"], checkpoint_every=job["steps"]),
                        progress=False)
    return {"seconds": time.perf_counter() - t0}


def child_size(job: dict) -> dict:
    import torch

    from diffmine import pipeline
    from diffmine.clustering import ClusterConfig
    from diffmine.features import FeatureConfig
    from diffmine.mining import MineConfig
    from diffmine.rundir import Run
    from diffmine.typicality import TypicalityConfig
    import diffmine.models.tiny  # noqa: F401  (diffusers: seconds of imports, not what is measured)

    base_rss = peak_rss_mb()  # interpreter + torch + diffusers + diffmine, before any work
    trained = Run(job["trained"])
    run = Run(job["run"])
    shutil.rmtree(run.path, ignore_errors=True)
    seconds, rss = {}, {}

    def timed(step, fn):
        t0 = time.perf_counter()
        fn()
        seconds[step] = time.perf_counter() - t0
        rss[step] = peak_rss_mb()  # running peak: the step that raised it is the first with the max

    def prepare():
        pipeline.prepare(run, job["manifest"], "A scene from {label}.", "A scene.", job["image_size"])
        pipeline.adopt_model(run, trained)

    seed = job["seed"]
    timed("prepare", prepare)
    timed("typicality", lambda: pipeline.typicality_step(
        run, TypicalityConfig(samples=job["samples"], shard_size=job["shard_size"], seed=seed), progress=False))
    timed("mining", lambda: pipeline.mine_step(run, MineConfig(top=job["top"], seed=seed), progress=False))
    timed("features+cluster", lambda: pipeline.cluster_step(run, ClusterConfig(k=job["k"], seed=seed),
                                                            FeatureConfig(seed=seed), progress=False))
    images = len(run.images())
    patches = len(run.mined_patches("top"))
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"images": images, "top_patches": patches, "seconds": seconds, "rss_after": rss, "base_rss_mb": base_rss,
            "peak_rss_mb": peak_rss_mb(), "gpu_peak_mb": gpu_mb, "threads": torch.get_num_threads(),
            "device": str(pipeline.default_device())}


def child_main(kind: str, job_json: str) -> None:
    import torch

    job = json.loads(job_json)
    torch.set_num_threads(job["threads"])
    result = (child_train if kind == "train" else child_size)(job)
    Path(job["result"]).write_text(json.dumps(result, indent=2))


def in_fresh_process(kind: str, job: dict) -> dict:
    """Run one job in a new interpreter; its peak RSS is its own."""
    result = Path(job["result"])
    result.unlink(missing_ok=True)
    subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(job)], check=True)
    return json.loads(result.read_text())


# --------------------------------------------------------------------------------------------
# the table


def loglog_slope(x, y) -> float:
    """Slope of log(y) against log(x): 1 = linear growth, 0 = constant."""
    return float(np.polyfit(np.log(x), np.log(np.maximum(y, 1e-9)), 1)[0]) if len(x) >= 2 else float("nan")


def linear_fit(x, y) -> tuple[float, float]:
    """(slope, intercept) of y = slope * x + intercept: for seconds, the marginal seconds per
    image and the fixed cost (model loading, first passes) that dominates small sizes."""
    return tuple(float(v) for v in np.polyfit(x, y, 1)) if len(x) >= 2 else (float("nan"), float("nan"))


def peak_step(r: dict) -> str:
    """The step during which the process's peak RSS was reached."""
    return next(s for s in STEPS if r["rss_after"][s] >= r["peak_rss_mb"] - 1e-6)


def table(rows: list[dict], args, train_seconds: float | None) -> str:
    n = [r["images"] for r in rows]
    gpu = any(r["gpu_peak_mb"] is not None for r in rows)
    head = ["images"] + [f"{s} s/img" for s in STEPS] + ["total s/img", "peak RSS MB", "peak in", "RSS after imports MB"]
    head += ["GPU peak MB"] if gpu else []
    lines = [
        f"Embedded model, {args.image_size} px synthetic images ({LABELS} labels, a pool of {args.pool} distinct images), "
        f"K = {args.samples}, shards of {args.shard_size}, top {args.top} per label, k = {args.k}; "
        f"{rows[0]['threads']} torch threads on {rows[0]['device']}"
        + (f"; model trained once, {args.train_steps} steps in {train_seconds:.1f} s (not counted)" if train_seconds
           else f"; model ({args.train_steps} steps) reused from an earlier run of this script")
        + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        per = [r["seconds"][s] / r["images"] for s in STEPS]
        cells = [f"{r['images']:,}"] + [f"{p:.4g}" for p in per] + [
            f"{sum(per):.4g}", f"{r['peak_rss_mb']:.0f}", peak_step(r), f"{r['base_rss_mb']:.0f}"]
        cells += [f"{r['gpu_peak_mb']:.0f}"] if gpu else []
        lines.append("| " + " | ".join(cells) + " |")
    blank = " |" * (len(head) - len(STEPS) - 2)
    seconds = [[r["seconds"][s] for r in rows] for s in STEPS] + [[sum(r["seconds"].values()) for r in rows]]
    exps = [loglog_slope(n, y) for y in seconds]
    fits = [linear_fit(n, y) for y in seconds]
    lines.append("| **exponent** (log s vs log N) | " + " | ".join(f"{e:.2f}" for e in exps) + " |" + blank)
    lines.append("| **marginal s/img** (linear fit) | " + " | ".join(f"{b:.4g}" for b, _ in fits) + " |" + blank)
    lines.append("| **fixed s** (linear fit) | " + " | ".join(f"{a:.1f}" for _, a in fits) + " |" + blank)
    rss = [r["peak_rss_mb"] for r in rows]
    mb_per_1k = 1000 * linear_fit(n, rss)[0]
    lines += [
        "",
        f"Measured slope: time ~ N^{exps[-1]:.2f} overall (typicality N^{exps[1]:.2f}, mining N^{exps[2]:.2f}, "
        f"features+cluster N^{exps[3]:.2f}, which only sees the top {args.top} patches per label); exponent 1 = flat "
        f"cost per image. Marginal cost {fits[-1][0]:.4g} s/img on top of {fits[-1][1]:.1f} s fixed. "
        f"Peak RSS {min(rss):.0f}-{max(rss):.0f} MB from {min(n):,} to {max(n):,} images: "
        f"{mb_per_1k:+.2f} MB per 1,000 images (peak RSS ~ N^{loglog_slope(n, rss):.3f}); 0 = flat memory.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000", help="numbers of images, comma-separated")
    p.add_argument("--samples", type=int, default=2, help="typicality draws K (default: 2)")
    p.add_argument("--out", type=Path, default=Path("/tmp/scale"), help="work folder (data, model, runs, scale.md)")
    p.add_argument("--pool", type=int, default=2000, help="distinct synthetic images, repeated up to the sizes")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--top", type=int, default=1000, help="top patches kept per label by mining")
    p.add_argument("--k", type=int, default=32, help="clusters per label")
    p.add_argument("--threads", type=int, default=cores(), help="torch threads (default: this machine's cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep each size's run directory")
    p.add_argument("--child", nargs=2, metavar=("KIND", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(*args.child)
        return 0

    sizes = sorted({int(s) for s in args.sizes.split(",")})
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifests = make_data(out, args.pool, max(sizes), sizes, args.image_size, args.seed)
    print(f"manifests for {', '.join(map(str, sizes))} images ready in {time.perf_counter() - t0:.1f} s", flush=True)

    # the model, trained once on (up to) the pool and reused while the settings stay the same
    trained = out / "trained"
    stamp = out / "trained.json"
    wanted = {"steps": args.train_steps, "seed": args.seed, "pool": args.pool, "image_size": args.image_size}
    train_seconds = None
    if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        first = out / "data" / "manifest-train.csv"
        shutil.copy(out / "data" / f"manifest-{max(sizes)}.csv", first)
        with first.open() as f:  # the first `pool` rows: every distinct image once
            head = [next(f) for _ in range(min(args.pool, max(sizes)) + 1)]
        first.write_text("".join(head))
        job = {"run": str(trained), "manifest": str(first), "image_size": args.image_size, "steps": args.train_steps,
               "seed": args.seed, "threads": args.threads, "result": str(out / "train-result.json")}
        train_seconds = in_fresh_process("train", job)["seconds"]
        stamp.write_text(json.dumps(wanted))
        print(f"trained the model once: {args.train_steps} steps in {train_seconds:.1f} s", flush=True)

    rows = []
    for n in sizes:
        job = {"trained": str(trained), "run": str(out / "runs" / f"n{n}"), "manifest": str(manifests[n]),
               "image_size": args.image_size, "samples": args.samples, "shard_size": args.shard_size, "top": args.top,
               "k": args.k, "seed": args.seed, "threads": args.threads, "result": str(out / f"result-{n}.json")}
        r = in_fresh_process("size", job)
        rows.append(r)
        s = r["seconds"]
        print(f"{r['images']:>8,} images  " + "  ".join(f"{k} {v:.1f} s" for k, v in s.items())
              + f"  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        if not args.keep:
            shutil.rmtree(job["run"], ignore_errors=True)

    text = table(rows, args, train_seconds)
    print()
    print(text)
    (out / "scale.md").write_text(text + "\n")
    (out / "scale.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                               indent=2))
    print(f"\nwritten: {out / 'scale.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
