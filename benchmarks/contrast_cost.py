"""Cost per image of contrast maps against typicality's, on one trained run.

    .venv/bin/python benchmarks/contrast_cost.py --run RUN --a LABEL [--images 24] [--samples 8] [--rounds 3]

Times, on the same images and draws, typicality ([label, null]: M = 2 prompts per draw), a pairwise
contrast ([A, B]: M = 2) and a contrast against every other label ([A, all others]: M = |labels|),
each the whole map computation (encoding, UNet passes, averaging); rounds interleave the three so
that a shared machine's drift hits them alike; prints the median images/s and the ratio to
typicality's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffmine.contrast import contrast_latent_maps
from diffmine.data import load_image, to_model_input
from diffmine.pipeline import load_model
from diffmine.rundir import open_run
from diffmine.typicality import TypicalityConfig, typicality_latent_maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--a", required=True, help="the contrasted label")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    run = open_run(args.run)
    backend, _ = load_model(run, device=torch.device("cpu"))
    listing = run.images()
    paths = listing[listing["label"] == args.a]["path"].head(args.images).tolist()
    resolution = run.step_config("dataset")["resolution"]
    pixels = to_model_input(np.stack([load_image(p, resolution, "square", backend.latent_factor) for p in paths]))
    config = TypicalityConfig(samples=args.samples)
    a, others = run.prompt(args.a), [run.prompt(label) for label in run.labels if label != args.a]
    paths_to_time = {
        "typicality [label, null]": lambda: typicality_latent_maps(backend, pixels, [a] * len(pixels), run.prompt(None), config),
        "contrast A vs B": lambda: contrast_latent_maps(backend, pixels, a, others[:1], config),
        f"contrast A vs all ({len(others)} others)": lambda: contrast_latent_maps(backend, pixels, a, others, config),
    }
    rates = {name: [] for name in paths_to_time}
    for _ in range(args.rounds):
        for name, compute in paths_to_time.items():
            start = time.perf_counter()
            compute()
            rates[name].append(len(pixels) / (time.perf_counter() - start))
    base = float(np.median(rates["typicality [label, null]"]))
    print(f"{len(pixels)} images, K = {args.samples} draws, median of {args.rounds} rounds")
    for name, values in rates.items():
        rate = float(np.median(values))
        print(f"{name:<32} {rate:7.2f} img/s   {base / rate:5.2f}x typicality's time per image")


if __name__ == "__main__":
    main()
