"""The adaptive estimator: the mined set of many draws at the cost of few (issue 17).

    .venv/bin/python benchmarks/adaptive.py quality --out /tmp/adaptive      # (a), ~10 min on 2 cores
    .venv/bin/python benchmarks/adaptive.py cost --out /tmp/adaptive --sizes 1000,10000   # (b)

(a) quality, on scenes with small planted elements (4 labels x 60 images of 64 px, elements at
``--element-scale`` of the default size), one tiny model trained ``--steps`` steps (reused by every
row): a 64-draw reference (stratified-antithetic, seed 0) is mined (``--top 40`` per label, 5
patches per image, significance filter on), then each row is computed with seed 1 and mined the
same way: the share of the reference's top patches it recovers (a top patch of the same image with
box IoU >= 0.5), its mean draws per image and its typicality wall time. Rows: the default (16
draws), a second 64-draw run (the reference's own noise), adaptive with cap 64.

(b) cost at N images (distinct synthetic images of the same kind, the same model), ``--top`` at 1%
of a label's images: draws per image and typicality wall seconds of adaptive (cap 64), the default
(16) and the paper's 100 i.i.d. draws. The fixed-draw estimators cost the same per image at any N:
where ``--measure-fixed`` is below N they are measured on that many images and scaled linearly
(the table says so). Typicality's share of the matmul peak in its own precision (bf16 where
``--precision auto`` takes it): UNet FLOPs of the draws actually spent (torch.utils.flop_counter)
per wall second, over a peak measured in the same run.

Every number of one table comes from one run; torch uses --threads threads (the machine may be
shared: say so beside the numbers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import matmul_peak, unet_flops  # noqa: E402

from diffmine import pipeline  # noqa: E402
from diffmine.adaptive import AdaptiveConfig  # noqa: E402
from diffmine.machine import resolve_precision  # noqa: E402
from diffmine.mining import MineConfig  # noqa: E402
from diffmine.rundir import Run  # noqa: E402
from diffmine.synthetic import SynthConfig, generate  # noqa: E402
from diffmine.train import TrainConfig  # noqa: E402
from diffmine.typicality import TypicalityConfig  # noqa: E402

PROMPT, NULL = "A scene from {label}.", "A scene."


def trained_model(out: Path, steps: int, element_scale: float) -> Run:
    """The small-element scenes (4 x 60) and a tiny model trained on them (made once, reused)."""
    data = out / "small"
    if not (data / "images").is_dir():
        generate(data, SynthConfig(labels=4, per_label=60, size=64, element_scale=element_scale, seed=0), progress=False)
    run = Run(out / "small-run")
    pipeline.prepare(run, data / "images", PROMPT, NULL, 64)
    pipeline.train_step(run, TrainConfig(steps=steps), progress=False)
    return run


def scored(model: Run, data: Path, path: Path, config: TypicalityConfig, mine: MineConfig,
           adaptive: AdaptiveConfig | None = None) -> dict:
    """A fresh run of ``data`` with ``model``'s model: typicality (timed) and mining."""
    shutil.rmtree(path, ignore_errors=True)
    run = Run(path)
    pipeline.prepare(run, data, PROMPT, NULL, 64)
    pipeline.adopt_model(run, model)
    t0 = time.perf_counter()
    pipeline.typicality_step(run, config, progress=False, adaptive=adaptive)
    seconds = time.perf_counter() - t0
    draws = run.typicality_index()["draws"].to_numpy()
    patches = pipeline.mine_step(run, mine, progress=False)
    return {"run": run, "seconds": seconds, "draws": draws, "top": patches[patches["kind"] == "top"]}


def recovered(reference: pd.DataFrame, other: pd.DataFrame, iou: float = 0.5) -> float:
    """Share of ``reference``'s patches with a patch of ``other`` on the same image at IoU >= ``iou``."""
    boxes = {image_id: g[["x0", "y0", "x1", "y1"]].to_numpy() for image_id, g in other.groupby("image_id")}
    hits = 0
    for r in reference.itertuples():
        b = boxes.get(r.image_id)
        if b is None:
            continue
        w = np.clip(np.minimum(b[:, 2], r.x1) - np.maximum(b[:, 0], r.x0), 0, None)
        h = np.clip(np.minimum(b[:, 3], r.y1) - np.maximum(b[:, 1], r.y0), 0, None)
        inter = w * h
        union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (r.x1 - r.x0) * (r.y1 - r.y0) - inter
        hits += bool((inter / union >= iou).any())
    return hits / max(1, len(reference))


