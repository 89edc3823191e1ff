"""Mining: the most typical patches of each label (paper section 3.3).

Patch typicality is the mean of the pixel map over a k x k box, at every position (stride 1),
by an integral image. Per image, the ``per_image`` best boxes are taken greedily, each time
suppressing every box that overlaps or touches the one taken; over all images of a label the
``top`` best are kept. The least typical and random patches are mined the same way, for the
comparison of the paper's Fig. 2.

Significance: a patch's typicality is a mean over K noise draws, so it has a standard error.
The pixels of a patch are correlated, so the error of the patch mean is not a function of the
per-pixel variances: it is computed from the patch's score under each independent unit of the
draws (an antithetic pair, see ``typicality.draw_units``), stored per image as ``KEY/units``,
and z = typicality / se. A candidate is kept (kind ``top``) only if z >= ``z_min``; the others
are kind ``rejected`` (their features still serve clustering's coverage count: they are the
images' background). Every image contributes at most ``per_image`` candidates whatever their
noise, so without the filter (``--no-significance``, the paper's behaviour) most patches of a
small-element dataset are noise.

Which error (``errors``). The default estimator's draws are stratified in t, and an element's
typicality falls steeply with t (on the demo's elements about 4.7e-3 at t = 0.12, 0 at t = 0.7),
so its U unit scores differ mostly by their t, a difference stratification keeps out of the mean.
``iid`` (the spread of the unit scores, std(ddof=1) / sqrt(U)) counts it as noise: an element's
error grew with its typicality, its z could not get far above sqrt(U) x mean / spread of its t
profile, and the filter dropped strong elements and kept weak background (at K = 8 on the
ordered set: the constant element's boxes passed z >= 2 as often as the background's, 15%).
``stratified`` (default, for the stratified estimators, whose units are in t order) estimates the
noise from successive second differences of the t-ordered unit scores, which cancel any locally
linear trend in t: sigma^2 = mean((S[j] - 2 S[j+1] + S[j+2])^2) / 6, se = sigma / sqrt(U) (the
successive-difference variance estimator of systematic samples; needs U >= 3, else ``iid``). The
paper's i.i.d. draws and the adaptive estimator's nested units are not in t order: ``iid`` there.
Measured in benchmarks/README.md ("The standard error of a patch").

Which test (``significance_test``). ``z`` tests each kept box alone, but the box is the best of
the image's thousands of positions, and the best of many noise boxes passes z >= 2 easily (the
winner's curse). ``flip`` tests the image as a whole, the selection included: under no
typicality each unit map is symmetric about zero, so flipping the sign of whole units gives
maps as likely as the observed one; the best box score of each of those maps is the null
distribution of an image's best box, and a candidate is kept where the share of sign patterns
whose best box reaches its score (the observed pattern counted) is at most ``alpha`` (a
permutation test with the max statistic: Nichols & Holmes 2002; it controls the family-wise
error over the image's boxes). All 2^U patterns where there are at most ``flips``, else the
observed one and ``flips`` seeded random ones (per image: the same for any sharding). With U
units no p-value is below 2^-U: at the default 16 draws (U = 8), 1/256. The adaptive estimator
gives images different numbers of draws (some 8: U = 4, p >= 1/16), so ``flip`` is refused on it.
Measured in benchmarks/README.md ("Selection-adjusted significance").

The step streams over typicality shards one at a time and keeps bounded per-label candidate
lists, so memory does not grow with the number of images.
"""

from __future__ import annotations

import sys
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from .atomic import write_table
from .typicality import upsample


ERRORS = ("stratified", "iid")
TESTS = ("z", "flip")
# settings added after mined patches were stored, and read only by the test they belong to: left
# out of the recorded settings where they change nothing, so results mined before stay up to date
FLIP_SETTINGS = ("significance_test", "alpha", "flips")
# estimators whose units are in t order, one stratum (or adjacent pair of strata) each
T_ORDERED = ("stratified", "stratified-antithetic")


