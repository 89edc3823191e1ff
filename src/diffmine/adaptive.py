"""Adaptive typicality (``--estimator adaptive``): few draws for every image, more only where the
mined set can still change.

Mining needs the exact order only near the top: each label's best ``top`` patches, each taken
among an image's ``per_image`` best boxes. Most images' candidates are clearly below their label's
``top``-th best after a few draws; spending K draws on them changes nothing that is mined.

Draws. One fixed sequence per seed and latent shape (``typicality.nested_draws``): every prefix of
2^m draws is a stratified-antithetic set, and an image refined to n draws used exactly the first
n. The sequence does not depend on the cap (``samples``).

Rounds. Round 0 gives every image the first ``first_draws`` draws; round r >= 1 doubles the draws
(at most ``samples``) of the images still undecided after round r - 1. An image not refined in a
round is final; so all images refined in a round share their draws.

The rule (:func:`refine`), from every image's candidates at its current estimate (the greedy
``per_image`` boxes of side ``patch``, exactly as mining takes them, each with its score s and
standard error se over the units of its draws):

- per label, the candidates that pass the significance filter (s / se >= ``z_min``) are ranked:
  the ``top`` best are *in*, the others *out* (as mining would keep them now);
- a candidate in is undecided while s - b_in se (b_in = ``bound``) is below the best score left
  out (the (top + 1)-th); a candidate out while s + b_out se (``bound_out``) reaches the worst
  score in (the top-th; -inf with fewer) and it could pass the significance filter at the cap
  (s + b_out se >= z_min se sqrt(n / samples));
- an image is refined when one of its candidates is undecided (racing, as in LUCB, with the
  other side's point estimate as the bar);
- ``budget`` (mean draws per image; 0: none) caps what the rounds spend. A round whose undecided
  images' next draws would take more than half of what is left narrows the bounds to
  ``tight_bound`` / ``tight_bound_out`` and refines the images undecided at those, most
  uncertain first (smallest |s - bar| / se of their undecided candidates, then image id),
  while their next draws fit.

Why two bounds: a candidate in needs draws for two things, its rank and its box's place (the
greedy box moves with the noise: on small elements at 16 draws, 12 of the 29 reference patches
missed were in images that had a mined patch at another place), while a candidate out matters only if
it can enter. Measured (benchmarks/README.md, small planted elements, ``--top`` two thirds of the
label): one bound of 2 for both recovered 89% of a 64-draw reference at 37 draws per image; b_in
1.5, b_out 0.5 with a budget of 16 recover 85% at 16, where 16 draws for every image recover 82%.
On three more sets made the same way: 83%, 84% and 73% at 16, where 16 draws for every image recover
80%, 84% and 72%, and a second 64-draw run 87%, 88% and 78% (the reference's own noise caps them all).

Why two pairs of bounds: where the budget binds (``--top`` a large share of the label), a round
that refined every image the wide bounds leave undecided would spend the budget on one more step
for all and starve the deeper rounds; where it does not (``--top`` a small share, the use this
estimator is for), the narrow bounds stop too early. On 1,000 scenes of that kind, ``--top`` 5
and 12 per label (2% and 5%): 84.4% and 88.8% of a 64-draw reference at 10.5 and 12.9 draws per
image with the wide bounds, against 77.5% and 82.6% at 8.9 and 9.9 with the narrow ones alone
(a second 64-draw run: 85.0% and 91.7%); on a second such set 80.6% and 78.9% (64 draws: 80.0% and
81.2%). On the sets above the result is unchanged.

Here se is floored at the label's median unit spread (se x sqrt(units) over its candidates) /
sqrt(units): with 2-4 units an image's own se has 1-3 degrees of freedom and is often far too
small, which would stop the image early; a too large se only costs draws.

The rule needs the mining settings: they are part of the typicality result's settings
(lineage) for this estimator. Mining with another ``--top``, ``--patch`` or ``--per-image`` is
allowed and correct (every map is an unbiased mean of its draws), but the draws then went where
the recorded settings needed them: a larger ``--top`` ranks its extra patches with the first
round's precision. ``diffmine mine`` says so.

Determinism, processes, resume. The work is planned once (``typicality/adaptive/plan.json``: the
images still lacking maps, cut into the shards their final maps will have). Each round's work is
one file pair per shard (``r<R>-shard-N``: the new units of its refined images and every image's
candidates), dealt round-robin to processes and written atomically; between rounds a barrier,
then every process computes the same refined set from the files on disk (a pure function of all
images' results of the previous rounds). So the result does not depend on the number of
processes, and a killed run resumes at the round and shard where it stopped. An image edited
while the run was stopped (listed anew or not), or one left out that reads as listed again, costs
its shard's rounds, not the run's (:func:`_resume_plan`): that shard is scored again from round 0,
and a later round's file is kept only while it holds the images the round now refines (the moved
bars may refine others), so the resumed run writes what an uninterrupted run on the files as they
are now writes, bit for bit (the test checks it). Planned again whole: a plan one of whose images
is no longer listed or has another label, and one whose final shards have begun, when an image of
it was listed anew. At the end each
shard's final maps are written in the standard format (the mean map, ``KEY/units`` with one unit
per antithetic pair of the image's draws, ``draws`` in the index) and the work folder is removed.
Beside each final shard, ``typicality/candidates/shard-N.parquet`` keeps its images' candidates
at their final draws (with the patch side and ``per_image`` they were taken at). Images listed
later (an incremental run) are planned then, their label's threshold taken from every image's
stored candidates: read from those tables, recomputed from the maps only where a table is
missing or was taken at other settings (so adding a few images to a large run reads a table per
shard instead of every map).
"""