def draws_histogram(draws: np.ndarray) -> str:
    values, counts = np.unique(draws, return_counts=True)
    return ", ".join(f"{v}: {c}" for v, c in zip(values, counts))


def quality(args) -> None:
    model = trained_model(args.out, args.steps, args.element_scale)
    data = args.out / "small" / "images"
    mine = MineConfig(top=40, per_image=5)
    stored = args.out / "q-reference" / "mining" / "patches.parquet"
    if args.adaptive_only and stored.is_file():  # the reference of an earlier full run, reused
        patches = pd.read_parquet(stored)
        reference = {"top": patches[patches["kind"] == "top"], "seconds": float("nan")}
    else:
        reference = scored(model, data, args.out / "q-reference", TypicalityConfig(samples=64, seed=0), mine)
    rows = [] if args.adaptive_only else [("default, 16 draws", TypicalityConfig(samples=16, seed=1), None),
                                          ("64 draws, another seed", TypicalityConfig(samples=64, seed=1), None)]
    rows += [(f"adaptive, cap 64 (first {first}, bound {bound} / out {out}, budget {budget:g})",
              TypicalityConfig(samples=64, seed=1, estimator="adaptive"),
              AdaptiveConfig(top=40, per_image=5, first_draws=first, bound=bound, bound_out=out, budget=budget))
             for first, bound, out, budget in itertools.product(args.first_draws, args.bound, args.bound_out, args.budget)]
    lines = [f"reference: 64 draws seed 0, {len(reference['top'])} top patches, {reference['seconds']:.1f} s",
             "| estimator (seed 1) | recovered | mean draws / image | typicality s | draws: images |",
             "|---|---|---|---|---|"]
    for name, config, adaptive in rows:
        shown = len(lines)
        got = scored(model, data, args.out / "q-row", config, mine, adaptive)
        share = recovered(reference["top"], got["top"])
        lines.append(f"| {name} | {share:.1%} | {got['draws'].mean():.2f} | {got['seconds']:.1f} | "
                     f"{draws_histogram(got['draws'])} |")
        if adaptive is not None:  # where the draws went: the reference's top images vs the others
            (n_in, in_draws), (n_out, out_draws) = draws_of_holders(got["run"], reference["top"])
            lines.append(f"|  where: images with a reference top patch | | {in_draws:.2f} | | {n_in} images |")
            lines.append(f"|  where: the other images | | {out_draws:.2f} | | {n_out} images |")
        print("\n".join(lines[shown:]), flush=True)
    report(args, "quality", lines)


