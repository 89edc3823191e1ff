"""The orthogonal estimator against the paper's loss difference: less noise, but another answer.

    .venv/bin/python benchmarks/estimands.py --out /tmp/estimands --data-seed 1

Per draw (t, eps), with a = eps_theta(x_t, null) and b = eps_theta(x_t, c), the paper's typicality
term is the loss difference ||a - eps||^2 - ||b - eps||^2 = ||a - b||^2 + 2 (a - b).(b - eps).
The second part carries the draw's eps, and so most of its noise; its mean over the data of label c
is zero for an ideal model (b = E[eps | x_t, c]), so both have the same mean over the label's images:
the squared difference of the two predictions is the non-negative form of the information between
image and prompt that Kong et al. ("Interpretable Diffusion via Information Decomposition", ICLR
2024) decompose per pixel. Per image the two differ: ||a - b||^2 is > 0 wherever the prompt changes
the prediction, helpful or not; the loss difference is signed. The question for issue 17: at
16 draws, does the orthogonal estimator agree better with a 64-draw reference of the loss difference
than 16 draws of the loss difference do?

Setup (``adaptive_rules.py``'s): the small-element scenes (4 labels x 60 images of 64 px,
``--data-seed``), a tiny model trained 600 steps on them, a 64-draw reference (stratified-
antithetic, seed 0) mined at ``--top 40 --per-image 5``. Rows: each estimand (the loss difference,
or the orthogonal term; both from diffmine's default stratified-antithetic draws) at 16 and 64 draws
(seed 1) and at 16 draws with seeds 2 and 3; per row the share of the reference's top patches
recovered (box IoU >= 0.5, ``adaptive.recovered``), per label and overall, and the mined patches'
hit rate on the planted elements' masks.

The orthogonal rows swap ``typicality.condition_errors`` for :func:`orthogonal_errors` inside the
step (a benchmark only: the estimator is not part of diffmine).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from adaptive import NULL, PROMPT, recovered, scored  # noqa: E402

from diffmine import pipeline, typicality  # noqa: E402
from diffmine.evaluate import evaluate_run  # noqa: E402
from diffmine.machine import set_threads  # noqa: E402
from diffmine.mining import MineConfig  # noqa: E402
from diffmine.rundir import Run  # noqa: E402
from diffmine.synthetic import SynthConfig, generate  # noqa: E402
from diffmine.train import TrainConfig  # noqa: E402
from diffmine.typicality import TypicalityConfig  # noqa: E402


@torch.inference_mode()
def orthogonal_errors(backend, latents, states, timesteps, noise, batch_size=0, precision="fp32",
                      fixed_shape=False, per_draw=False) -> torch.Tensor:
    """``typicality.condition_errors``'s contract for M = 2 conditions [label, null], with the
    orthogonal term in the null slot and 0 in the label's, so that null - label = ||b - a||^2.

    Returns: (B, 2, h, w), or (B, 2, K, h, w) with ``per_draw``."""
    B, M = states.shape[:2]
    assert M == 2, "label and null prompt"
    K = timesteps.shape[0]
    alphas = backend.scheduler.alphas_cumprod.to(dtype=torch.float32)
    totals = torch.zeros(B, M, K, *latents.shape[2:])
    for b in range(B):
        for k in torch.arange(K).split(32):
            a = alphas[timesteps[k]].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents[b:b + 1] + (1 - a).sqrt() * noise[k]
            with typicality.autocast(backend.device, precision):
                pred = backend.denoiser(noisy.repeat_interleave(M, 0), timesteps[k].repeat_interleave(M, 0),
                                        states[b].repeat(len(k), 1, 1))
            pred = pred.float().view(len(k), M, *pred.shape[1:])  # [label, null] per draw
            totals[b, 1, k] = (pred[:, 0] - pred[:, 1]).pow(2).mean(1)
    return totals if per_draw else totals.mean(2)


@contextmanager
def estimand(name: str):
    """Within the block, typicality computes ``name``: "difference" (the paper's, diffmine's) or "orthogonal"."""
    original = typicality.condition_errors
    if name == "orthogonal":
        typicality.condition_errors = orthogonal_errors
    try:
        yield
    finally:
        typicality.condition_errors = original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-seed", type=int, default=1)
    args = parser.parse_args()
    set_threads(None)
    data = args.out / "small"
    if not (data / "images").is_dir():
        generate(data, SynthConfig(labels=4, per_label=60, size=64, element_scale=0.6, seed=args.data_seed), progress=False)
    model = Run(args.out / "small-run")
    pipeline.prepare(model, data / "images", PROMPT, NULL, 64)
    pipeline.train_step(model, TrainConfig(steps=600, seed=args.data_seed), progress=False)
    mine = MineConfig(top=40, per_image=5)
    reference = scored(model, data / "images", args.out / "reference", TypicalityConfig(samples=64, seed=0), mine)["top"]
    labels = sorted(reference["label"].unique())
    print(f"| estimand | draws | seed | recovered | {' | '.join(labels)} | top patches on the element |")
    print(f"|---|---|---|---|{'---|' * len(labels)}---|")
    for name, samples, seed in [("difference", 16, 1), ("orthogonal", 16, 1), ("difference", 64, 1),
                                ("orthogonal", 64, 1), ("difference", 16, 2), ("orthogonal", 16, 2),
                                ("difference", 16, 3), ("orthogonal", 16, 3)]:
        path = args.out / f"{name}-{samples}-{seed}"
        with estimand(name):
            row = scored(model, data / "images", path, TypicalityConfig(samples=samples, seed=seed), mine)
        top = row["top"]
        per_label = [recovered(reference[reference["label"] == l], top[top["label"] == l]) for l in labels]
        hits = evaluate_run(Run(path), data / "masks")["hit_rate"]["top"]["overall"]
        print(f"| {name} | {samples} | {seed} | {recovered(reference, top):.1%} | "
              f"{' | '.join(f'{v:.1%}' for v in per_label)} | {hits:.1%} |", flush=True)
    hits = evaluate_run(Run(args.out / "reference"), data / "masks")["hit_rate"]["top"]["overall"]
    print(f"the reference's top patches on the element: {hits:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
