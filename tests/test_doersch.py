"""The Doersch et al. baseline on the built-in dataset: it finds the planted elements, its table has
the cluster-table schema, it is deterministic, and small configs stay fast."""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from diffmine.cli import cmd_baseline
from diffmine.baselines.doersch import (COLUMNS, DoerschConfig, add_parser, patch_features,
                                        run_doersch)
from diffmine.evaluate import find_mask, load_mask, patch_hits
from diffmine.pipeline import prepare
from diffmine.rundir import Run
from diffmine.synthetic import SynthConfig, generate

SIZE = 48
SMALL = dict(patch=16, stride=4, seeds=300, neighbors=10, redundancy_neighbors=20, detectors=10, negatives_min=300,
             negatives_max=1000, top_detections=20, examples=5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    images = generate(out, SynthConfig(labels=3, per_label=24, size=SIZE), progress=False)
    return images, out / "masks"


def _new_run(path: Path, images: Path) -> Run:
    run = Run(path)
    prepare(run, images, "A scene from {label}.", "A scene.", SIZE)
    return run


@pytest.fixture(scope="module")
def mined(data, tmp_path_factory):
    images, masks = data
    run = _new_run(tmp_path_factory.mktemp("run"), images)
    t0 = time.time()
    table = run_doersch(run, DoerschConfig(**SMALL, seed=0), progress=False)
    return run, table, time.time() - t0


def _masks(run: Run, masks: Path) -> dict:
    return {i: load_mask(find_mask(masks, i), (SIZE, SIZE)) for i in run.images()["image_id"]}


def test_feature_layout_matches_the_authors_2112_dims():
    assert DoerschConfig().dims == 8 * 8 * 31 + 8 * 8 * 2 == 2112
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
    feats, boxes, energy = patch_features(image, DoerschConfig())
    # 64 px patches on the 8 px grid: (80 // 8 - 8 + 1) x (96 // 8 - 8 + 1) positions
    assert feats.shape == (3 * 5, 2112) and boxes.shape == (15, 4) and energy.shape == (15,)
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert (boxes[:, 2] - boxes[:, 0] == 64).all() and (boxes[:, 3] - boxes[:, 1] == 64).all()
    assert set(boxes[:, 0]) == {0, 8, 16, 24, 32} and set(boxes[:, 1]) == {0, 8, 16}


def test_svms_fitted_on_threads_at_once_are_the_ones_fitted_alone():
    """With fewer samples than features liblinear's dual solver shuffled with one random state for
    the whole process: SVMs fitted on two threads came out different from run to run (~1e-6)."""
    from concurrent.futures import ThreadPoolExecutor

    from diffmine.baselines.doersch import _fit_svm

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 600)).astype(np.float32)
    X[:30] += 0.2
    y = np.r_[np.ones(30), -np.ones(170)]
    alone = _fit_svm(X, y, DoerschConfig(), seed=3)
    with ThreadPoolExecutor(2) as pool:
        for w, c in pool.map(lambda _: _fit_svm(X, y, DoerschConfig(), seed=3), range(6)):
            assert np.array_equal(w, alone[0]) and c == alone[1]


def test_pyramid_boxes_are_in_original_pixels():
    image = np.random.default_rng(1).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
    config = DoerschConfig(patch=16, stride=4, scales=(1.0, 0.75, 0.5))
    feats, boxes, _ = patch_features(image, config)
    sides = boxes[:, 2] - boxes[:, 0]
    # 9x9 positions at 48 px, 6x6 at 36 px (side 16 / 0.75 ~ 21), 3x3 at 24 px (side 32)
    assert len(feats) == 81 + 36 + 9 and feats.shape[1] == config.dims == 4 * 4 * 33
    assert sorted(set(sides)) == [16, 21, 32]
    assert boxes.min() >= 0 and boxes[:, 2].max() <= 48 and boxes[:, 3].max() <= 48


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        DoerschConfig(patch=20, stride=8)
    with pytest.raises(ValueError, match="negatives_min"):
        DoerschConfig(negatives_min=10, negatives_max=5)


