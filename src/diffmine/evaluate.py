"""Proof that mining works: typicality against ground-truth element masks.

- localization: per-image average precision (AUC-PR) of the pixel typicality map against the
  element mask, with the random baseline (the mask's pixel fraction: the AP of an uninformative
  map), averaged per label and overall;
- hit rate: the share of mined patches that show the element (at least half of the element's
  pixels inside the patch), for the top patches and, as the baseline, the random ones;
- cluster purity: per label, the size-weighted share of each cluster's majority (element hit or
  not);
- the summary as a reader meets it: per label, the hit rate of the members of the top-ranked
  cluster (top1) and of the top 3 clusters together (top3), and the rank (1 = first) of the first
  cluster that is mostly element (hit rate > 1/2; None: no such cluster). The same for a
  baseline's detectors. Also top1 at a fixed depth (``SHOWN``): the top cluster's first members
  in its own order (nearest the centroid first; a detector's best detections first), the crops a
  label page shows. Methods compare at the same depth: a Doersch detector writes only its 8 best
  detections, so its top1 is a depth-8 figure, while a typicality cluster's top1 counts all of its
  (often 20-60) members.

Masks: ``MASKS/<image_id>`` with any image extension, nonzero = element (the built-in
dataset writes them as ``OUT/masks/<label>/<file>.png``).
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import average_precision_score

from .terminal import printable, shell_word

HIT_SHARE = 0.5
# Depth of the fixed-depth top1: the crops per cluster row on a label page (ReportConfig.per_cluster)
# and the detections a Doersch detector writes (DoerschConfig.examples)
SHOWN = 8


def find_mask(masks: Path, image_id: str) -> Path | None:
    """``MASKS/<image_id>``, else the file of the same stem with any extension. The stem is
    escaped: an image id is a file name, and ``a[12].jpg`` must not match ``a1.png``."""
    path = masks / image_id
    if path.is_file():
        return path
    for candidate in sorted(path.parent.glob(glob.escape(path.stem) + ".*")):
        return candidate
    return None


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool at ``size`` = (H, W), nearest-neighbour resized."""
    with Image.open(path) as img:
        mask = img.convert("L")
        if mask.size != (size[1], size[0]):
            mask = mask.resize((size[1], size[0]), Image.Resampling.NEAREST)
        return np.asarray(mask) > 0


def localization_ap(pixel_map: np.ndarray, mask: np.ndarray) -> float:
    """AUC-PR of ``pixel_map`` as a detector of ``mask`` over all pixels (NaN for an empty mask)."""
    if not mask.any():
        return float("nan")
    return float(average_precision_score(mask.ravel(), pixel_map.ravel()))


def region_scores(pixel_map: np.ndarray, mask: np.ndarray) -> dict:
    """AUC-PR of an (H, W) map against an (H, W) bool region, the random baseline (the region's
    pixel fraction) and the mean map inside and outside it (NaN where undefined)."""
    nan = float("nan")
    return {"auc_pr": localization_ap(pixel_map, mask), "random": float(mask.mean()) if mask.any() else nan,
            "inside": float(pixel_map[mask].mean()) if mask.any() else nan,
            "outside": float(pixel_map[~mask].mean()) if (~mask).any() else nan}


def patch_hits(patches: pd.DataFrame, masks_by_image: dict[str, np.ndarray]) -> np.ndarray:
    """Per patch: does it hold at least HIT_SHARE of its image's element pixels? (NaN: no mask)."""
    hits = np.full(len(patches), np.nan)
    for n, r in enumerate(patches.itertuples()):
        mask = masks_by_image.get(r.image_id)
        if mask is None or not mask.any():
            continue
        inside = mask[r.y0:r.y1, r.x0:r.x1].sum()
        hits[n] = float(inside >= HIT_SHARE * mask.sum())
    return hits


def evaluate_maps(maps: dict[str, np.ndarray], labels: dict[str, str], masks: Path) -> tuple[pd.DataFrame, dict]:
    """Per-image AP rows and the loaded masks, for ``maps`` {image_id: (H, W) typicality}."""
    rows, loaded = [], {}
    for image_id, pixel_map in maps.items():
        path = find_mask(masks, image_id)
        if path is None:
            continue
        mask = load_mask(path, pixel_map.shape)
        loaded[image_id] = mask
        rows.append({"image_id": image_id, "label": labels[image_id], **region_scores(pixel_map, mask)})
    return pd.DataFrame(rows), loaded


