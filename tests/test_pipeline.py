"""The method works on data with known ground truth, not only runs."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import diffmine
from diffmine import pipeline
from diffmine.evaluate import evaluate_maps, evaluate_run, load_mask, patch_hits, summarize
from diffmine.models import create_backend
from diffmine.rundir import Run
from diffmine.typicality import TypicalityConfig, typicality_latent_maps, upsample
from diffmine.data import load_image, to_model_input

from conftest import TYPICALITY


def _images_of(run, n_per_label=10):
    images = run.images()
    return images.groupby("label").head(n_per_label).reset_index(drop=True)


def test_typicality_finds_the_planted_element(trained_run, synthetic_data):
    _, masks = synthetic_data
    result = evaluate_run(trained_run, masks)
    overall = result["overall"]
    # the element covers ~3% of the pixels: an uninformative map scores about that
    assert overall["auc_pr"] > 3 * overall["random"], result
    assert overall["inside"] > overall["outside"]
    # at this test's training budget not every label is learned yet (see conftest); two must be
    learned = [l for l, s in result["per_label"].items() if s["auc_pr"] > 3 * s["random"] and s["inside"] > s["outside"]]
    assert len(learned) >= 2, result["per_label"]


def test_mined_patches_show_the_element_far_more_often_than_random_patches(trained_run, synthetic_data):
    _, masks = synthetic_data
    hits = evaluate_run(trained_run, masks)["hit_rate"]
    assert hits["top"]["overall"] > 0.15
    assert hits["top"]["overall"] > 5 * hits["random"]["overall"]
    # (no claim on the least typical ones: for a label not yet learned, the model can find its
    # element atypical, and then those patches show it too)


def test_finetuned_model_beats_an_untrained_one(trained_run, synthetic_data):
    """The paper's "effect of finetuning": the same architecture, untrained, finds nothing."""
    _, masks = synthetic_data
    rows = _images_of(trained_run)
    dataset = trained_run.step_config("dataset")
    untrained = create_backend("tiny", pipeline.all_prompts(trained_run), seed=123)
    pixels = to_model_input(np.stack([load_image(p, dataset["resolution"]) for p in rows["path"]]))
    latent = typicality_latent_maps(untrained, pixels, [trained_run.prompt(l) for l in rows["label"]],
                                    trained_run.prompt(None), TYPICALITY)
    size = (dataset["resolution"],) * 2
    untrained_maps = dict(zip(rows["image_id"], upsample(latent, size)))
    trained_maps = {i: trained_run.typicality_map(i) for i in rows["image_id"]}
    labels = dict(zip(rows["image_id"], rows["label"]))
    trained = summarize(evaluate_maps(trained_maps, labels, masks)[0])["overall"]
    random_init = summarize(evaluate_maps(untrained_maps, labels, masks)[0])["overall"]
    assert trained["auc_pr"] > 2 * random_init["auc_pr"], (trained, random_init)
    assert random_init["auc_pr"] < 2 * random_init["random"]


def test_a_wrong_label_makes_the_element_atypical(trained_run, synthetic_data):
    """Under another label's prompt, the element is explained worse than under its own, and in
    most images worse than by the null prompt."""
    _, masks = synthetic_data
    backend, _ = pipeline.load_model(trained_run)
    rows = _images_of(trained_run, 6)
    dataset = trained_run.step_config("dataset")
    labels = trained_run.labels
    pixels = to_model_input(np.stack([load_image(p, dataset["resolution"]) for p in rows["path"]]))
    wrong = [labels[(labels.index(l) + 1) % len(labels)] for l in rows["label"]]
    right_maps = typicality_latent_maps(backend, pixels, [trained_run.prompt(l) for l in rows["label"]],
                                        trained_run.prompt(None), TYPICALITY)
    wrong_maps = typicality_latent_maps(backend, pixels, [trained_run.prompt(l) for l in wrong],
                                        trained_run.prompt(None), TYPICALITY)
    size = (dataset["resolution"],) * 2
    inside_right, inside_wrong = [], []
    for image_id, r, w in zip(rows["image_id"], upsample(right_maps, size), upsample(wrong_maps, size)):
        mask = load_mask(masks / image_id, size)
        inside_right.append(r[mask].mean())
        inside_wrong.append(w[mask].mean())
    # at this training budget the wrong label leaves the element about neutral on average, and
    # atypical in most images
    assert np.mean(inside_right) > 0 > np.median(inside_wrong)
    assert (np.array(inside_right) > np.array(inside_wrong)).mean() >= 0.7  # measured 0.75