from __future__ import annotations

import json
import shutil
import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from .atomic import write_json, write_table
from .data import listed_by_id, problem_may_be_fixed, read_as_listed
from .mining import MineConfig, default_patch_size, greedy_boxes, patch_errors, patch_scores, significant
from .shards import plan_new_shards, shard_is_complete, write_shard
from .terminal import counted
from .typicality import (SHARD_SCHEMA, TypicalityConfig, _barrier, compiled, compute_shard, typicality_maps_of,
                         unit_key, upsample)

WORK = "adaptive"  # the work folder inside RUN/typicality/, removed when the maps are final

ROUND_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("label", pa.string()), ("key", pa.string()), ("height", pa.int32()),
    ("width", pa.int32()), ("status", pa.string()), ("problem", pa.string()), ("draws", pa.int32()),
    ("cand_y", pa.list_(pa.int32())), ("cand_x", pa.list_(pa.int32())), ("cand_s", pa.list_(pa.float32())),
    ("cand_se", pa.list_(pa.float32())),
])


# the final candidates of a shard's images (``typicality/candidates/shard-N.parquet``)
CANDIDATES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("key", pa.string()), ("draws", pa.int32()), ("patch", pa.int32()),
    ("per_image", pa.int32()), ("cand_s", pa.list_(pa.float32())), ("cand_se", pa.list_(pa.float32())),
])
CANDIDATES = "candidates"


@dataclass
class AdaptiveConfig:
    first_draws: int = 8  # draws every image gets in the first round (even, >= 4)
    # half-widths of the confidence bounds, in standard errors: of a candidate in the top (its rank
    # and its box's place both need draws) and of one out of it (it only matters if it can enter)
    bound: float = 3.0
    bound_out: float = 1.5
    # mean draws per image the rounds may spend at most (0: no limit; the default, 16, is the
    # default estimator's cost)
    budget: float = 16.0
    # the bounds of a round whose undecided images would take more than half the budget left: it
    # refines the most uncertain of those undecided at these narrower bounds, while they fit
    tight_bound: float = 1.5
    tight_bound_out: float = 0.5
    # the mining settings the draws target (``diffmine run`` takes mining's own), by default mining's defaults
    patch: int | None = MineConfig.patch
    per_image: int = MineConfig.per_image
    top: int = MineConfig.top
    z_min: float = MineConfig.z_min
    significance: bool = MineConfig.significance

    def __post_init__(self):
        if self.first_draws < 4 or self.first_draws % 2:
            raise ValueError(f"first_draws must be even and >= 4 (2 antithetic pairs), got {self.first_draws}")
        if min(self.bound, self.bound_out, self.tight_bound, self.tight_bound_out) < 0 or self.per_image < 1 or self.top < 1 or (self.patch is not None and self.patch < 1):
            raise ValueError("the bounds must be >= 0, per_image and top >= 1, patch >= 1 or None")
        if any(math.isnan(x) for x in (self.bound, self.bound_out, self.tight_bound, self.tight_bound_out, self.budget)):
            raise ValueError("the bounds and the budget must be numbers, got NaN")
        if not math.isfinite(self.z_min):
            raise ValueError(f"z_min must be a finite number, got {self.z_min}")
        if self.budget and self.budget < self.first_draws:
            raise ValueError(f"budget (mean draws per image) must be 0 (none) or >= first_draws ({self.first_draws}), "
                             f"got {self.budget}")


