"""Adaptive rules replayed offline: the recovered share and draws of any ``AdaptiveConfig``, averaged
over draw orders, without a UNet pass per setting.

    .venv/bin/python benchmarks/adaptive_rules.py --out /tmp/rules --data-seed 0 \\
        --rule first_draws=8 --rule first_draws=4,bound=2,bound_out=2,budget=0
    .venv/bin/python benchmarks/adaptive_rules.py --out /tmp/rules --data-seed 0 --per-label 250 \\
        --top 2 5 12 --fixed 8 16 32 64      # 1,000 other scenes, --top at 1%, 2% and 5% of a label

Setup (once per ``--out``, ~15 min on 2 cores): the small-element scenes of ``adaptive.py quality``
(4 labels x 60 images of 64 px, ``--data-seed``), a tiny model trained 600 steps on them, a 64-draw
reference mined at ``--top 40 --per-image 5`` (stratified-antithetic, seed 0), and every image's
64 nested adaptive draws (seed 1), whose unit maps are kept. With ``--per-label`` other than 60 the
same model scores that many new scenes per label (data seed + 1), as ``adaptive.py cost`` does, and
the reference is mined at the largest ``--top`` (a smaller top is each label's best of it).

Replay: an image refined to n draws has exactly the first n of its 64 (``typicality.nested_draws``),
i.e. the mean of its first n / 2 units, so the rounds of ``adaptive.refine`` can be replayed from
the stored units for any setting. One draw order is a noisy sample (16 fixed draws recover 78-85%
of the reference depending on which 16): every rule is replayed over ``--orders`` orders of the 32
units, j -> j XOR m for m = 0, 4, 8, ...: each is again nested (every prefix of 2^L draws is one
draw per stratum of width 2^-L, in eps / -eps pairs), m = 0 is the real sequence of seed 1, so
its row equals ``adaptive.py quality``'s up to the float16 storage of the maps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from adaptive import NULL, PROMPT, recovered, scored  # noqa: E402

from diffmine import pipeline  # noqa: E402
from diffmine.adaptive import AdaptiveConfig, budget_left, candidates, refine, schedule  # noqa: E402
from diffmine.evaluate import find_mask, load_mask, patch_hits  # noqa: E402
from diffmine.mining import MineConfig, significant  # noqa: E402
from diffmine.rundir import Run  # noqa: E402
from diffmine.synthetic import SynthConfig, generate  # noqa: E402
from diffmine.train import TrainConfig  # noqa: E402
from diffmine.typicality import TypicalityConfig, unit_key  # noqa: E402

TOP, PER_IMAGE, CAP, SIZE = 40, 5, 64, 64


def setup(out: Path, data_seed: int, per_label: int = 60, top: int = TOP) -> tuple[Run, pd.DataFrame]:
    """The all-64 nested run and the reference's top patches (at ``top`` per label; made once, reused).

    The model is trained on the 60 scenes per label of ``data_seed``; with another ``per_label`` it
    scores that many other scenes per label (seed ``data_seed + 1``), as ``adaptive.py cost`` does."""
    data = out / "small"
    if not (data / "images").is_dir():
        generate(data, SynthConfig(labels=4, per_label=60, size=64, element_scale=0.6, seed=data_seed), progress=False)
    model = Run(out / "small-run")
    pipeline.prepare(model, data / "images", PROMPT, NULL, 64)
    pipeline.train_step(model, TrainConfig(steps=600, seed=data_seed), progress=False)
    scenes, suffix = data, ""
    if per_label != 60:
        scenes, suffix = out / f"scenes-{per_label}", f"-{per_label}"
        if not (scenes / "images").is_dir():
            generate(scenes, SynthConfig(labels=4, per_label=per_label, size=64, element_scale=0.6, seed=data_seed + 1),
                     progress=False)
    mine = MineConfig(top=top, per_image=PER_IMAGE)
    for name, config, adaptive in [("q-reference", TypicalityConfig(samples=CAP, seed=0), None),
                                   ("full64", TypicalityConfig(samples=CAP, seed=1, estimator="adaptive"),
                                    AdaptiveConfig(top=top, per_image=PER_IMAGE, first_draws=CAP, budget=0))]:
        if not (out / (name + suffix) / "mining" / "patches.parquet").is_file():
            scored(model, scenes / "images", out / (name + suffix), config, mine, adaptive)
    reference = pd.read_parquet(out / ("q-reference" + suffix) / "mining" / "patches.parquet")
    return Run(out / ("full64" + suffix)), reference[reference["kind"] == "top"]


def top_of(reference: pd.DataFrame, top: int) -> pd.DataFrame:
    """The reference mined at a smaller ``top``: each label's best ``top`` of its top patches."""
    ranked = reference.sort_values("typicality", ascending=False, kind="mergesort")
    return ranked.groupby("label").head(top)


