"""Exports: COCO (pycocotools reads it, one annotation per clustered patch), a Hugging Face
datasets folder, CSV; stale clusters are refused and nothing is recorded in the run."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffmine import cli
from diffmine.images import RunImages


@pytest.fixture
def run(tiny_run):
    return tiny_run


def test_coco_export_has_one_annotation_per_clustered_patch_and_pycocotools_reads_it(run, tmp_path, capsys):
    lineage = (run.path / "lineage.json").read_bytes()
    assert cli.main(["export", "--run", str(run.path), "--format", "coco", "--out", str(tmp_path / "coco"),
                     "--copy-images"]) == 0
    assert str((tmp_path / "coco" / "annotations.json").resolve()) in capsys.readouterr().out
    assert (run.path / "lineage.json").read_bytes() == lineage  # not part of the run's lineage
    patches = pd.read_parquet(run.clusters_path)
    data = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert len(data["annotations"]) == len(patches)
    assert len(data["images"]) == patches["image_id"].nunique()
    assert {c["name"] for c in data["categories"]} == {f"{r.label}/cluster-{r.cluster_rank}" for r in patches.itertuples()}
    coco_tools = pytest.importorskip("pycocotools.coco")
    coco = coco_tools.COCO(str(tmp_path / "coco" / "annotations.json"))
    assert len(coco.getAnnIds()) == len(patches)
    by_id = {entry["diffmine_image_id"]: entry for entry in data["images"]}
    images = RunImages(run)
    for r in patches.head(5).itertuples():  # the box is the patch, in the copied image's pixels
        entry = by_id[r.image_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[entry["id"]]))
        assert [r.x0, r.y0, r.x1 - r.x0, r.y1 - r.y0] in [a["bbox"] for a in anns]
        assert any(abs(a["score"] - r.typicality) < 1e-6 for a in anns)
        copied = np.asarray(Image.open(tmp_path / "coco" / entry["file_name"]).convert("RGB"))
        assert copied.shape == (entry["height"], entry["width"], 3)
        assert np.array_equal(copied, images.get(r.image_id))
        assert coco.loadCats(anns[0]["category_id"])[0]["supercategory"] == r.label


def test_hf_export_loads_with_datasets(run, tmp_path):
    datasets = pytest.importorskip("datasets")
    assert cli.main(["export", "--run", str(run.path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    table = datasets.load_from_disk(str(tmp_path / "hf"))
    patches = pd.read_parquet(run.clusters_path).sort_values(["label", "cluster_rank", "rank_in_cluster"], kind="mergesort")
    assert len(table) == len(patches)
    first, expected = table[0], patches.iloc[0]
    assert first["label"] == expected["label"] and first["cluster_rank"] == expected["cluster_rank"]
    assert first["box"] == [int(expected[c]) for c in ("x0", "y0", "x1", "y1")]
    assert first["image"].size == (expected["x1"] - expected["x0"], expected["y1"] - expected["y0"])  # the crop
    assert cli.main(["export", "--run", str(run.path), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0  # replaced


def test_csv_export_and_what_is_refused(run, tmp_path, capsys):
    assert cli.main(["export", "--run", str(run.path), "--format", "csv", "--out", str(tmp_path / "csv")]) == 0
    table = pd.read_csv(tmp_path / "csv" / "patches.csv")
    assert len(table) == len(pd.read_parquet(run.clusters_path)) and table["path"].str.endswith(".png").all()
    assert cli.main(["export", "--run", str(run.path), "--format", "csv", "--out", str(run.path / "x")]) == 2
    assert "outside the run directory" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    assert cli.main(["mine", "--run", str(copy), "--top", "6", "--least", "2", "--random", "2"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--run", str(copy), "--format", "coco", "--out", str(tmp_path / "stale")]) == 2
    assert "re-run `diffmine cluster" in capsys.readouterr().err