def schedule(first: int, cap: int) -> list[int]:
    """The cumulative draws of an image refined in every round: first, 2 first, 4 first, ..., cap."""
    rounds = [min(first, cap)]
    while rounds[-1] < cap:
        rounds.append(min(2 * rounds[-1], cap))
    return rounds


def candidates(latent_map: np.ndarray, units: np.ndarray | None, size: tuple[int, int], k: int,
               per_image: int) -> tuple[list, list, list, list]:
    """An image's greedy best boxes as mining takes them: (ys, xs, scores, standard errors)."""
    if k > min(size):
        return [], [], [], []
    scores = patch_scores(upsample(latent_map, size), k)
    se = patch_errors(upsample(units, size), k) if units is not None else np.full_like(scores, np.nan)
    best = greedy_boxes(scores, k, per_image)
    return [y for y, _, _ in best], [x for _, x, _ in best], [s for _, _, s in best], [float(se[y, x]) for y, x, _ in best]


def refine(latest: pd.DataFrame, active: set, config: AdaptiveConfig, cap: int, budget_left: float | None = None) -> set:
    """The images of ``active`` to give more draws (see the module's doc).

    Args:
        latest: one row per image of the collection (those in the work and those already final):
            image_id, label, status, draws, cand_s, cand_se (lists: the image's candidates)
        active: the images refined in the last round (the others are final)
        budget_left: draws the round may still spend (None: no limit). The images undecided at
            ``bound`` / ``bound_out`` are refined when their next draws take at most half of it;
            else those undecided at ``tight_bound`` / ``tight_bound_out``, most uncertain first
            (smallest |score - bar| / se of their undecided candidates, then image id) while their
            next draws fit
    """
    ok = latest[latest["status"] == "ok"]
    long = ok[["image_id", "label", "draws", "cand_s", "cand_se"]].explode(["cand_s", "cand_se"])
    long = long.dropna(subset=["cand_s"]).reset_index(drop=True)
    if long.empty:
        return set()
    s = long["cand_s"].to_numpy(np.float64)
    se = long["cand_se"].to_numpy(np.float64)
    draws = long["draws"].to_numpy(np.float64)
    units = np.maximum(draws // 2, 1)
    spread = pd.Series(se * np.sqrt(units), index=long.index)
    floor = spread.groupby(long["label"]).transform("median").to_numpy(np.float64)
    se_bound = np.fmax(se, floor / np.sqrt(units))
    passes = significant(s, se, config.z_min) if config.significance else np.ones(len(s), bool)
    # each label's candidates that mining would keep, best first: the top are in, the rest out
    kept = pd.DataFrame({"label": long["label"].to_numpy(), "s": s})[passes]
    kept = kept.sort_values("s", ascending=False, kind="mergesort")
    rank = kept.groupby("label").cumcount()
    in_top = np.zeros(len(s), bool)
    in_top[rank.index[rank < config.top]] = True

    def nth_best(n: int) -> np.ndarray:  # per candidate, its label's n-th best kept score (-inf: fewer)
        at = rank.index[rank == n - 1]
        return long["label"].map(dict(zip(kept.loc[at, "label"], kept.loc[at, "s"]))).fillna(-np.inf).to_numpy(np.float64)

    # the bar of a candidate in is the best one left out (the (top + 1)-th); of one out, the worst in
    bar = np.where(in_top, nth_best(config.top + 1), nth_best(config.top))
    refinable = (draws < cap) & long["image_id"].isin(active).to_numpy()
    cost = np.minimum(2 * draws, cap) - draws  # an image's next draws

    def undecided(bound: float, bound_out: float) -> np.ndarray:
        """in: while its lower bound is below the bar; out: while its upper bound reaches the bar
        and it could pass the significance filter at the cap"""
        high = s + bound_out * se_bound
        with np.errstate(invalid="ignore"):
            can_pass = (not config.significance) | passes | ~(se > 0) | (high >= config.z_min * se * np.sqrt(draws / cap))
        return np.where(in_top, s - bound * se_bound < bar, (high >= bar) & can_pass) & refinable

    wide = undecided(config.bound, config.bound_out)
    ids = long["image_id"].to_numpy()
    wide_cost = pd.Series(cost[wide], index=ids[wide]).groupby(level=0).first().sum()  # each image once
    if budget_left is None or wide_cost <= budget_left / 2:
        return set(ids[wide])
    tight = undecided(config.tight_bound, config.tight_bound_out)
    with np.errstate(invalid="ignore"):
        closeness = np.abs(s - bar) / se_bound  # inf where the bar is -inf: least urgent
    order = pd.DataFrame({"image_id": ids, "x": np.nan_to_num(closeness, nan=np.inf), "cost": cost})[tight]
    order = order.groupby("image_id").agg(x=("x", "min"), cost=("cost", "first")).reset_index()
    order = order.sort_values(["x", "image_id"], kind="mergesort")
    # most uncertain first, while they fit (costs are >= 0: the ones that fit are a prefix)
    return set(order["image_id"].to_numpy()[order["cost"].cumsum().to_numpy() <= budget_left])


def draws_summary(index: pd.DataFrame) -> str:
    """Where an adaptive typicality's draws went, from its index (image_id, label, status, draws):
    the mean per image, how many images stopped at each count, each label's mean (a label whose
    top is contested spends more)."""
    ok = index[index["status"] == "ok"]
    if ok.empty:
        return "none yet"
    counts = ok["draws"].value_counts().sort_index()
    per_label = ok.groupby("label")["draws"].mean()
    return (f"{ok['draws'].mean():.2f} on average; images at " + ", ".join(f"{int(n)}: {int(c)}" for n, c in counts.items())
            + "; per label " + ", ".join(f"{label} {mean:.2f}" for label, mean in per_label.items()))


def budget_left(config: AdaptiveConfig, draws: pd.Series) -> float | None:
    """Draws the next round may spend: ``budget`` x the planned images less the (N,) ``draws`` they
    hold (None: no budget)."""
    return config.budget * len(draws) - float(draws.sum()) if config.budget else None


# ----------------------------------------------------------------------------------------------
# the step


def run_adaptive(run, backend, config: TypicalityConfig, adaptive: AdaptiveConfig, process_index: int = 0,
                 num_processes: int = 1, progress: bool = True) -> int:
    """The adaptive typicality of the images the run's listing still lacks; returns how many final
    shards this process wrote."""
    work = run.typicality_dir / WORK
    written, attempted = 0, set()  # an image unreachable in this call is retried by the next one, not again here
    while True:
        if process_index == 0:
            _prepare_plan(run, work, config, adaptive, attempted)
        _barrier(num_processes)  # the plan is on disk before anyone reads it
        if not (work / "plan.json").is_file():
            return written
        plan = json.loads((work / "plan.json").read_text())
        attempted |= {image_id for image_id, _, _ in plan["images"]}
        written += _execute(run, backend, config, adaptive, plan, process_index, num_processes, progress)
        _barrier(num_processes)
        if process_index == 0:
            shutil.rmtree(work)


def _prepare_plan(run, work, config: TypicalityConfig, adaptive: AdaptiveConfig, attempted: set) -> None:
    """Keep a plan whose images are all still listed under their labels (:func:`_resume_plan`);
    else plan the images lacking maps (less those ``attempted`` already)."""
    images = run.images()
    path = work / "plan.json"
    if path.is_file():
        if _resume_plan(run.typicality_dir, json.loads(path.read_text()), images):
            return
        shutil.rmtree(work)  # images of it no longer listed, or under another label: plan again
    index = run.typicality_index(missing_ok=True)
    done = set() if index is None else set(index.loc[index["status"] != "unreachable", "image_id"])
    todo = images[~images["image_id"].isin(done | attempted)]
    if todo.empty:
        return
    dataset = run.step_config("dataset")
    shards = plan_new_shards(run.typicality_dir, len(todo), config.shard_size)
    work.mkdir(parents=True, exist_ok=True)
    write_json(path, {
        "images": [list(row) for row in zip(todo["image_id"], todo["fingerprint"], todo["label"])],
        "shards": [[name, rows.start, rows.stop] for name, rows in shards],
        "rounds": schedule(adaptive.first_draws, config.samples),
        "patch": adaptive.patch or default_patch_size(dataset["resolution"], dataset["resolution"]),
    })


def _relisted(plan: dict, images: pd.DataFrame) -> set | None:
    """The images of ``plan`` listed with other content since it was made (``images``: the
    listing); None when one of them is no longer listed, or listed under another label."""
    listed = dict(zip(images["image_id"], zip(images["fingerprint"], images["label"])))
    if not all(listed.get(image_id, (None, None))[1] == label for image_id, _, label in plan["images"]):
        return None
    return {image_id for image_id, fingerprint, _ in plan["images"] if listed[image_id][0] != fingerprint}


def _resume_plan(typicality_dir, plan: dict, images: pd.DataFrame) -> bool:
    """Whether an interrupted run resumes ``plan`` (``images``: the listing), after making its
    work folder what an uninterrupted run on the files as they are now would have written so far.

    Every image's rounds are a function of its own bytes and of which rounds refine it, so an image
    edited under the interrupted run (listed anew, or not) changes only its shard's rounds, and
    then possibly which images later rounds refine, which :func:`_execute` checks round by round
    (:func:`_drop_rounds_of_others`). The images listed anew take their new fingerprints into the
    plan; the round files of their shards, and of the shards where round 0 read a file that no
    longer reads so (:func:`_round_zero_disagrees`), go, to be scored again from round 0; the
    other shards keep their rounds. A plan whose images are not all listed under their labels any
    more is not resumed (planned again whole), nor one with a final shard written and an image
    listed anew: the rounds are over, and their final maps are what they decided."""
    relisted = _relisted(plan, images)
    if relisted is None:
        return False
    if any(shard_is_complete(typicality_dir, name) for name, _, _ in plan["shards"]):
        return not relisted
    work = typicality_dir / WORK
    stale = relisted | _round_zero_disagrees(work, images)
    if not stale:
        return True
    planned = [image_id for image_id, _, _ in plan["images"]]
    for name, start, stop in plan["shards"]:
        if stale & set(planned[start:stop]):
            _drop_rounds(work, name, 0)
    fingerprint = dict(zip(images["image_id"], images["fingerprint"]))
    plan["images"] = [[image_id, fingerprint[image_id], label] for image_id, _, label in plan["images"]]
    write_json(work / "plan.json", plan)
    return True


def _round_zero_disagrees(work, images: pd.DataFrame) -> set:
    """The images whose round-0 row no longer says what reading their file says (``images``: the
    listing): scored, and no longer readable as listed (edited in place, gone); or left out with a
    problem that may be fixed (``data.problem_may_be_fixed``), and readable as listed now."""
    listed, path = listed_by_id(images), dict(zip(images["image_id"], images["path"]))
    return {r.image_id for r in _round_rows(work, 0).itertuples()
            if (r.status == "ok" or problem_may_be_fixed(r.problem))
            and (r.status == "ok") != read_as_listed(path[r.image_id], listed[r.image_id])}


def _drop_rounds(work, name: str, first: int) -> None:
    """Remove shard ``name``'s round files from round ``first`` on (each index before its arrays)."""
    for index in work.glob(f"r*-{name}.parquet"):
        if int(index.name.split("-", 1)[0][1:]) >= first:
            index.unlink()
            index.with_suffix(".safetensors").unlink(missing_ok=True)


def rounds_progress(typicality_dir, images: pd.DataFrame) -> str | None:
    """How far an interrupted adaptive typicality got (``diffmine status``), from its work folder's
    plan and round shards' indexes (no map is read); None when there is no work folder.
    ``images``: the run's listing. Rounds are numbered from 0, as the progress bars number them."""
    work = typicality_dir / WORK
    if not (work / "plan.json").is_file():
        return None
    plan = json.loads((work / "plan.json").read_text())
    relisted = _relisted(plan, images)
    if relisted is None:
        return "adaptive rounds: planned before the listing changed; the next run plans them again"
    if relisted:
        return (f"adaptive rounds: {counted(len(relisted), 'image')} listed anew since the rounds were planned; the next run "
                "scores their shards again from round 0 and keeps the other shards' rounds")
    shards = [name for name, _, _ in plan["shards"]]
    final = sum(shard_is_complete(typicality_dir, name) for name in shards)
    if final:  # written only once every round is done
        return f"adaptive rounds: every round done, final maps of {final}/{len(shards)} shards written; resumes there"
    rounds = plan["rounds"]
    started = [r for r in range(len(rounds)) if len(_round_rows(work, r))] or [0]
    r = started[-1]
    reached = f"adaptive rounds: round {r} of rounds 0-{len(rounds) - 1} ({rounds[r]} draws per image), "
    if r == 0:
        return reached + f"{len(_round_rows(work, 0))} of the {len(plan['images'])} planned images done; resumes there"
    # the images refined in round r are among those refined in round r - 1 (which are not final yet)
    return reached + (f"{counted(len(_refined_in(work, r)), 'image')} refined so far, of at most "
                      f"{len(_refined_in(work, r - 1))} still undecided; resumes there")


def _execute(run, backend, config: TypicalityConfig, adaptive: AdaptiveConfig, plan: dict, process_index: int,
             num_processes: int, progress: bool) -> int:
    work = run.typicality_dir / WORK
    dataset = run.step_config("dataset")
    listing = run.images().set_index("image_id")
    ids = [image_id for image_id, _, _ in plan["images"]]
    images = listing.loc[ids].reset_index()
    shards = [(name, images.iloc[start:stop].reset_index(drop=True)) for name, start, stop in plan["shards"]]
    rounds, k = plan["rounds"], plan["patch"]
    final = _final_candidates(run, set(ids), k, adaptive.per_image, config.samples)
    backend.denoiser.eval()
    with compiled(backend, config.compile):
        active = set(ids)
        for r, draws in enumerate(rounds):
            if r > 0:
                planned = _latest(work, r)
                latest = pd.concat([final, planned], ignore_index=True)
                active = refine(latest, _refined_in(work, r - 1), adaptive, config.samples,
                                budget_left(adaptive, planned["draws"]))
            todo = [(name, frame[frame["image_id"].isin(active)]) for name, frame in shards]
            if process_index == 0:
                _drop_rounds_of_others(work, r, todo)
            _barrier(num_processes)  # before anyone counts the round's shards done
            if not active:
                break
            mine = [(name, frame) for name, frame in todo if len(frame)][process_index::num_processes]
            mine = [(name, frame) for name, frame in mine if not shard_is_complete(work, f"r{r}-{name}")]
            bar = tqdm(total=sum(len(frame) for _, frame in mine), unit="img", position=process_index,
                       desc=f"typicality round {r} ({draws} draws)" + (f" [{process_index}]" if num_processes > 1 else ""),
                       disable=not progress)
            for name, frame in mine:
                _round_shard(run, backend, config, adaptive, work, r, rounds, name, frame, _keys(dict(shards)[name]),
                             k, dataset, bar)
            bar.close()
            _barrier(num_processes)
    written = 0
    for name, frame in shards[process_index::num_processes]:
        if not shard_is_complete(run.typicality_dir, name):
            _final_shard(run, config, work, len(rounds), name, frame, k, adaptive.per_image)
            written += 1
    return written


def _drop_rounds_of_others(work, r: int, todo: list[tuple[str, pd.DataFrame]]) -> None:
    """Round ``r``'s files (and the later rounds') of each shard whose stored round ``r`` refined
    other images than ``todo`` (name, the shard's images refined in round ``r``) names: after a
    shard was scored again on resume (:func:`_resume_plan`), its new candidates may move the bars.
    A round file is kept only when an uninterrupted run would have written it as it is: the same
    images, with the same earlier draws."""
    for name, frame in todo:
        stored = _round_rows(work, r, name)
        if len(stored) and set(stored["image_id"]) != set(frame["image_id"]):
            _drop_rounds(work, name, r)


def _keys(frame: pd.DataFrame) -> dict[str, str]:
    """An image's key in its shard's round files and final maps: its position in the shard."""
    return {image_id: str(n) for n, image_id in enumerate(frame["image_id"])}


def _round_shard(run, backend, config, adaptive, work, r, rounds, name, frame, key_of, k, dataset, bar) -> None:
    """Round ``r`` of one shard: the next draws of its refined images (``frame``), written with
    every such image's candidates at its new estimate."""
    first = rounds[r - 1] if r else 0
    maps_of = typicality_maps_of(run, replace(config, samples=rounds[r], unit_maps=True), first)
    execution = replace(config, samples=rounds[r] - first, map_dtype="float32")
    maps, rows = compute_shard(backend, frame.reset_index(drop=True), maps_of, 2, execution, dataset["resolution"],
                               dataset["resize"], bar)
    arrays, out = {}, []
    earlier = _units(work, [f"r{q}-{name}" for q in range(r)], [key_of[row["image_id"]] for row in rows if row["status"] == "ok"])
    for row in rows:
        key = key_of[row["image_id"]]
        cand = ([], [], [], [])
        if row["status"] == "ok":
            arrays[key] = maps[unit_key(row["key"])]
            units = np.concatenate(earlier.get(key, []) + [arrays[key]])
            cand = candidates(units.mean(0), units, (row["height"], row["width"]), k, adaptive.per_image)
        out.append(dict(image_id=row["image_id"], label=row["label"], key=key if row["status"] == "ok" else "",
                        height=row["height"], width=row["width"], status=row["status"], problem=row["problem"],
                        draws=rounds[r] if row["status"] == "ok" else 0, cand_y=cand[0], cand_x=cand[1],
                        cand_s=cand[2], cand_se=cand[3]))
    write_shard(work, f"r{r}-{name}", arrays, out, ROUND_SCHEMA)


def _units(work, names: list[str], keys: list[str]) -> dict[str, list[np.ndarray]]:
    """Each key's unit maps in the round files ``names``, in round order (files lacking it skipped)."""
    from safetensors import safe_open

    found: dict[str, list[np.ndarray]] = {}
    for name in names:
        path = work / f"{name}.safetensors"
        if not path.is_file():
            continue
        with safe_open(str(path), "np") as f:
            stored = set(f.keys())
            for key in keys:
                if key in stored:
                    found.setdefault(key, []).append(f.get_tensor(key))
    return found


def _round_rows(work, r: int, shard: str = "shard-*") -> pd.DataFrame:
    """Round ``r``'s rows of every shard, or of the one named ``shard``."""
    tables = [pd.read_parquet(p) for p in sorted(work.glob(f"r{r}-{shard}.parquet")) if shard_is_complete(work, p.stem)]
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=ROUND_SCHEMA.names)