def test_top_detectors_find_the_planted_elements(mined, data):
    run, table, _ = mined
    hits = patch_hits(table, _masks(run, data[1]))
    table = table.assign(hit=hits)
    top = table[table["cluster_rank"] < 3].groupby("label")["hit"].mean()

    # random patches of the same size on the same images
    rng = np.random.default_rng(0)
    images = run.images()
    rows = [(i, x, y, x + 16, y + 16) for i in images["image_id"] for x, y in rng.integers(0, SIZE - 16 + 1, size=(20, 2))]
    random = pd.DataFrame(rows, columns=["image_id", "x0", "y0", "x1", "y1"])
    random_rate = float(np.nanmean(patch_hits(random, _masks(run, data[1]))))

    assert random_rate < 0.3
    assert top.mean() > random_rate + 0.35, (top.to_dict(), random_rate)
    assert (top > 2 * random_rate + 0.2).sum() >= 2, (top.to_dict(), random_rate)


def test_output_schema_and_settings(mined):
    run, table, seconds = mined
    assert list(table.columns) == COLUMNS
    saved = pd.read_parquet(run.path / "baselines" / "doersch" / "patches.parquet")
    pd.testing.assert_frame_equal(saved, table)
    labels = dict(zip(run.images()["image_id"], run.images()["label"]))
    assert set(table["label"]) == set(run.labels)
    assert all(labels[i] == l for i, l in zip(table["image_id"], table["label"]))  # detections on positive images
    assert ((table["x1"] - table["x0"]) == 16).all() and ((table["y1"] - table["y0"]) == 16).all()
    assert table[["x0", "y0"]].min().min() >= 0 and table[["x1", "y1"]].max().max() <= SIZE
    assert (table["cluster"] == table["cluster_rank"]).all() and (table["kind"] == "top").all()
    for label, group in table.groupby("label"):
        assert sorted(group["cluster"].unique()) == list(range(SMALL["detectors"]))
        disc = group.groupby("cluster")["discriminativeness"].first()
        assert (np.diff(disc.to_numpy()) <= 1e-6).all()  # cluster 0 = most discriminative
        assert disc.between(0, 1).all()
        for _, det in group.groupby("cluster"):
            assert list(det["rank_in_cluster"]) == list(range(len(det))) and len(det) <= SMALL["examples"]
            assert (np.diff(det["typicality"].to_numpy()) <= 1e-6).all()  # best detection first
            assert det["image_id"].is_unique  # at most one detection per image
    settings = json.loads((run.path / "baselines" / "doersch" / "settings.json").read_text())
    assert settings["config"]["patch"] == 16 and settings["dims"] == 528 and settings["images"] == 72
    assert {"features", "seeding", "svm", "total"} <= set(settings["seconds"])
    assert seconds < 30


def test_deterministic_and_labels_independent(mined, data, tmp_path):
    run, table, _ = mined
    label = run.labels[1]
    again = run_doersch(_new_run(tmp_path / "again", data[0]), DoerschConfig(**SMALL, seed=0), positive=label,
                        progress=False)
    assert set(again["label"]) == {label}
    pd.testing.assert_frame_equal(again, table[table["label"] == label].reset_index(drop=True))
    other = run_doersch(Run(tmp_path / "again"), DoerschConfig(**SMALL, seed=1), positive=label, progress=False)
    assert not other[["image_id", "x0", "y0"]].equals(again[["image_id", "x0", "y0"]])


def test_cli_standalone_lists_the_dataset(data, tmp_path):
    root = argparse.ArgumentParser()
    add_parser(root.add_subparsers(dest="command"))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, "detectors": 3}.items()]
    args = root.parse_args(["baseline", "doersch", "--data", str(data[0]), "--run", str(tmp_path / "run"),
                            "--positive", "norland", "--resolution", str(SIZE), *flags,
                            "--scales", "1.0", "0.75"])
    assert args.scales == [1.0, 0.75] and args.patch == 16
    table = cmd_baseline(args)
    assert (tmp_path / "run" / "images.parquet").is_file()
    assert set(table["label"]) == {"norland"} and table["cluster"].max() <= 2
    assert len(pd.read_parquet(tmp_path / "run" / "baselines" / "doersch" / "patches.parquet")) == len(table)


def test_too_small_images_are_refused_with_advice(data, tmp_path):
    run = _new_run(tmp_path / "run", data[0])
    with pytest.raises(ValueError, match="--patch"):
        run_doersch(run, DoerschConfig(), progress=False)


