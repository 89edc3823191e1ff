"""Report size and time against the number of images: the site shows bounded numbers of things
(k clusters per label, at most ``members`` per cluster page, views of the images whose crops are
shown), so its size levels off once the mined patches per label (``--top``) are all from distinct
images, whatever the collection's size.

    .venv/bin/python benchmarks/report_size.py [--sizes 32 128 512 2048] [--top 200] [--k 8]

Each size: a synthetic dataset (2 labels, 32 px), a 4-step model and K = 2 draws (the maps'
quality does not matter here), mined and clustered; then the report is written into an empty
folder and timed. Prints a Markdown table.
"""

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from diffmine import cli
from diffmine.report import write_report
from diffmine.rundir import Run
from diffmine.synthetic import SynthConfig, generate


def folder_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 2048], help="images per run")
    parser.add_argument("--top", type=int, default=200, help="top patches mined per label")
    parser.add_argument("--k", type=int, default=8, help="clusters per label")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| images | report files | report size | pages | image views | seconds to write |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        root = Path(tempfile.mkdtemp(prefix="report-size-"))
        try:
            images = generate(root / "data", SynthConfig(labels=2, per_label=n // 2, size=32, seed=0), progress=False)
            code = cli.main(["run", "--data", str(images), "--run", str(root / "run"), "--resolution", "32",
                             "--steps", "4", "--batch-size", "8", "--samples", "2", "--top", str(args.top),
                             "--least", "20", "--random", "20", "--k", str(args.k), "--feature-ensemble", "1"])
            assert code == 0
            run = Run(root / "run")
            shutil.rmtree(run.report_path.parent)
            t0 = time.perf_counter()
            write_report(run)
            seconds = time.perf_counter() - t0
            report = run.report_path.parent
            files, size = folder_size(report)
            pages = len(list(report.glob("*.html")))
            views = len(list(report.glob("image-*.html")))
            print(f"| {n} | {files} | {size / 2**20:.2f} MiB | {pages} | {views} | {seconds:.1f} |", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