@dataclass
class MineConfig:
    patch: int | None = None  # side in pixels; None: about 1/5 of the image side (50 at 256, 64 at 512 -> 13 at 64)
    per_image: int = 5
    top: int = 1000
    least: int = 50
    random: int = 50
    seed: int = 0
    # keep a candidate only if its typicality is z_min standard errors above zero (needs the
    # typicality step's unit maps); False: keep every candidate (the paper's behaviour)
    significance: bool = True
    z_min: float = 2.0
    # the standard error of a patch: "stratified" (noise from successive differences of the
    # t-ordered units, for the stratified estimators) or "iid" (spread of the unit scores; counts
    # the t trend as noise). See the module's doc
    errors: str = "stratified"
    # which test keeps a candidate: "z" (its own z >= z_min) or "flip" (its image's sign-flip test
    # of the best box, p <= alpha, over all 2^U sign patterns of the units, or `flips` random ones)
    significance_test: str = "z"
    alpha: float = 0.05
    flips: int = 1024

    def __post_init__(self):
        if self.errors not in ERRORS:
            raise ValueError(f"errors must be one of {', '.join(ERRORS)}, got {self.errors!r}")
        if self.significance_test not in TESTS:
            raise ValueError(f"significance_test must be one of {', '.join(TESTS)}, got {self.significance_test!r}")
        if not 0.0 < self.alpha < 1.0 or self.flips < 1:
            raise ValueError(f"alpha must be in (0, 1) and flips >= 1, got {self.alpha} and {self.flips}")
        if self.patch is not None and self.patch < 1:
            raise ValueError(f"patch must be >= 1, got {self.patch}")
        if self.per_image < 1 or self.top < 1 or self.least < 0 or self.random < 0:
            raise ValueError("per_image and top must be >= 1, least and random >= 0")
        if not math.isfinite(self.z_min):  # NaN or inf kept no patch, -inf every one (--no-significance says so)
            raise ValueError(f"z_min must be a finite number, got {self.z_min}")


def check_test(config: MineConfig, estimator: str | None) -> None:
    """ValueError for the flip test on adaptive typicality (before a stored result is dropped)."""
    if config.significance and config.significance_test == "flip" and estimator == "adaptive":
        raise ValueError("--significance-test flip needs the same draws on every image; adaptive typicality gave some "
                         "as few as 8 (no p-value below 1/16): mine with --significance-test z")


def mine_settings(config: MineConfig) -> dict:
    """What the mined patches are made with (recorded in the lineage): the flip test's settings
    only where it is the test (mined patches stored before it existed stay up to date)."""
    settings = asdict(config)
    return {k: v for k, v in settings.items() if config.significance_test == "flip" or k not in FLIP_SETTINGS}


def check_patch(run, patch: int | None, flag: str = "--patch", side: int | None = None) -> None:
    """ValueError when ``--patch`` exceeds the side of the run's images (their height is the listed
    resolution, or ``side`` for a run still to be listed): one line before a step drops its record
    or computes anything."""
    side = run.step_config("dataset")["resolution"] if side is None else side
    if patch is not None and patch > side:
        raise ValueError(f"{flag} {patch} exceeds the images' side ({side} px, the run's --resolution)")


def default_patch_size(height: int, width: int) -> int:
    """About a fifth of the shorter side: the paper's 50 px at 256 and 64 px at 512."""
    return max(4, round(min(height, width) / 5))


def patch_scores(pixel_map: np.ndarray, k: int) -> np.ndarray:
    """Mean of ``pixel_map`` over every k x k box.

    Args:
        pixel_map: (..., H, W), e.g. (U, H, W): one map per unit of the draws
    Returns:
        (..., H - k + 1, W - k + 1): entry (y, x) is the mean over rows y..y+k-1, columns x..x+k-1
    """
    H, W = pixel_map.shape[-2:]
    if k > min(H, W):
        raise ValueError(f"patch side {k} exceeds the image ({W}x{H})")
    integral = np.zeros((*pixel_map.shape[:-2], H + 1, W + 1), np.float64)
    integral[..., 1:, 1:] = pixel_map.astype(np.float64).cumsum(-2).cumsum(-1)
    sums = (integral[..., k:, k:] - integral[..., :-k, k:] - integral[..., k:, :-k] + integral[..., :-k, :-k])
    return (sums / (k * k)).astype(np.float32)


