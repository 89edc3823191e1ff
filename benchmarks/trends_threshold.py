"""Trends' presence threshold: two or three groups of best matches, chosen by AIC or BIC.

    .venv/bin/python benchmarks/trends_threshold.py --out /tmp/trends-threshold --data-seeds 0 1 2
    .venv/bin/python benchmarks/trends_threshold.py --simulate          # no model: Gaussian groups

With ``--out``: per data seed, the slow trends test's fixture (tests/test_trends.py: the ordered
set at 64 px, 16 images per era, 80 control images, 600 steps of batch 16, 8 draws) is built once
under OUT/seed-S (minutes each; reused when there) and measured with ``diffmine.trends``, keeping
every element cluster's best match per image. Each rule then calls presence on those stored
matches. Scored: every cluster that tells one planted element apart (AUC of its best matches
against the element's masks >= 0.95), by the images whose presence call disagrees with the
masks, summed over clusters (80 images per cluster), and by the mean absolute error of its
prevalence per era against the share the masks give.

``--simulate``: the same rules on Gaussian groups of best matches (mean, sd, count, element or
not), 200 draws per scenario at 80 values, 10 at 800 and 8,000: mean disagreements per 80 values.

Rules: ``aic`` (``trends.upper_group_cut``, the default), ``bic`` (the same choice with BIC's
ln N per parameter, the rule before), ``two`` (Otsu's two groups), ``three`` (always the upper of
three groups).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

RULES = ("aic", "bic", "two", "three")
SCENARIOS = {  # (mean, sd, count, carries the element) per group
    "two groups 60/20": [(0.2, 0.05, 60, False), (0.8, 0.05, 20, True)],
    "two groups 40/40": [(0.3, 0.1, 40, False), (0.8, 0.1, 40, True)],
    "two groups 20/60": [(0.3, 0.1, 20, False), (0.8, 0.1, 60, True)],
    "two groups 70/10": [(0.3, 0.1, 70, False), (0.8, 0.08, 10, True)],
    "two, the absent ones wide": [(0.3, 0.15, 60, False), (0.85, 0.06, 20, True)],
    "three: 10 unlike, 30 look-alike, 40 element": [(0.0, 0.08, 10, False), (0.45, 0.12, 30, False), (0.82, 0.1, 40, True)],
    "three: 40 unlike, 20 look-alike, 20 element": [(0.1, 0.08, 40, False), (0.5, 0.08, 20, False), (0.85, 0.06, 20, True)],
    "three: 40 unlike, 32 look-alike, 8 element": [(0.1, 0.08, 40, False), (0.5, 0.08, 32, False), (0.85, 0.06, 8, True)],
}


def cut(values: np.ndarray, rule: str) -> float:
    """The presence threshold of (N,) best matches by ``rule``."""
    from skimage.filters import threshold_multiotsu

    from diffmine import trends

    v = values[np.isfinite(values)]
    two = trends.two_group_split(v)
    if rule == "aic":
        return trends.upper_group_cut(v)
    three = [float(c) for c in threshold_multiotsu(v, classes=3)]
    upper = trends.two_group_split(v[v >= three[0]])
    if rule == "two":
        return two
    if rule == "three":
        return upper
    # bic: the AIC of trends._groups_aic with ln N in place of 2 per parameter (3 per group)
    bic = lambda cuts: trends._groups_aic(v, cuts) + 3 * (len(cuts) + 1) * (np.log(len(v)) - 2)  # noqa: E731
    return two if bic(three) >= bic([two]) else upper


def build(out: Path, seed: int) -> Path:
    """OUT/seed-S/matches.pkl: the fixture's best matches per image and element, the image ids,
    the elements' planted masks per image. Built once."""
    import dataclasses

    import torch
    from PIL import Image

    from diffmine import pipeline, trends
    from diffmine.clustering import ClusterConfig
    from diffmine.features import FeatureConfig
    from diffmine.mining import MineConfig
    from diffmine.rundir import Run
    from diffmine.synthetic import ORDERED_ELEMENTS, OrderedConfig, generate_ordered
    from diffmine.train import TrainConfig
    from diffmine.typicality import TypicalityConfig

    root = out / f"seed-{seed}"
    stored = root / "matches.pkl"
    if stored.is_file():
        return stored
    torch.set_num_threads(2)
    config = OrderedConfig(eras=5, per_label=16, size=64, distractors=0, element_scale=1.0, control=80, seed=seed)
    order = [f"era{i + 1}" for i in range(config.eras)]
    run = Run(root / "run")
    data = generate_ordered(root / "data", config, progress=False)
    pipeline.prepare(run, data, "A scene from {label}.", "A scene.", config.size)
    pipeline.train_step(run, TrainConfig(steps=600, batch_size=16, checkpoint_every=1000, seed=0), progress=False)
    pipeline.typicality_step(run, TypicalityConfig(samples=8, shard_size=50, seed=0), progress=False)
    pipeline.mine_step(run, MineConfig(per_image=5, top=1000, least=5, random=5), progress=False)
    pipeline.cluster_step(run, ClusterConfig(k=6), FeatureConfig(ensemble=2), progress=False)
    kept = {}
    real = trends.element_thresholds

    def keep(best, member_thresholds, rule):  # the best matches the step computes
        kept["best"] = best.copy()
        return real(best, member_thresholds, rule)

    trends.element_thresholds = keep
    try:
        pipeline.trends_step(run, order, trends.TrendsConfig(), progress=False)
    finally:
        trends.element_thresholds = real
    ok = run.typicality_store.ok()
    ids = ok.loc[ok["label"].isin(order), "image_id"].tolist()
    masks = root / "data" / "masks"
    planted = {e: np.array([(masks / e / i).is_file() and bool((np.asarray(Image.open(masks / e / i)) > 0).any())
                            for i in ids]) for e in ORDERED_ELEMENTS}
    stored.write_bytes(pickle.dumps({"best": kept["best"], "ids": ids, "planted": planted}))
    return stored