def test_public_api_typicality_map_and_patches(trained_run):
    run = diffmine.open_run(trained_run.path)
    image_id = run.images()["image_id"].iloc[0]
    assert "/" in image_id  # named by its path relative to the dataset root
    pixel_map = run.typicality_map(image_id)
    assert pixel_map.shape == (64, 64) and pixel_map.dtype == np.float32
    patches = run.patches()
    for column in ("image_id", "label", "x0", "y0", "x1", "y1", "typicality", "cluster", "rank_in_cluster"):
        assert column in patches.columns
    with pytest.raises(KeyError, match="no typicality map"):
        run.typicality_map("nope/none.png")


def test_significance_filter_keeps_element_patches_and_drops_the_others(trained_run, synthetic_data):
    """Kept (z >= z_min) candidates hold the planted element far more often than rejected ones."""
    _, masks = synthetic_data
    images = trained_run.images()
    _, loaded = evaluate_maps({i: trained_run.typicality_map(i) for i in images["image_id"]},
                              dict(zip(images["image_id"], images["label"])), masks)
    kept, rejected = trained_run.mined_patches("top"), trained_run.mined_patches("rejected")
    assert len(kept) and len(rejected) and (kept["z"] >= 2.0).all() and (rejected["z"] < 2.0).all()
    assert np.nanmean(patch_hits(kept, loaded)) > 2 * np.nanmean(patch_hits(rejected, loaded))


def test_clusters_are_ranked_by_score_small_ones_last_and_members_by_distance(trained_run):
    patches = trained_run.patches()
    for _, group in patches.groupby("label"):
        clusters = group.groupby("cluster_rank")[["cluster_score", "cluster_size"]].first().sort_index()
        shown = clusters[clusters["cluster_size"] >= 2]
        assert shown["cluster_score"].is_monotonic_decreasing
        assert (shown.index == np.arange(len(shown))).all()  # the shown ranks have no gaps
        for _, members in group.groupby("cluster"):
            ordered = members.sort_values("rank_in_cluster")["distance"]
            assert ordered.is_monotonic_increasing


def test_mining_per_image_boxes_do_not_overlap_and_top_is_sorted(trained_run):
    mined = trained_run.mined_patches("top")
    k = trained_run.lineage.get("mine")["patch"]  # the side used, recorded beside the settings
    assert (mined["x1"] - mined["x0"] == k).all()
    for _, group in mined.groupby("image_id"):
        boxes = group[["x0", "y0"]].to_numpy()
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert np.abs(boxes[i] - boxes[j]).max() > k
    for _, group in mined.groupby("label"):
        assert group["typicality"].is_monotonic_decreasing


def test_typicality_is_deterministic_and_resumes_after_a_kill(trained_run, tmp_path):
    """Same seed, same maps; a missing shard and a corrupt one are redone, the rest kept."""
    copy = Run(tmp_path / "copy")
    shutil.copytree(trained_run.path, copy.path)
    shards = sorted(copy.typicality_dir.glob("shard-*.parquet"))
    assert len(shards) >= 3
    kept = shards[0].with_suffix(".safetensors").stat().st_mtime_ns
    shards[1].unlink()  # killed before the index was written
    shards[2].with_suffix(".safetensors").write_bytes(b"truncated")  # a half-written file
    written = pipeline.typicality_step(copy, TYPICALITY, progress=False)
    assert written == 2
    assert shards[0].with_suffix(".safetensors").stat().st_mtime_ns == kept
    for image_id in copy.images()["image_id"]:
        np.testing.assert_array_equal(copy.typicality_map(image_id), trained_run.typicality_map(image_id))


