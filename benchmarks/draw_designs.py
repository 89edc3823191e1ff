"""How the (t, eps) draws are laid out: the spread of a 16-draw box score under several designs.

    .venv/bin/python benchmarks/adaptive_rules.py --out /tmp/rules --data-seed 1   # the model, once
    .venv/bin/python benchmarks/draw_designs.py --out /tmp/rules --reps 12

One tiny model (``adaptive_rules.py``'s, trained on its small-element scenes), ``--images`` scenes
per label. Each design draws K (t, eps) pairs ``--reps`` times with independent seeds; per
replicate every image's typicality map (fp32) gives the score of two kinds of k x k boxes (k the
mining default): the box centred on the planted element's mask, and 4 random boxes away from it.
The table gives, per kind, the mean score over boxes (every design is unbiased, so the means must
agree up to noise) and the root of the mean over boxes of the score's variance across replicates:
the noise one estimate of K draws carries. The boxes share the draws (eps is common to all images),
so the variances of two designs differ by noise of roughly 10% at 40 replicates.

Designs (t uniform in [0.1, 0.7] of the schedule; "strata": one t uniform in each of n equal
parts of the range, as ``typicality.draw_noise`` draws them; the draws of every design depend
only on the replicate's seed):
- ``current``: the default, ``stratified-antithetic``: K strata, draws 2p and 2p + 1 eps / -eps
- ``paper``: K i.i.d. (t, eps), the authors' released code
- ``stratified``: K strata, independent eps (the ``stratified`` estimator)
- ``anti-same-t``: K / 2 strata, each one t for a pair eps / -eps
- ``sign``: K / 4 strata, each one t for eps, -eps, eps * s, -eps * s, s a random sign per
  latent element: the cross terms eps_p eps_q of the loss between elements of opposite signs
  cancel within the group (the diagonal ones remain)
- ``strsign``: K strata, the sign pattern over 4 consecutive draws
- ``ortho``: as ``current``, but the K / 2 pair noises made exactly orthogonal (QR; each row's
  norm set back to sqrt(D)), a Gram-Schmidt in draw order, so it could be nested
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffmine import pipeline
from diffmine.data import load_image, to_model_input
from diffmine.evaluate import load_mask
from diffmine.mining import default_patch_size, patch_scores
from diffmine.rundir import Run
from diffmine.typicality import condition_errors, draw_noise, typicality_from_errors, upsample

SIZE = 64  # the scenes of adaptive_rules.py
DESIGNS = ["current", "paper", "stratified", "anti-same-t", "sign", "strsign", "ortho"]


def scenes(data: Path, per_label: int) -> tuple[torch.Tensor, list[np.ndarray], list[str]]:
    """(B, 3, H, W) pixels in [-1, 1], the element masks and the labels of ``per_label`` scenes per label."""
    images, masks, labels = [], [], []
    for label in sorted(d.name for d in (data / "images").iterdir()):
        for f in sorted((data / "images" / label).glob("*.png"))[:per_label]:
            images.append(load_image(f, SIZE))
            masks.append(load_mask(data / "masks" / label / f.name, (SIZE, SIZE)))
            labels.append(label)
    return to_model_input(np.stack(images)), masks, labels


def boxes_of(masks: list[np.ndarray], k: int, seed: int = 0) -> list[tuple[int, int, int, str]]:
    """(image, y, x, kind): the box centred on each element, and up to 4 random boxes away from it."""
    rng = np.random.default_rng(seed)
    size = masks[0].shape[0]
    boxes = []
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        cy, cx = (int(round(ys.mean())), int(round(xs.mean()))) if len(ys) else (-size, -size)
        if len(ys):
            boxes.append((i, min(max(cy - k // 2, 0), size - k), min(max(cx - k // 2, 0), size - k), "element"))
        for y, x in rng.integers(0, size - k + 1, (4, 2)):
            if abs(y + k / 2 - cy) >= k or abs(x + k / 2 - cx) >= k:
                boxes.append((i, int(y), int(x), "background"))
    return boxes


def signed_groups(generator: torch.Generator, groups: int, shape: tuple) -> torch.Tensor:
    """(4 * groups, *shape): eps, -eps, eps * s, -eps * s per group, s a random sign per element."""
    out = []
    for _ in range(groups):
        eps = torch.randn(*shape, generator=generator)
        s = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        out += [eps, -eps, eps * s, -eps * s]
    return torch.stack(out)


def design(name: str, seed: int, K: int, shape: tuple, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (K,), noise (K, *shape)) of one replicate of ``name``."""
    if name in ("current", "paper", "stratified"):  # the project's own estimators
        return draw_noise(seed, K, shape, T, estimator="stratified-antithetic" if name == "current" else name)

    def strata(n: int) -> torch.Tensor:  # n timesteps, one in each of n equal parts of the t range
        return draw_noise(seed, n, shape, T, estimator="stratified")[0]

    generator = torch.Generator().manual_seed(1000 + seed)
    if name == "anti-same-t":
        eps = torch.randn(K // 2, *shape, generator=generator)
        return strata(K // 2).repeat_interleave(2), torch.stack([eps, -eps], 1).flatten(0, 1)
    if name == "sign":
        return strata(K // 4).repeat_interleave(4), signed_groups(generator, K // 4, shape)
    if name == "strsign":
        return strata(K), signed_groups(generator, K // 4, shape)
    if name == "ortho":
        eps = torch.randn(K // 2, int(np.prod(shape)), generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(eps.T)  # orthonormal columns, in draw order
        eps = (q.T * np.sqrt(eps.shape[1])).float().view(K // 2, *shape)
        return strata(K), torch.stack([eps, -eps], 1).flatten(0, 1)
    raise ValueError(f"unknown design {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="an adaptive_rules.py --out folder (its model and scenes)")
    parser.add_argument("--images", type=int, default=12, help="scenes per label")
    parser.add_argument("--reps", type=int, default=12, help="independent replicates per design")
    parser.add_argument("--draws", type=int, default=16, help="K, a multiple of 4")
    parser.add_argument("--designs", nargs="+", default=DESIGNS, choices=DESIGNS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run(args.out / "small-run")
    backend, _ = pipeline.load_model(run, torch.device("cpu"))
    T = backend.scheduler.config.num_train_timesteps
    pixels, masks, labels = scenes(args.out / "small", args.images)
    size = pixels.shape[-1]
    k = default_patch_size(size, size)
    with torch.inference_mode():
        latents = backend.encode_images(pixels).float()
        # [label, null] per image, the order typicality_from_errors expects
        states = backend.encode_prompts([p for label in labels for p in (run.prompt(label), run.prompt(None))])
        states = states.view(len(labels), 2, *states.shape[1:])
    boxes = boxes_of(masks, k)
    kinds = np.array([b[3] for b in boxes])
    print(f"{len(labels)} scenes, {len(boxes)} boxes of {k} px, K = {args.draws}, {args.reps} replicates")
    print("| design | element: mean | element: sd | background: mean | background: sd | seconds |\n|---|---|---|---|---|---|")
    for name in args.designs:
        t0 = time.perf_counter()
        scores = np.zeros((args.reps, len(boxes)))
        for r in range(args.reps):
            timesteps, noise = design(name, r, args.draws, tuple(latents.shape[1:]), T)
            maps = typicality_from_errors(condition_errors(backend, latents, states, timesteps, noise))  # (B, h, w)
            box_maps = [patch_scores(m, k) for m in upsample(maps.numpy(), (size, size))]
            scores[r] = [box_maps[i][y, x] for i, y, x, _ in boxes]
        mean, var = scores.mean(0), scores.var(0, ddof=1)
        cells = [f"{mean[kinds == kind].mean():+.5f} | {np.sqrt(var[kinds == kind].mean()):.5f}" for kind in ("element", "background")]
        print(f"| {name} | {' | '.join(cells)} | {time.perf_counter() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