def summarize(per_image: pd.DataFrame) -> dict:
    """{"overall": {...}, "per_label": {label: {...}}}, means over images with a nonempty mask."""
    def stats(frame):
        frame = frame.dropna(subset=["auc_pr"])
        return {"auc_pr": float(frame["auc_pr"].mean()), "random": float(frame["random"].mean()),
                "inside": float(frame["inside"].mean()), "outside": float(frame["outside"].mean()), "images": len(frame)}
    return {"overall": stats(per_image), "per_label": {l: stats(g) for l, g in per_image.groupby("label")}}


def cluster_purity(clustered: pd.DataFrame, hits: np.ndarray, min_size: int = 1, depth: int = SHOWN) -> dict:
    """Per label: weighted majority share over clusters, and the summary metrics (module doc) over
    the clusters of at least ``min_size`` members (those a report shows), in rank order; the
    top cluster's first ``depth`` members (by ``rank_in_cluster``) give ``top_shown_hit_rate``."""
    frame = clustered.assign(hit=hits).dropna(subset=["hit"])
    out = {}
    for label, group in frame.groupby("label"):
        shares = group.groupby("cluster")["hit"].agg(lambda h: max(h.mean(), 1 - h.mean()))
        sizes = group.groupby("cluster").size()
        shown = group[group["cluster"].map(sizes) >= min_size]
        ranks = sorted(shown["cluster_rank"].unique())
        rates = shown.groupby("cluster_rank")["hit"].mean()
        first = next((n + 1 for n, r in enumerate(ranks) if rates[r] > 0.5), None)
        top = shown[shown["cluster_rank"] == ranks[0]].sort_values("rank_in_cluster", kind="stable") if ranks else shown
        out[label] = {"purity": float((shares * sizes).sum() / sizes.sum()),
                      "top_cluster_hit_rate": float(rates[ranks[0]]) if ranks else float("nan"),
                      "top_shown_hit_rate": float(top["hit"].head(depth).mean()) if ranks else float("nan"),
                      "top_cluster_size": len(top),
                      "top3_hit_rate": float(shown.loc[shown["cluster_rank"].isin(ranks[:3]), "hit"].mean()) if ranks else float("nan"),
                      "first_element_rank": first, "clusters": len(ranks)}
    return out


def fresh_or_noted(run, name: str, notes: list[str]) -> bool:
    """Is result ``name`` (its file found) fresh? A stale one is left out, not scored: its figures
    would describe patches the run no longer has. ``notes`` gets one line naming what to re-run."""
    reasons = run.stale(name)
    if reasons:
        reason, command = reasons[0]
        notes.append(f"{name} left out: out of date ({reason}); re-run `diffmine {command} --run {shell_word(run.path)}`")
    return not reasons


def check_masks(run, masks: str | Path) -> Path:
    """``masks`` as a folder of masks for ``run``'s images; one clear error for a missing folder, a
    file, or the run's images folder itself (every image's own pixels would be its "element")."""
    masks = Path(masks)
    if not masks.is_dir():
        raise FileNotFoundError(f"{masks}: no such mask folder" if not masks.exists() else
                                f"{masks}: a file; --masks takes a folder of masks named like the images")
    if masks.resolve() == run.dataset_root.resolve():
        raise ValueError(f"--masks {masks}: the run's images folder; give the folder of masks (nonzero = element)")
    return masks