def test_default_sizing_follows_the_positive_patches_and_the_paper_preset_restores_its_numbers():
    config = DoerschConfig()
    # 30 positives of 625 patches (120 images of 64 px listed at 256 px, 4 labels)
    assert config.sized(18_750) == (375, 15)
    assert config.sized(10_000_000) == (25_000, 1_000)  # capped at the paper's numbers
    assert config.sized(40) == (1, 1)  # never more detectors than seeds
    assert config.sized(400) == (8, 5)  # at least 5 detectors where there are seeds for them
    assert (config.negatives_min, config.negatives_max) == (2_000, 5_000)
    paper = DoerschConfig(preset="paper")
    assert (paper.seeds, paper.detectors, paper.negatives_min, paper.negatives_max) == (25_000, 1_000, 10_000, 25_000)
    assert paper.sized(18_750) == (25_000, 1_000)
    assert DoerschConfig(seeds=100).sized(18_750) == (100, 5)  # an explicit number wins over the preset
    assert DoerschConfig(preset="paper", detectors=50).detectors == 50
    with pytest.raises(ValueError, match="preset"):
        DoerschConfig(preset="huge")


def test_the_plan_is_printed_before_mining_and_recorded(mined, capsys, data, tmp_path):
    run = _new_run(tmp_path / "run", data[0])
    run_doersch(run, DoerschConfig(**{**SMALL, "seeds": 0, "detectors": 0}), positive="norland", progress=False)
    out = capsys.readouterr().out
    settings = json.loads((run.path / "baselines" / "doersch" / "settings.json").read_text())
    plan = settings["plan"]["norland"]
    # 24 positives of 9 x 9 patches (48 px, 16 px patches, stride 4)
    assert plan == {"positive_patches": 24 * 81, "seeds": 39, "detectors": 5, "svms": 15}
    assert "norland: 1944 positive patches -> 39 seeds, <= 5 detectors, <= 15 SVMs" in out
    assert "ETA ~" in out and settings["eta_seconds"] >= 0
    table = pd.read_parquet(run.path / "baselines" / "doersch" / "patches.parquet")
    assert table["cluster"].nunique() <= 5


def test_an_image_edited_since_listing_is_left_out_of_the_bank_naming_the_file(data, tmp_path):
    """The baseline's patches of an image are its patches only while it holds the listed bytes."""
    import shutil

    from PIL import Image

    from diffmine.baselines.doersch import _as_bank

    images = Path(shutil.copytree(data[0], tmp_path / "data"))
    run = _new_run(tmp_path / "run", images)
    edited = run.images()["image_id"].iloc[0]
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(images / edited)  # same path, other bytes
    bank = _as_bank(run, DoerschConfig(**SMALL), None, "square", progress=False)
    assert edited not in bank.image_ids and len(bank.image_ids) == len(run.images()) - 1
    assert [(p.image_id, "changed since `diffmine prepare`" in p.problem) for p in bank.problems] == [(edited, True)]


def test_an_image_it_could_not_read_is_mined_with_once_it_can_be(data, tmp_path, monkeypatch, capsys):
    """The record names an image the bank left out that may come back (unreadable, changed since
    listing): a call while it is still gone fits no SVM (the labels' parts are read back) and keeps
    the identity; once it is back every label is mined again with it (another bank, other negatives)."""
    import shutil

    from diffmine import pipeline

    images = Path(shutil.copytree(data[0], tmp_path / "data"))
    run = _new_run(tmp_path / "run", images)
    config = DoerschConfig(**SMALL, seed=0)
    gone = images / run.images()["image_id"].iloc[0]
    gone.rename(tmp_path / "away.png")
    pipeline.baseline_step(run, config, progress=False)
    first = run.lineage.get("baseline-doersch")
    assert first["left_out"] == 1 and f"skipped {gone}: cannot read" in capsys.readouterr().out
    mining = _record_mined(monkeypatch)
    pipeline.baseline_step(run, config, progress=False)
    assert mining == [] and run.lineage.get("baseline-doersch")["identity"] == first["identity"]
    (tmp_path / "away.png").rename(gone)
    pipeline.baseline_step(run, config, progress=False)
    assert mining == run.labels
    again = run.lineage.get("baseline-doersch")
    assert again["identity"] != first["identity"] and "left_out" not in again
    assert "baseline-doersch" not in set(run.problems()["step"])


# --------------------------------------------------------------------------------------------
# resume: a finished label is kept, an interrupted run mines only the labels left


def _interrupt_on_label(monkeypatch, n: int) -> None:
    """``mine_doersch`` raises KeyboardInterrupt (Ctrl-C) when it is asked for its ``n``-th label."""
    from diffmine.baselines import doersch

    real, calls = doersch.mine_doersch, []

    def mine(bank, label, *args, **kwargs):
        calls.append(label)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(bank, label, *args, **kwargs)

    monkeypatch.setattr(doersch, "mine_doersch", mine)