def _refined_in(work, r: int) -> set:
    rows = _round_rows(work, r)
    return set(rows.loc[rows["status"] == "ok", "image_id"])


def _latest(work, r: int, shard: str = "shard-*") -> pd.DataFrame:
    """Each planned image's row of the last round before ``r`` that refined it (of one ``shard``'s
    images: its final shard reads its own files, not every shard's)."""
    rows = pd.concat([_round_rows(work, q, shard).assign(round=q) for q in range(r)], ignore_index=True)
    rows = rows.sort_values("round", kind="mergesort").drop_duplicates("image_id", keep="last")
    return rows[["image_id", "label", "status", "draws", "cand_s", "cand_se"]]


def _final_candidates(run, planned: set, k: int, per_image: int, samples: int) -> pd.DataFrame:
    """The candidates of the images whose maps are already final (an incremental run): their
    labels' thresholds count them. From each shard's candidates table where it holds the image at
    its draws, taken at this ``k`` and ``per_image``; else recomputed from the stored maps."""
    from safetensors import safe_open

    index = run.typicality_index(missing_ok=True)
    rows = []
    if index is not None:
        ok = index[(index["status"] == "ok") & ~index["image_id"].isin(planned)]
        for shard, table in ok.groupby("shard", sort=True):
            cached = _stored_candidates(run.typicality_dir, shard, k, per_image)
            todo = []
            for r in table.itertuples():
                draws = getattr(r, "draws", samples)
                draws = samples if pd.isna(draws) else int(draws)
                hit = cached.get((r.image_id, r.key, draws))
                if hit is None:
                    todo.append((r, draws))
                else:
                    rows.append(dict(image_id=r.image_id, label=r.label, status="ok", draws=draws,
                                     cand_s=list(hit[0]), cand_se=list(hit[1])))
            if not todo:
                continue
            with safe_open(str(run.typicality_dir / f"{shard}.safetensors"), "np") as f:
                stored = set(f.keys())
                for r, draws in todo:
                    units = f.get_tensor(unit_key(r.key)).astype(np.float32) if unit_key(r.key) in stored else None
                    cand = candidates(f.get_tensor(r.key).astype(np.float32), units, (r.height, r.width), k, per_image)
                    rows.append(dict(image_id=r.image_id, label=r.label, status="ok", draws=draws,
                                     cand_s=cand[2], cand_se=cand[3]))
    return pd.DataFrame(rows, columns=["image_id", "label", "status", "draws", "cand_s", "cand_se"])