def patch_errors(unit_maps: np.ndarray, k: int, rule: str = "iid") -> np.ndarray:
    """Standard error of every k x k box's typicality, from the maps of U independent units.

    Args:
        unit_maps: (U, H, W); for ``rule="stratified"`` in t order (stratified draws)
        rule: "iid": std over units of the box mean (ddof 1) / sqrt(U); "stratified": sqrt of
            the mean squared second difference of consecutive units' box means / 6, / sqrt(U),
            blind to a trend in t that is locally linear (``iid`` below U = 3)
    Returns:
        (H - k + 1, W - k + 1); NaN for U < 2 (K < 4 antithetic draws: no error estimate)
    """
    if len(unit_maps) < 2:
        return np.full(tuple(n - k + 1 for n in unit_maps.shape[-2:]), np.nan, np.float32)
    scores = patch_scores(unit_maps, k).astype(np.float64)  # (U, H', W')
    if rule == "stratified" and len(scores) >= 3:
        second = scores[:-2] - 2 * scores[1:-1] + scores[2:]  # var 6 sigma^2 for independent units
        return np.sqrt((second ** 2).mean(0) / 6 / len(scores)).astype(np.float32)
    return (scores.std(0, ddof=1) / np.sqrt(len(scores))).astype(np.float32)


def sign_patterns(units: int, flips: int, rng: np.random.Generator) -> np.ndarray:
    """(F, units) signs +-1 of the sign-flip test, the observed pattern (all +1) first: all 2^units
    where there are at most ``flips``, else the observed one and ``flips`` random ones."""
    if 2 ** units <= flips:
        return 1.0 - 2.0 * ((np.arange(2 ** units)[:, None] >> np.arange(units)) & 1)
    return np.vstack([np.ones((1, units)), rng.choice([-1.0, 1.0], size=(flips, units))])


def flip_p_values(unit_maps: np.ndarray, k: int, boxes: list[tuple[int, int]], flips: int,
                  rng: np.random.Generator, chunk: int = 64) -> np.ndarray:
    """The sign-flip p-value of each of an image's boxes, selection included: the share of sign
    patterns of the units whose best k x k box scores at least the box's score.

    Args:
        unit_maps: (U, H, W) the image's independent units (antithetic pairs)
        boxes: [(y0, x0), ...] the image's candidates
    Returns:
        (len(boxes),) p-values in [1 / F, 1] for F patterns (:func:`sign_patterns`); NaN where U < 2
    """
    if len(unit_maps) < 2:
        return np.full(len(boxes), np.nan)
    scores = patch_scores(unit_maps, k).astype(np.float64).reshape(len(unit_maps), -1)  # (U, P)
    signs = sign_patterns(len(unit_maps), flips, rng) / len(unit_maps)
    best = np.concatenate([(signs[i:i + chunk] @ scores).max(1) for i in range(0, len(signs), chunk)])  # (F,)
    width = unit_maps.shape[-1] - k + 1
    observed = np.array([scores[:, y * width + x].mean() for y, x in boxes])
    # the observed pattern's best is the image's best box itself: a tolerance for its rounding
    return (best[None, :] >= observed[:, None] - 1e-9 * np.abs(observed[:, None])).mean(1)


def greedy_boxes(scores: np.ndarray, k: int, n: int) -> list[tuple[int, int, float]]:
    """Up to ``n`` boxes of side k, best score first, no two overlapping or touching.

    Args:
        scores: (H - k + 1, W - k + 1) from :func:`patch_scores`
    Returns:
        [(y0, x0, score), ...]
    """
    scores = scores.astype(np.float64, copy=True)
    taken = []
    for _ in range(n):
        flat = int(np.argmax(scores))
        best = scores.flat[flat]
        if not np.isfinite(best):
            break
        y, x = divmod(flat, scores.shape[1])
        taken.append((y, x, float(best)))
        # boxes [y, y+k) and [y', y'+k) are apart (not even touching) only if |y - y'| > k
        scores[max(0, y - k):y + k + 1, max(0, x - k):x + k + 1] = -np.inf
    return taken


