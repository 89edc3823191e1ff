"""What the lineage record costs: listing (content fingerprints), re-listing, and a no-op check.

    python benchmarks/lineage.py [--images 1000 10000]

For each size: a manifest of N images (copies of the built-in set's 64 px PNGs under distinct
names), then
- first listing: every image's bytes hashed;
- re-listing unchanged: the size + mtime cache spares the reads (one stat per image);
- re-listing after `cp -r` of the data (new mtimes, same bytes): everything hashed again, and the
  listing's identity is unchanged (asserted), so no result would be recomputed;
- `plan` of a step whose record matches (what a finished `diffmine run` does per step).
Times are medians of --rounds; the ratios are the point (one run, one machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def make_manifest(root: Path, n: int, source: Path) -> Path:
    pngs = sorted(source.rglob("*.png"))
    rows = ["path,label"]
    for i in range(n):
        src = pngs[i % len(pngs)]
        label = src.parent.name
        dst = root / label / f"{i:07d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        rows.append(f"{label}/{dst.name},{label}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from diffmine import pipeline
    from diffmine.lineage import plan
    from diffmine.rundir import Run
    from diffmine.synthetic import SynthConfig, generate

    print(f"cpu: {open('/proc/cpuinfo').read().split('model name')[1].split(':')[1].splitlines()[0].strip()}, "
          f"{len(os.sched_getaffinity(0))} usable cores")
    print(f"{'images':>8} {'first s':>8} {'re-list s':>10} {'after cp s':>11} {'first/re-list':>14} {'plan ms':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = generate(tmp / "synth", SynthConfig(labels=4, per_label=40, size=64, seed=0), progress=False)
        for n in args.images:
            data = tmp / f"data-{n}"
            manifest = make_manifest(data, n, source)
            run = Run(tmp / f"run-{n}")

            def first():
                shutil.rmtree(run.path, ignore_errors=True)
                pipeline.prepare(run, manifest, "An image of {label}.", "An image.", 64)

            first_s = timed(first, args.rounds)
            identity = run.lineage.get("listing")["identity"]
            relist_s = timed(lambda: pipeline.prepare(run, manifest, "An image of {label}.", "An image.", 64),
                             args.rounds)
            copied = tmp / f"copy-{n}"
            subprocess.run(["cp", "-r", str(data), str(copied)], check=True)
            t0 = time.perf_counter()
            pipeline.prepare(run, copied / "manifest.csv", "An image of {label}.", "An image.", 64)
            copy_s = time.perf_counter() - t0
            assert run.lineage.get("listing")["identity"] == identity, "a copied dataset must be the same listing"
            record = run.lineage.get("listing")
            plan_s = timed(lambda: plan(run.lineage, "listing", record["settings"], record["inputs"]), args.rounds)
            print(f"{n:>8} {first_s:>8.2f} {relist_s:>10.2f} {copy_s:>11.2f} {first_s / relist_s:>14.1f} "
                  f"{plan_s * 1e3:>8.2f}")
            shutil.rmtree(copied)
            shutil.rmtree(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