def test_resume_with_another_batch_size_keeps_the_shards(trained_run, tmp_path):
    """How the work is executed (pass size, decoding workers) is not part of the result."""
    copy = Run(tmp_path / "copy")
    shutil.copytree(trained_run.path, copy.path)
    shards = sorted(copy.typicality_dir.glob("shard-*.parquet"))
    shards[0].unlink()
    faster = TypicalityConfig(**{**TYPICALITY.__dict__, "batch_size": 24, "workers": 1})
    assert pipeline.typicality_step(copy, faster, progress=False) == 1
    assert sorted(copy.typicality_dir.glob("shard-*.parquet")) == shards


def test_feature_batch_size_is_no_part_of_the_features(tiny_run, tmp_path):
    """Every image gets the same DIFT ensemble noise whatever its batch: another --feature-batch-size
    leaves the features and clusters up to date, and recomputing with it gives the same features."""
    from diffmine.clustering import ClusterConfig
    from diffmine.features import FeatureConfig

    copy = Run(tmp_path / "copy")
    shutil.copytree(tiny_run.path, copy.path)
    stored = np.load(copy.features_path)
    written = copy.features_path.stat().st_mtime_ns
    pipeline.cluster_step(copy, ClusterConfig(k=2), FeatureConfig(ensemble=1, batch_size=1), progress=False)
    assert copy.features_path.stat().st_mtime_ns == written and not copy.stale("cluster")
    pipeline.cluster_step(copy, ClusterConfig(k=2), FeatureConfig(ensemble=1, batch_size=1), progress=False, force=True)
    np.testing.assert_allclose(np.load(copy.features_path), stored, rtol=1e-4, atol=1e-5)


def test_cluster_leaves_out_an_image_edited_since_listing_until_it_is_fixed(tiny_run, tmp_path, capsys):
    """Features of an edited image would describe other pixels than its boxes were mined on, and a
    zero feature would join some cluster: its patches get none (NaN) and are left out of the
    clusters, the image named in one line and recorded as a problem of step features. Once it is
    fixed, the next cluster (no --force) describes it again: the very result of the untouched run."""
    from conftest import edit_in_place, relisted_copy

    from diffmine.clustering import ClusterConfig
    from diffmine.data import CHANGED
    from diffmine.features import FEATURE_KINDS, FeatureConfig

    copy, data = relisted_copy(tiny_run, tmp_path)
    edited = copy.patches("top")["image_id"].iloc[0]
    edit_in_place(data, edited)
    capsys.readouterr()
    configs = ClusterConfig(k=2), FeatureConfig(ensemble=1)
    copy.features_path.unlink()  # the features made again, now that the image is edited
    pipeline.cluster_step(copy, *configs, progress=False)
    assert f"skipped {data / edited}: {CHANGED}" in capsys.readouterr().out.splitlines()
    problems = copy.problems()
    assert problems.loc[problems["step"] == "features", "image_id"].tolist() == [edited]
    of_edited = (copy.mined_patches(FEATURE_KINDS)["image_id"] == edited).to_numpy()
    features = np.load(copy.features_path)
    assert np.isnan(features[of_edited]).all() and np.isfinite(features[~of_edited]).all()
    assert edited not in set(pd.read_parquet(copy.clusters_path)["image_id"])
    # another result than the whole one (what was made from the clusters is stale), yet served
    assert copy.lineage.get("features")["identity"] != tiny_run.lineage.get("features")["identity"]
    assert not copy.stale("cluster")
    shutil.copy(tiny_run.dataset_root / edited, data / edited)  # the listed bytes back
    pipeline.cluster_step(copy, *configs, progress=False)
    out = capsys.readouterr().out
    assert "features: made again, for the 1 image(s) it left out last time" in out and "skipped" not in out
    assert "features" not in set(copy.problems()["step"])
    for name in ("features", "cluster"):
        assert copy.lineage.get(name)["identity"] == tiny_run.lineage.get(name)["identity"]
    np.testing.assert_array_equal(np.load(copy.features_path), np.load(tiny_run.features_path))
    pd.testing.assert_frame_equal(pd.read_parquet(copy.clusters_path), pd.read_parquet(tiny_run.clusters_path))