def evaluate_run(run, masks: str | Path) -> dict:
    """Localization AP, mined-patch hit rates and cluster purity of a run against ``masks``; the
    mined patches, clusters and baselines only when fresh (``left_out`` names those that are not)."""
    masks = check_masks(run, masks)
    index = run.typicality_index()
    ok = run.as_trained(index[index["status"] == "ok"])  # held out: never trained on, whatever the listing says now
    maps = {i: run.typicality_map(i) for i in ok["image_id"]}
    per_image, loaded = evaluate_maps(maps, dict(zip(ok["image_id"], ok["label"])), masks)
    if per_image.empty:
        raise FileNotFoundError(f"{masks}: no mask matches any image of {run.path} (expected MASKS/<image_id>)")
    # localization is reported on the held-out split first (the model never saw those images)
    per_image["split"] = per_image["image_id"].map(dict(zip(ok["image_id"], ok["split"])))
    splits = {s: summarize(per_image[per_image["split"] == s]) for s in ("holdout", "train")
              if (per_image["split"] == s).any()}
    lead = next(iter(splits))
    result = {"split": lead, **splits[lead], "splits": splits}
    result["masks_found"] = len(per_image)
    notes = result["left_out"] = []
    if run.patches_path.is_file() and fresh_or_noted(run, "mine", notes):
        result["hit_rate"] = {}
        for kind in ("top", "random", "least"):
            mined = run.mined_patches(kind)
            hits = patch_hits(mined, loaded)
            result["hit_rate"][kind] = {"overall": float(np.nanmean(hits)) if np.isfinite(hits).any() else float("nan"),
                                        "per_label": {l: float(np.nanmean(hits[(mined["label"] == l).to_numpy()]))
                                                      for l in mined["label"].unique()}}
    if run.clusters_path.is_file() and fresh_or_noted(run, "cluster", notes):
        clustered = run.patches()
        result["clusters"] = cluster_purity(clustered, patch_hits(clustered, loaded), min_size=2)
    for path in sorted(run.path.glob("baselines/*/patches.parquet")):
        # the same metrics for a baseline's detectors, so the methods compare side by side
        if not fresh_or_noted(run, f"baseline-{path.parent.name}", notes):
            continue
        table = pd.read_parquet(path)
        hits = patch_hits(table, loaded)
        result.setdefault("baselines", {})[path.parent.name] = {
            "hit_rate": float(np.nanmean(hits)) if np.isfinite(hits).any() else float("nan"),
            "clusters": cluster_purity(table, hits, min_size=2)}
    return result


def format_result(result: dict) -> str:
    lines = [f"{split} split: AUC-PR {s['overall']['auc_pr']:.3f} over {s['overall']['images']} images "
             f"(random {s['overall']['random']:.3f})" for split, s in result.get("splits", {}).items()]
    lines += [f"{result.get('split', 'train')} split (hit rates and purity: all mined patches)",f"{'label':<16} {'AUC-PR':>8} {'random':>8} {'hit(top)':>9} {'hit(rnd)':>9} {'purity':>7}"]
    hits = result.get("hit_rate", {})
    for label, s in list(result["per_label"].items()) + [("overall", result["overall"])]:
        top = hits.get("top", {}).get("per_label", {}).get(label) if label != "overall" else hits.get("top", {}).get("overall")
        rnd = hits.get("random", {}).get("per_label", {}).get(label) if label != "overall" else hits.get("random", {}).get("overall")
        purity = result.get("clusters", {}).get(label, {}).get("purity")
        if label == "overall" and result.get("clusters"):
            purity = float(np.mean([c["purity"] for c in result["clusters"].values()]))
        fmt = lambda v: f"{v:.3f}" if v is not None and np.isfinite(v) else "-"
        lines.append(f"{printable(label):<16} {fmt(s['auc_pr']):>8} {fmt(s['random']):>8} {fmt(top):>9} {fmt(rnd):>9} {fmt(purity):>7}")
    lines += summary_lines("summary (clusters of >= 2 members)", result.get("clusters", {}))
    for name, baseline in result.get("baselines", {}).items():
        lines += summary_lines(f"baseline {name}", baseline.get("clusters", {}))
    lines += result.get("left_out", [])
    return "\n".join(lines)


def summary_lines(title: str, clusters: dict) -> list[str]:
    """The summary metrics per label: top-1 cluster hit rate (all members, and the first SHOWN as the
    label page shows them), top-3 clusters' hit rate, first element cluster's rank."""
    if not clusters:
        return []
    fmt = lambda v: f"{v:.3f}" if v is not None and np.isfinite(v) else "-"
    lines = [title, f"{'label':<16} {'top1 hit':>9} {f'top1 @{SHOWN}':>9} {'top1 size':>9} {'top3 hit':>9} {'1st elem':>9} "
                    f"{'clusters':>9}"]
    for label, c in clusters.items():
        first = c.get("first_element_rank")
        lines.append(f"{printable(label):<16} {fmt(c.get('top_cluster_hit_rate')):>9} {fmt(c.get('top_shown_hit_rate')):>9} "
                     f"{c.get('top_cluster_size', 0):>9} {fmt(c.get('top3_hit_rate')):>9} "
                     f"{'-' if first is None else first:>9} {c.get('clusters', 0):>9}")
    return lines


__all__ = ["evaluate_run", "evaluate_maps", "summarize", "localization_ap", "patch_hits", "cluster_purity",
           "summary_lines"]