def candidate_table(run: Run, order: np.ndarray, levels: list[int]) -> pd.DataFrame:
    """Per image and level n: its candidates from the units order[: n / 2]."""
    index = run.typicality_index()
    k = int(run.lineage.get("mine")["patch"])
    rows = []
    for shard, table in index[index["status"] == "ok"].groupby("shard"):
        with safe_open(str(run.typicality_dir / f"{shard}.safetensors"), "np") as f:
            for r in table.itertuples():
                units = f.get_tensor(unit_key(r.key)).astype(np.float32)
                for n in levels:
                    chosen = units[order[: n // 2]]
                    ys, xs, s, se = candidates(chosen.mean(0), chosen, (r.height, r.width), k, PER_IMAGE)
                    rows.append(dict(image_id=r.image_id, label=r.label, n=n, cand_y=ys, cand_x=xs, cand_s=s, cand_se=se))
    return pd.DataFrame(rows)


def replay(table: pd.DataFrame, config: AdaptiveConfig) -> dict[str, int]:
    """The final draws of every image under ``config``'s rounds (as ``adaptive._execute`` runs them)."""
    at = {n: g.set_index("image_id") for n, g in table.groupby("n")}
    rounds = schedule(config.first_draws, CAP)
    draws = dict.fromkeys(sorted(table["image_id"].unique()), rounds[0])
    active = set(draws)
    for n in rounds[1:]:
        latest = pd.concat([at[draws[i]].loc[[i]] for i in draws]).reset_index()
        latest["draws"], latest["status"] = latest["image_id"].map(draws), "ok"
        active = refine(latest, active, config, CAP, budget_left(config, latest["draws"]))
        if not active:
            break
        draws.update(dict.fromkeys(active, n))
    return draws


def mined(table: pd.DataFrame, draws: dict[str, int], k: int, top: int = TOP) -> pd.DataFrame:
    """Mining's top set from each image's candidates at its final draws."""
    final = table.merge(pd.DataFrame({"image_id": list(draws), "n": list(draws.values())}), on=["image_id", "n"])
    long = final.explode(["cand_y", "cand_x", "cand_s", "cand_se"]).dropna(subset=["cand_s"])
    long = long[significant(long["cand_s"].to_numpy(float), long["cand_se"].to_numpy(float), MineConfig.z_min)]
    long = long.sort_values("cand_s", ascending=False, kind="mergesort").groupby("label").head(top)
    x, y = long["cand_x"].astype(int).to_numpy(), long["cand_y"].astype(int).to_numpy()
    return pd.DataFrame({"image_id": long["image_id"].to_numpy(), "label": long["label"].to_numpy(),
                         "x0": x, "y0": y, "x1": x + k, "y1": y + k})


def reference_hits(masks: Path, reference: pd.DataFrame) -> dict[str, float]:
    """Per label, the share of the reference's patches on the planted element's mask: how well the
    model learned the label (a label it did not learn has a top of noise no estimator can match)."""
    found = {i: find_mask(masks, i) for i in reference["image_id"].unique()}
    loaded = {i: load_mask(path, (SIZE, SIZE)) for i, path in found.items() if path is not None}
    hits = patch_hits(reference, loaded)
    return {label: float(np.nanmean(hits[(reference["label"] == label).to_numpy()])) for label in reference["label"].unique()}


def parse_rule(text: str, top: int = TOP) -> AdaptiveConfig:
    values = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        values[key] = int(value) if key == "first_draws" else float(value)
    return AdaptiveConfig(top=top, per_image=PER_IMAGE, **values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (data, model, runs kept and reused)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the scenes and of the model's training")
    parser.add_argument("--rule", action="append", default=[],
                        help="AdaptiveConfig fields, e.g. first_draws=8,bound=1.5,bound_out=0.5,budget=16 "
                             "(repeatable; none: the defaults)")
    parser.add_argument("--fixed", type=int, nargs="*", default=[16, 64], help="also every image at n draws")
    parser.add_argument("--orders", type=int, default=8, help="draw orders averaged (at most 8)")
    parser.add_argument("--per-label", type=int, default=60,
                        help="scenes scored per label (60: the model's own training scenes; else new ones)")
    parser.add_argument("--top", type=int, nargs="+", default=[TOP], help="mining's --top per label (one table each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run, reference = setup(args.out, args.data_seed, args.per_label, max(args.top))
    k = int(run.lineage.get("mine")["patch"])
    levels = schedule(2, CAP)[1:]  # 4, 8, ..., 64
    orders = [np.arange(32) ^ m for m in range(0, 4 * min(args.orders, 8), 4)]
    tables = [candidate_table(run, order, levels) for order in orders]
    for top in args.top:
        wanted = top_of(reference, top)
        rules = [(f"fixed {n}", None, n) for n in args.fixed] + [(rule or "defaults", parse_rule(rule, top), None)
                                                                for rule in (args.rule or [""])]
        labels = sorted(wanted["label"].unique())
        print(f"data seed {args.data_seed}, {args.per_label} scenes per label, --top {top}: {len(wanted)} reference "
              f"patches; recovered and draws per image, mean over {len(orders)} draw orders (sd; the real order m = 0); "
              f"per label the mean recovered")
        hits = reference_hits(args.out / ("small" if args.per_label == 60 else f"scenes-{args.per_label}") / "masks",
                              wanted)
        print(f"| rule | recovered | sd | order 0 | draws / image | {' | '.join(labels)} |\n|---|---|---|---|---|"
              + "---|" * len(labels))
        on_element = " | ".join(f"{hits.get(label, float('nan')):.0%}" for label in labels)
        print(f"| (the reference's patches on the planted element) | | | | | {on_element} |")
        for name, config, fixed in rules:
            shares, spent, by_label = [], [], []
            for table in tables:
                draws = dict.fromkeys(table["image_id"].unique(), fixed) if config is None else replay(table, config)
                found = mined(table, draws, k, top)
                shares.append(recovered(wanted, found))
                by_label.append([recovered(wanted[wanted["label"] == label], found[found["label"] == label])
                                 for label in labels])
                spent.append(np.mean(list(draws.values())))
            print(f"| {name} | {np.mean(shares):.1%} | {np.std(shares):.1%} | {shares[0]:.1%} | {np.mean(spent):.2f} | "
                  f"{' | '.join(f'{v:.1%}' for v in np.mean(by_label, axis=0))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