def random_boxes(height: int, width: int, k: int, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    return [(int(rng.integers(0, height - k + 1)), int(rng.integers(0, width - k + 1))) for _ in range(n)]


class TopN:
    """Bounded best-N accumulator per group (streaming top-N over any number of rows)."""

    def __init__(self, n: int, largest: bool = True):
        self.n, self.largest = n, largest
        self.frames: list[pd.DataFrame] = []
        self.size = 0

    def add(self, frame: pd.DataFrame) -> None:
        self.frames.append(frame)
        self.size += len(frame)
        if self.size > 4 * self.n * max(1, frame["label"].nunique()):
            self.frames = [self.result()]
            self.size = len(self.frames[0])

    def result(self) -> pd.DataFrame:
        if not self.frames:
            return pd.DataFrame()
        frame = pd.concat(self.frames, ignore_index=True)
        frame = frame.sort_values(["label", "typicality", "image_id", "y0", "x0"],
                                  ascending=[True, not self.largest, True, True, True], kind="mergesort")
        return frame.groupby("label", sort=True).head(self.n).reset_index(drop=True)


def mine_image(pixel_map: np.ndarray, k: int, per_image: int, unit_maps: np.ndarray | None = None,
               errors: str = "iid") -> tuple[list, list, np.ndarray, np.ndarray]:
    """Most and least typical boxes of one image, greedy, non-overlapping, with their errors.

    Args:
        pixel_map: (H, W); unit_maps: (U, H, W) or None (no errors: NaN)
        errors: the rule of :func:`patch_errors`
    Returns:
        best, worst: [(y0, x0, typicality, se), ...]; scores, se: (H - k + 1, W - k + 1)
    """
    scores = patch_scores(pixel_map, k)
    se = patch_errors(unit_maps, k, errors) if unit_maps is not None else np.full_like(scores, np.nan)
    best = [(y, x, s, float(se[y, x])) for y, x, s in greedy_boxes(scores, k, per_image)]
    worst = [(y, x, -s, float(se[y, x])) for y, x, s in greedy_boxes(-scores, k, per_image)]
    return best, worst, scores, se


def significant(typicality: np.ndarray, se: np.ndarray, z_min: float) -> np.ndarray:
    """Which patches are z_min standard errors above zero (an error of 0: any positive score;
    an unknown error, NaN: kept, there is nothing to test)."""
    typicality, se = np.asarray(typicality, np.float64), np.asarray(se, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, typicality / se, np.where(typicality > 0, np.inf, -np.inf))
    return (z >= z_min) | np.isnan(se)


def run_mining(run, config: MineConfig, progress: bool = True, store=None, out=None) -> tuple[pd.DataFrame, int]:
    """Mine the maps of the run's listed images into ``mining/patches.parquet``; returns the table
    and the patch side used. ``store`` (a ``rundir.MapStore``, default the typicality maps) and
    ``out`` mine another per-pixel score the same way, e.g. a contrast into its own folder (the
    ``typicality`` column then holds that score)."""
    from safetensors import safe_open

    from .typicality import unit_key

    top, rejected, least = TopN(config.top), TopN(config.top), TopN(config.least, largest=False)
    randoms, warned = [], False
    rng = np.random.default_rng(config.seed)
    store = run.typicality_store if store is None else store
    significance = config.significance and store.what == "typicality"  # other scores (contrast) store no units
    estimator = ((run.lineage.get("typicality") or {}).get("settings") or {}).get("estimator")
    errors = config.errors if estimator in T_ORDERED else "iid"  # other estimators' units are not in t order
    flip = significance and config.significance_test == "flip"
    if flip:
        check_test(config, estimator)
    ok = store.ok()
    if ok.empty:
        raise ValueError(f"{run.path}: no usable {store.what} maps to mine")
    k = config.patch or default_patch_size(int(ok["height"].median()), int(ok["width"].median()))
    random_per_label = {label: set(rng.choice(np.flatnonzero(ok["label"].to_numpy() == label),
                                              size=min(config.random, int((ok["label"] == label).sum())), replace=False))
                        for label in ok["label"].unique()}
    chosen_random = {ok.iloc[i]["image_id"] for ids in random_per_label.values() for i in ids}
    bar = tqdm(total=len(ok), desc="mining", unit="img", disable=not progress)
    for shard, table in ok.groupby("shard", sort=True):  # one shard's maps open at a time
        best_rows, worst_rows = [], []
        with safe_open(str(store.directory / f"{shard}.safetensors"), "np") as f:
            stored = set(f.keys())
            for r in table.itertuples():
                if k > min(r.height, r.width):
                    continue
                pixel_map = upsample(f.get_tensor(r.key), (r.height, r.width))
                units = None
                if unit_key(r.key) in stored:
                    units = upsample(f.get_tensor(unit_key(r.key)), (r.height, r.width))
                elif significance:
                    raise ValueError(f"{store.directory / shard}.safetensors: no unit maps for the significance "
                                     "filter; re-run `diffmine typicality --unit-maps --force`, or mine with --no-significance")
                best, worst, scores, se = mine_image(pixel_map, k, config.per_image, units, errors)
                base = dict(image_id=r.image_id, label=r.label)
                p = flip_p_values(units, k, [(y, x) for y, x, *_ in best], config.flips,
                                  np.random.default_rng([config.seed, r.index, 1])) \
                    if flip and units is not None else np.full(len(best), np.nan)
                best_rows += [dict(base, y0=y, x0=x, typicality=s, se=e, p=pv) for (y, x, s, e), pv in zip(best, p)]
                worst_rows += [dict(base, y0=y, x0=x, typicality=s, se=e) for y, x, s, e in worst]
                if r.image_id in chosen_random:
                    y, x = random_boxes(r.height, r.width, k, 1, np.random.default_rng([config.seed, r.index]))[0]
                    randoms.append(dict(base, y0=y, x0=x, typicality=float(scores[y, x]), se=float(se[y, x]), p=np.nan))
                bar.update()
        if not best_rows:
            continue
        best = pd.DataFrame(best_rows)
        if significance and best["se"].isna().any() and not warned:
            print("mine: fewer than 2 independent units of draws (typicality samples < 4): no standard error, "
                  "every candidate kept", file=sys.stderr)
            warned = True
        if flip:  # an unknown p (fewer than 2 units): kept, there is nothing to test
            keep = ~(best["p"] > config.alpha).to_numpy()
        else:
            keep = (significant(best["typicality"], best["se"], config.z_min) if significance
                    else np.ones(len(best), bool))
        top.add(best[keep])
        rejected.add(best[~keep])
        least.add(pd.DataFrame(worst_rows))
    bar.close()
    if not top.frames and not rejected.frames:  # every image narrower than the patch (keep-aspect)
        raise ValueError(f"{store.directory}: no image is {k} px wide or more; mine with a smaller --patch")
    columns = ["image_id", "label", "y0", "x0", "typicality", "se", "p"]
    frames = [top.result().assign(kind="top"), rejected.result().assign(kind="rejected"),
              least.result().assign(kind="least"), pd.DataFrame(randoms, columns=columns).assign(kind="random")]
    patches = pd.concat([f for f in frames if len(f)], ignore_index=True)
    patches["x1"], patches["y1"] = patches["x0"] + k, patches["y0"] + k
    with np.errstate(divide="ignore", invalid="ignore"):
        patches["z"] = patches["typicality"] / patches["se"]
    patches = patches[["image_id", "label", "x0", "y0", "x1", "y1", "typicality", "se", "z", "p", "kind"]]
    patches = patches.astype({"x0": "int32", "y0": "int32", "x1": "int32", "y1": "int32", "typicality": "float32",
                              "se": "float32", "z": "float32", "p": "float32"})
    write_table(pa.Table.from_pandas(patches, preserve_index=False), run.patches_path if out is None else out)
    return patches, k