def _record_mined(monkeypatch) -> list[str]:
    """The labels ``mine_doersch`` is asked for from now on (it mines them)."""
    from diffmine.baselines import doersch

    real, calls = doersch.mine_doersch, []
    monkeypatch.setattr(doersch, "mine_doersch", lambda bank, label, *a, **k: calls.append(label) or real(bank, label, *a, **k))
    return calls


def _patches_bytes(run: Run) -> bytes:
    return (run.path / "baselines" / "doersch" / "patches.parquet").read_bytes()


def test_an_interrupted_run_resumes_where_it_stopped_with_the_same_table(mined, data, tmp_path, monkeypatch, capsys):
    """Ctrl-C on the second label keeps the first one's detections; the same call again mines only
    the labels left, and writes the table of a run never interrupted, byte for byte."""
    from diffmine import pipeline
    from diffmine.baselines.doersch import part_path
    from diffmine.leftovers import leftovers
    from diffmine.rundir import RunError
    from diffmine.status import status

    uninterrupted, _, _ = mined
    run = _new_run(tmp_path / "run", data[0])
    config = DoerschConfig(**SMALL, seed=0)
    _interrupt_on_label(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.baseline_step(run, config, progress=False)
    first = run.labels[0]
    assert [path.name for path in (run.path / "baselines" / "doersch" / "labels").iterdir()] == [part_path(run, first).name]
    assert not (run.path / "baselines" / "doersch" / "patches.parquet").exists()
    assert [reason for reason, _ in run.stale("baseline-doersch")] == ["baseline-doersch is incomplete"]
    assert leftovers(run) == []  # a part is a result, no temporary file for `clean` to remove
    assert "  1 of 3 labels mined before it stopped: the same call again mines only the others" in status(run)
    with pytest.raises(RunError, match="--force"):  # the parts are hours of SVMs: other settings are refused
        pipeline.baseline_step(run, replace(config, seed=1), progress=False)

    mining = _record_mined(monkeypatch)
    capsys.readouterr()
    table = pipeline.baseline_step(run, config, progress=False)
    assert "doersch: resuming: 1 of 3 labels already mined" in capsys.readouterr().out
    assert mining == run.labels[1:]
    assert _patches_bytes(run) == _patches_bytes(uninterrupted)
    pd.testing.assert_frame_equal(table, pd.read_parquet(uninterrupted.path / "baselines" / "doersch" / "patches.parquet"),
                                  check_exact=True)
    record = run.lineage.get("baseline-doersch")
    assert record["complete"] and run.stale("baseline-doersch") == []
    # a part carries the identity of the whole result it belongs to
    stamp = pq.read_schema(part_path(run, first)).metadata[b"diffmine.doersch"]
    assert json.loads(stamp) == {"identity": record["identity"], "label": first}
    settings = json.loads((run.path / "baselines" / "doersch" / "settings.json").read_text())
    assert settings["resumed"] == 1 and settings["seconds"]["features"] > 0


def test_a_table_deleted_by_hand_is_rebuilt_from_the_labels_parts(mined, data, tmp_path, monkeypatch, capsys):
    """Recorded as done, its table gone (deleted, or left out of a copy): made again, not read
    (it crashed in read_parquet), and from the labels' parts: no SVM is fitted again."""
    import shutil

    from diffmine import pipeline

    uninterrupted, _, _ = mined
    run = Run(shutil.copytree(uninterrupted.path, tmp_path / "copy"))
    pipeline.baseline_step(run, DoerschConfig(**SMALL, seed=0), progress=False)  # recorded
    assert run.lineage.get("baseline-doersch")["complete"]
    (run.path / "baselines" / "doersch" / "patches.parquet").unlink()
    mining = _record_mined(monkeypatch)
    pipeline.baseline_step(run, DoerschConfig(**SMALL, seed=0), progress=False)
    assert mining == [] and _patches_bytes(run) == _patches_bytes(uninterrupted)


def test_a_part_made_otherwise_is_never_reused(data, tmp_path, monkeypatch, capsys):
    """Other settings, another bank (an image changed since listing is left out of it) or a part
    stamped for another label: every label is mined again, and the stale parts go."""
    import shutil

    from PIL import Image

    from diffmine.baselines.doersch import part_path

    images = Path(shutil.copytree(data[0], tmp_path / "data"))
    run = _new_run(tmp_path / "run", images)
    config = DoerschConfig(**SMALL, seed=0)
    _interrupt_on_label(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_doersch(run, config, progress=False)
    first = part_path(run, run.labels[0])
    made_with_seed_0 = first.read_bytes()

    mining = _record_mined(monkeypatch)
    run_doersch(run, replace(config, seed=1), progress=False)
    assert mining == run.labels and "resuming" not in capsys.readouterr().out
    assert first.read_bytes() != made_with_seed_0

    mining.clear()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(images / run.images()["image_id"].iloc[-1])
    run_doersch(run, replace(config, seed=1), progress=False)  # the same settings, a bank without that image
    assert mining == run.labels and "resuming" not in capsys.readouterr().out

    mining.clear()
    second = part_path(run, run.labels[1])
    second.write_bytes(first.read_bytes())  # label 0's detections under label 1's name
    (run.path / "baselines" / "doersch" / "labels" / "unreadable.parquet").write_text("not parquet")
    run_doersch(run, replace(config, seed=1), progress=False)
    assert mining == [run.labels[1]] and "resuming: 2 of 3" in capsys.readouterr().out
    assert sorted((run.path / "baselines" / "doersch" / "labels").iterdir()) == sorted(part_path(run, l) for l in run.labels)


def test_positive_runs_read_and_write_the_parts_of_a_full_run(mined, data, tmp_path, monkeypatch, capsys):
    """A label mined alone is reused by the full run after it, and the other way round. Either
    replaces the stored result, so it takes --force, as before: it mines nothing twice."""
    from diffmine import pipeline
    from diffmine.rundir import RunError

    uninterrupted, full, _ = mined
    run = _new_run(tmp_path / "run", data[0])
    config = DoerschConfig(**SMALL, seed=0)
    mining = _record_mined(monkeypatch)
    last = run.labels[-1]
    alone = pipeline.baseline_step(run, config, positive=last, progress=False)
    pd.testing.assert_frame_equal(alone, full[full["label"] == last].reset_index(drop=True), check_exact=True)

    with pytest.raises(RunError, match="positive.*--force"):
        pipeline.baseline_step(run, config, progress=False)
    capsys.readouterr()
    pipeline.baseline_step(run, config, progress=False, force=True)
    assert mining == [last] + run.labels[:-1] and "resuming: 1 of 3 labels" in capsys.readouterr().out
    assert _patches_bytes(run) == _patches_bytes(uninterrupted)

    mining.clear()
    again = pipeline.baseline_step(run, config, positive=last, progress=False, force=True)
    assert mining == [] and "resuming: 1 of 1 labels" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, alone, check_exact=True)
    assert run.lineage.get("baseline-doersch")["settings"]["positive"] == last


def test_labels_of_any_text_are_safe_part_names(data, tmp_path, monkeypatch, capsys):
    """A label is untrusted text ("../", "/", spaces, unicode): its part is named by a digest, inside
    the parts folder, and read back on resume."""
    import shutil

    from diffmine.baselines.doersch import part_path

    images = Path(shutil.copytree(data[0], tmp_path / "data"))
    odd = dict(zip(sorted(p.name for p in images.iterdir()), ["../up", "a/b c", "ünï cödé"]))
    rows = [f"{path.relative_to(images)},{odd[path.parent.name]}" for path in sorted(images.glob("*/*.png"))]
    (images / "manifest.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    run = Run(tmp_path / "run")
    prepare(run, images / "manifest.csv", "A scene from {label}.", "A scene.", SIZE)
    assert sorted(run.labels) == sorted(odd.values())
    run_doersch(run, DoerschConfig(**SMALL, seed=0), progress=False)
    parts = sorted((run.path / "baselines" / "doersch" / "labels").iterdir())
    assert parts == sorted(part_path(run, label) for label in odd.values())
    assert all(len(path.stem) == 20 and int(path.stem, 16) >= 0 for path in parts)
    assert sorted(p.relative_to(run.path).as_posix() for p in (run.path / "baselines").rglob("*")) == sorted(
        ["baselines/doersch", "baselines/doersch/labels", "baselines/doersch/patches.parquet",
         "baselines/doersch/settings.json"] + [p.relative_to(run.path).as_posix() for p in parts])
    mining = _record_mined(monkeypatch)
    capsys.readouterr()
    run_doersch(run, DoerschConfig(**SMALL, seed=0), progress=False)
    assert mining == [] and "resuming: 3 of 3 labels" in capsys.readouterr().out