def score_fixture(stored: Path) -> dict:
    """Per rule, over the clusters that tell an element apart: the images whose presence call
    disagrees with the masks (summed), and the mean absolute error of prevalence per era against
    the planted share (the masks')."""
    from sklearn.metrics import roc_auc_score

    saved = pickle.loads(stored.read_bytes())
    best, planted = saved["best"], saved["planted"]
    eras = np.array([image_id.split("/")[0] for image_id in saved["ids"]])
    errors, prevalence_error = dict.fromkeys(RULES, 0), dict.fromkeys(RULES, 0.0)
    clusters = 0
    for e in range(best.shape[1]):
        v = best[:, e]
        auc = {name: roc_auc_score(has, v) for name, has in planted.items() if 0 < has.mean() < 1}
        element = max(auc, key=auc.get)
        if auc[element] < 0.95:
            continue
        clusters += 1
        truth = planted[element]
        for rule in RULES:
            present = v >= cut(v, rule)
            errors[rule] += int((present != truth).sum())
            prevalence_error[rule] += np.mean([abs(present[eras == era].mean() - truth[eras == era].mean())
                                               for era in np.unique(eras)])
    return {"clusters": clusters, "errors": errors,
            "prevalence_error": {rule: prevalence_error[rule] / max(clusters, 1) for rule in RULES}}


def simulate(scale: int, reps: int, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    table = {}
    for name, groups in SCENARIOS.items():
        errors = dict.fromkeys(RULES, 0.0)
        for _ in range(reps):
            v = np.concatenate([rng.normal(m, s, n * scale) for m, s, n, _ in groups])
            truth = np.concatenate([np.full(n * scale, e) for _, _, n, e in groups])
            for rule in RULES:
                errors[rule] += ((v >= cut(v, rule)) != truth).sum() / scale / reps
        table[name] = errors
    return table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="where the fixtures are built (and reused)")
    p.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--simulate", action="store_true", help="Gaussian groups, no model")
    args = p.parse_args(argv)
    if args.out is None and not args.simulate:
        p.error("give --out, --simulate or both")
    print("disagreements with the masks (images, summed over clusters); mean abs. prevalence error per era")
    print("| fixture | clusters | " + " | ".join(RULES) + " |\n|---|---|" + "---|" * len(RULES))
    for seed in args.data_seeds if args.out else []:
        scored = score_fixture(build(args.out, seed))
        print(f"| data seed {seed} | {scored['clusters']} | " + " | ".join(
            f"{scored['errors'][r]}; {scored['prevalence_error'][r]:.3f}" for r in RULES) + " |")
        sys.stdout.flush()
    if args.simulate:
        rng = np.random.default_rng(0)
        for scale, reps in ((1, 200), (10, 10), (100, 10)):
            print(f"\n{80 * scale} values: mean disagreements per 80")
            print("| groups | " + " | ".join(RULES) + " |\n|---|" + "---|" * len(RULES))
            for name, errors in simulate(scale, reps, rng).items():
                print(f"| {name} | " + " | ".join(f"{errors[r]:.2f}" for r in RULES) + " |")


if __name__ == "__main__":
    main()