def cost(args) -> None:
    model = trained_model(args.out, args.steps, args.element_scale)
    backend = pipeline.load_model(model)[0]
    f = backend.latent_factor
    per_input = unet_flops(backend, 16, (3 * f * f, 64 // f, 64 // f)) / 16
    precision = resolve_precision(TypicalityConfig.precision)  # what the rows compute in (auto: bf16 where native)
    a = torch.randn(2048, 2048, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    peaks, went = [], []
    lines = [f"UNet {per_input / 1e6:.1f} MFLOP per input; typicality in {precision}; % of peak: of the {precision} "
             "matmul peak (2048^2) measured just before each row (a shared machine's peak varies)",
             "| images | estimator | top / label | mean draws / image | typicality s | s / 1k images | % of peak | note |",
             "|---|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        data = args.out / f"cost-{n}"
        if not (data / "images").is_dir():
            generate(data, SynthConfig(labels=4, per_label=n // 4, size=64, element_scale=args.element_scale, seed=1),
                     progress=False)
        top = max(1, n // 4 // 100)
        mine = MineConfig(top=top, per_image=5)
        rows = [("adaptive, cap 64", TypicalityConfig(samples=64, estimator="adaptive"),
                 AdaptiveConfig(top=top, per_image=5, first_draws=args.first_draws[0], bound=args.bound[0],
                                bound_out=args.bound_out[0], budget=args.budget[0]), n),
                ("default, 16 draws", TypicalityConfig(samples=16), None, min(n, args.measure_fixed)),
                ("paper, 100 i.i.d. draws", TypicalityConfig(samples=100, estimator="paper"), None,
                 min(n, args.measure_paper))]
        for name, config, adaptive, measured in rows:
            if measured == 0:  # --measure-fixed / --measure-paper 0: not measured at this size
                continue
            subset = data / "images" if measured == n else subset_folder(data, measured)
            peak = matmul_peak(a, a)
            peaks.append(peak)
            got = scored(model, subset, args.out / "c-row", config, mine, adaptive)
            scale = n / measured
            inputs = 2 * got["draws"].sum()
            share = inputs * per_input / got["seconds"] / peak
            note = "measured" if measured == n else f"measured on {measured} images, x{scale:g}"
            lines.append(f"| {n} | {name} | {top} | {got['draws'].mean():.2f} | {got['seconds'] * scale:.0f} | "
                         f"{got['seconds'] / measured * 1000:.1f} | {share:.1%} | {note} |")
            print(lines[-1], flush=True)
            if adaptive is not None:
                went.append(f"{n} images, {name}: " + where_the_draws_went(got))
    lines += [""] + went
    lines.append(f"\n{precision} matmul peak over the rows: {', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s")
    report(args, "cost", lines)


def draws_of_holders(run: Run, top: pd.DataFrame) -> tuple[tuple[int, float], tuple[int, float]]:
    """(images, mean draws) of the images holding a patch of ``top``, then of the others."""
    index = run.typicality_index()
    holds = index["image_id"].isin(set(top["image_id"]))
    return ((int(holds.sum()), float(index.loc[holds, "draws"].mean())),
            (int((~holds).sum()), float(index.loc[~holds, "draws"].mean())))


def where_the_draws_went(got: dict) -> str:
    """How many images stopped at each draw count; the mean draws of the images holding one of the
    row's own mined top patches against the others'."""
    (n_in, in_draws), (n_out, out_draws) = draws_of_holders(got["run"], got["top"])
    return (f"images at {draws_histogram(got['draws'])}; the {n_in} holding a mined top patch got {in_draws:.1f} "
            f"draws, the other {n_out} {out_draws:.2f}")


def subset_folder(data: Path, n: int) -> Path:
    """A manifest of the first n images of ``data`` (labels interleaved)."""
    out = data / f"subset-{n}.csv"
    labels = sorted(p for p in (data / "images").iterdir() if p.is_dir())
    files = {label.name: sorted(label.iterdir()) for label in labels}
    rows = [(files[labels[j % len(labels)].name][j // len(labels)], labels[j % len(labels)].name) for j in range(n)]
    out.write_text("path,label\n" + "".join(f"{path.relative_to(data)},{label}\n" for path, label in rows))
    return out


def report(args, kind: str, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / f"adaptive-{kind}.md").write_text(text)
    (args.out / f"adaptive-{kind}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                 "lines": lines}, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("quality", "cost"), help="(a) mined-set agreement or (b) cost at scale")
    parser.add_argument("--out", type=Path, required=True, help="working folder (data and model kept, reused)")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the model")
    parser.add_argument("--element-scale", type=float, default=0.6, help="planted element size vs the default")
    rows = "(quality: one row per combination of values; cost: the first)"
    parser.add_argument("--first-draws", type=int, nargs="+", default=[AdaptiveConfig.first_draws],
                        help=f"adaptive: draws of the first round {rows}")
    parser.add_argument("--bound", type=float, nargs="+", default=[AdaptiveConfig.bound],
                        help=f"adaptive: confidence bound of a candidate in the top, in standard errors {rows}")
    parser.add_argument("--bound-out", type=float, nargs="+", default=[AdaptiveConfig.bound_out],
                        help=f"adaptive: confidence bound of a candidate out of the top {rows}")
    parser.add_argument("--budget", type=float, nargs="+", default=[AdaptiveConfig.budget],
                        help=f"adaptive: mean draws per image at most, 0: none {rows}")
    parser.add_argument("--adaptive-only", action="store_true", help="quality: only the adaptive rows")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000],
                        help="cost: collection sizes (comma-separated)")
    parser.add_argument("--measure-fixed", type=int, default=1000,
                        help="cost: the default estimator is measured on at most this many images, scaled linearly (0: skipped)")
    parser.add_argument("--measure-paper", type=int, default=200,
                        help="cost: the paper's estimator is measured on at most this many images, scaled linearly (0: skipped)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (quality if args.kind == "quality" else cost)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