def test_execution_settings_of_cotypicality_and_doersch_are_no_part_of_their_results(tiny_run, tmp_path, capsys):
    """Another --feature-batch-size of co-typicality (it describes a scene's members in one pass) or
    --workers of baseline doersch leaves the expensive result up to date, also when its record was
    made while they were recorded: never a refusal whose --force recomputes the same result."""
    from dataclasses import replace

    from diffmine.baselines.doersch import DoerschConfig
    from diffmine.cotypicality import CotypicalityConfig
    from diffmine.features import FeatureConfig
    from diffmine.translate import TranslateConfig

    copy = Run(tmp_path / "copy")
    shutil.copytree(tiny_run.path, copy.path)
    pipeline.translate_step(copy, TranslateConfig(method="sdedit", steps=2), progress=False)
    cotypicality, doersch = CotypicalityConfig(top=8, per_tuple=1, umap_dim=2, k=2, samples=2), DoerschConfig(patch=8, stride=4)
    pipeline.cotypicality_step(copy, cotypicality, FeatureConfig(ensemble=1), progress=False)
    pipeline.baseline_step(copy, doersch, progress=False)

    def run_again():
        capsys.readouterr()
        pipeline.cotypicality_step(copy, cotypicality, FeatureConfig(ensemble=1, batch_size=3), progress=False)
        pipeline.baseline_step(copy, replace(doersch, workers=1), progress=False)
        out = capsys.readouterr().out
        assert "cotypicality: up to date" in out and "baseline doersch: up to date" in out

    run_again()
    for name, recorded in (("cotypicality", lambda s: s["features"].update(batch_size=32)),
                           ("baseline-doersch", lambda s: s.update(workers=0))):
        record = copy.lineage.get(name)
        recorded(record["settings"])  # as an earlier version recorded it
        copy.lineage.put(name, record["settings"], record["inputs"], record["command"], identity=record["identity"])
    run_again()


def test_another_seed_gives_other_draws_and_settings_change_recomputes(trained_run, tmp_path):
    copy = Run(tmp_path / "copy")
    shutil.copytree(trained_run.path, copy.path)
    other = TypicalityConfig(**{**TYPICALITY.__dict__, "seed": 7})
    with pytest.raises(diffmine.rundir.RunError, match="seed: 0 -> 7.*--force"):
        pipeline.typicality_step(copy, other, progress=False)  # hours of maps are never replaced silently
    assert pipeline.typicality_step(copy, other, progress=False, force=True) == len(list(trained_run.typicality_dir.glob("shard-*.parquet")))
    image_id = copy.images()["image_id"].iloc[0]
    a, b = copy.typicality_map(image_id), trained_run.typicality_map(image_id)
    assert not np.array_equal(a, b)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5  # the same quantity, other noise


