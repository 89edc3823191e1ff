"""Estimator efficiency: how many (t, eps) draws each typicality estimator needs for the ranking.

    .venv/bin/python benchmarks/estimator.py --run runs/demo [--images 48] [--reference 256]

For a trained run, a reference typicality is computed with ``--reference`` i.i.d. draws (its own
seed). Then, for each estimator and K, maps from other seeds are scored by the Spearman rank
correlation of their patch scores (the mean over every patch position, as mining ranks them)
with the reference's, over all patches of all images; mean over ``--repeats`` seeds.

Estimators (``--estimator`` of ``diffmine typicality``):
  paper                  t i.i.d. uniform in [t_min, t_max], eps i.i.d. (the authors' code)
  stratified             one t per equal-width stratum, eps i.i.d.
  stratified-antithetic  stratified t, eps and -eps in pairs (the default)
All share (t, eps) between the label and null terms (common random numbers).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from diffmine.data import load_image, to_model_input
from diffmine.mining import default_patch_size, patch_scores
from diffmine.pipeline import load_model
from diffmine.rundir import open_run
from diffmine.typicality import ESTIMATORS, TypicalityConfig, typicality_latent_maps, upsample


def patch_ranking(maps: torch.Tensor, size: tuple[int, int], k: int) -> np.ndarray:
    """(B, h, w) latent maps -> all patch scores of all images, flattened."""
    return np.concatenate([patch_scores(m, k).ravel() for m in upsample(maps, size)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--reference", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 25, 50, 100])
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    run = open_run(args.run)
    backend, _ = load_model(run)
    backend.denoiser.eval()
    dataset = run.step_config("dataset")
    rows = run.images().groupby("label").head(max(1, args.images // len(run.labels))).reset_index(drop=True)
    size = (dataset["resolution"], dataset["resolution"])
    k = default_patch_size(*size)
    pixels = to_model_input(np.stack([load_image(p, dataset["resolution"]) for p in rows["path"]]))
    prompts = [run.prompt(l) for l in rows["label"]]
    null = run.prompt(None)

    def maps(config):
        return typicality_latent_maps(backend, pixels, prompts, null, config)

    t0 = time.time()
    reference = patch_ranking(maps(TypicalityConfig(samples=args.reference, estimator="paper", seed=10_000)), size, k)
    print(f"{len(rows)} images, patch {k}px, reference: {args.reference} i.i.d. draws ({time.time() - t0:.0f} s)\n")
    default = TypicalityConfig().estimator
    print(f"{'K':>5} " + " ".join(f"{e + (' *' if e == default else ''):>24}" for e in ESTIMATORS) + "   (* default)")
    for K in args.ks:
        cells = []
        for estimator in ESTIMATORS:
            rhos = [spearmanr(patch_ranking(maps(TypicalityConfig(samples=K, estimator=estimator, seed=s)), size, k),
                              reference).statistic for s in range(args.repeats)]
            cells.append(f"{np.mean(rhos):>24.3f}")
        print(f"{K:>5} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