def _stored_candidates(typicality_dir, shard: str, k: int, per_image: int) -> dict:
    """{(image_id, key, draws): (scores, standard errors)} of a shard's candidates table, for the
    rows taken at this ``k`` and ``per_image`` (empty: no table, as in runs made before it)."""
    path = typicality_dir / CANDIDATES / f"{shard}.parquet"
    if not path.is_file():
        return {}
    table = pd.read_parquet(path)
    table = table[(table["patch"] == k) & (table["per_image"] == per_image)]
    return {(r.image_id, r.key, int(r.draws)): (r.cand_s, r.cand_se) for r in table.itertuples()}


def _final_shard(run, config: TypicalityConfig, work, rounds: int, name: str, frame: pd.DataFrame, k: int,
                 per_image: int) -> None:
    """The standard shard of ``frame``'s images: mean map and units over every draw each received;
    before it, the candidates table of the images' candidates at their final draws (a shard whose
    index is missing is redone whole, its table with it)."""
    first = _round_rows(work, 0, name).set_index("image_id")
    keys = _keys(frame)
    final = _latest(work, rounds, name)
    final = final[final["status"] == "ok"]
    (run.typicality_dir / CANDIDATES).mkdir(exist_ok=True)
    write_table(pa.Table.from_pylist([dict(image_id=r.image_id, key=keys[r.image_id], draws=int(r.draws), patch=k,
                                           per_image=per_image, cand_s=list(r.cand_s), cand_se=list(r.cand_se))
                                      for r in final.itertuples()], schema=CANDIDATES_SCHEMA),
                run.typicality_dir / CANDIDATES / f"{name}.parquet")
    units = _units(work, [f"r{r}-{name}" for r in range(rounds)], list(keys.values()))
    arrays, rows = {}, []
    for r in frame.itertuples():
        row = first.loc[r.image_id]
        base = dict(index=r.index, image_id=r.image_id, path=r.path, label=r.label, fingerprint=r.fingerprint)
        if row["status"] != "ok":
            rows.append(dict(base, height=0, width=0, key="", mean=float("nan"), max=float("nan"), status=row["status"],
                             problem=row["problem"], draws=0))
            continue
        key = keys[r.image_id]
        stacked = np.concatenate(units[key])
        latent_map = stacked.mean(0)
        arrays[key] = latent_map.astype(config.map_dtype)
        if config.unit_maps:
            arrays[unit_key(key)] = stacked.astype(config.map_dtype)
        rows.append(dict(base, height=int(row["height"]), width=int(row["width"]), key=key, mean=float(latent_map.mean()),
                         max=float(latent_map.max()), status="ok", problem=None, draws=2 * len(stacked)))
    rows.sort(key=lambda row: row["index"])
    write_shard(run.typicality_dir, name, arrays, rows, SHARD_SCHEMA)