def test_query_and_status(trained_run):
    from diffmine.query import query
    from diffmine.status import status

    counts = query(trained_run, "SELECT label, count(*) AS n FROM patches GROUP BY label ORDER BY label")
    assert list(counts["label"]) == trained_run.labels
    text = status(trained_run)
    images = len(trained_run.images())
    shards = -(-images // TYPICALITY.shard_size)
    assert f"typicality: {images}/{images} images, {shards} shard{'s' if shards > 1 else ''}; done" in text and "cluster: done" in text


def test_summary_metrics_read_the_top_cluster_in_its_own_order_at_a_fixed_depth():
    """top1 counts every member of the label's best-ranked shown cluster; top1 at depth 8 only the
    first 8 by rank_in_cluster (what a label page shows, and all a Doersch detector writes)."""
    from diffmine.evaluate import SHOWN, cluster_purity

    rng = np.random.default_rng(0)
    hits_top = [1] * 8 + [0, 0]  # the 2 members farthest from the centroid miss
    table = pd.DataFrame({
        "label": "a", "cluster": [5] * 10 + [7] * 4 + [9],
        "cluster_rank": [0] * 10 + [1] * 4 + [2],  # cluster 9 (1 member) is not shown at min_size 2
        "rank_in_cluster": list(range(10)) + list(range(4)) + [0],
    })
    hits = np.array(hits_top + [0, 0, 0, 1] + [1], float)
    order = rng.permutation(len(table))  # the table's row order must not matter
    result = cluster_purity(table.iloc[order].reset_index(drop=True), hits[order], min_size=2)["a"]
    assert SHOWN == 8
    assert result["top_cluster_hit_rate"] == pytest.approx(0.8)
    assert result["top_shown_hit_rate"] == 1.0 and result["top_cluster_size"] == 10
    assert result["top3_hit_rate"] == pytest.approx(9 / 14) and result["clusters"] == 2
    assert result["first_element_rank"] == 1
    deeper = cluster_purity(table, hits, min_size=2, depth=9)["a"]
    assert deeper["top_shown_hit_rate"] == pytest.approx(8 / 9)
    # misses first in the cluster's own order: the fixed-depth rate falls, the all-member one does not
    flipped = table.assign(rank_in_cluster=[9 - r for r in range(10)] + list(range(4)) + [0])
    again = cluster_purity(flipped, hits, min_size=2)["a"]
    assert again["top_shown_hit_rate"] == pytest.approx(6 / 8) and again["top_cluster_hit_rate"] == pytest.approx(0.8)


def test_the_flip_test_keeps_fewer_patches_and_more_of_them_on_the_element(trained_run, synthetic_data, tmp_path):
    """The z filter passes the best of each image's noise boxes (the winner's curse); the
    image-wise sign-flip test, the choice of the box included, keeps a set that holds the planted
    element more often. Each kept patch has p <= alpha, each rejected one more."""
    from diffmine.mining import MineConfig

    _, masks = synthetic_data
    copy = Run(shutil.copytree(trained_run.path, tmp_path / "run"))
    images = copy.images()
    _, loaded = evaluate_maps({i: copy.typicality_map(i) for i in images["image_id"]},
                              dict(zip(images["image_id"], images["label"])), masks)
    flip = MineConfig(top=60, least=20, random=20, significance_test="flip")
    pipeline.mine_step(copy, flip, progress=False)
    kept, rejected = copy.mined_patches("top"), copy.mined_patches("rejected")
    assert (kept["p"] <= 0.05).all() and (rejected["p"] > 0.05).all() and len(kept) < len(trained_run.mined_patches())
    # measured on the AMD EPYC: 126 of 240 kept, 63% on the element against 39%
    assert np.nanmean(patch_hits(kept, loaded)) > 1.3 * np.nanmean(patch_hits(trained_run.mined_patches(), loaded))
    assert copy.lineage.get("mine")["settings"]["significance_test"] == "flip"
    assert trained_run.mined_patches()["p"].isna().all()  # the z test computes none
    from diffmine.status import status
    assert f"{len(kept)} top patches kept, {len(rejected)} rejected candidates stored (flip test, p <= 0.05)" in status(copy)
    assert f"{len(trained_run.mined_patches())} top patches kept" in status(trained_run) and "(z >= 2.0)" in status(trained_run)
