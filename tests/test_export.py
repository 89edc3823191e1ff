"""Exports: COCO (pycocotools reads it, one annotation per clustered patch), a Hugging Face
datasets folder, CSV; stale clusters are refused and nothing is recorded in the run."""

import csv
import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import edit_in_place, relisted_copy

from diffmine import cli, export
from diffmine.atomic import current_umask
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


def test_an_image_edited_since_listing_is_refused_by_the_exports_and_left_out_of_the_report(run, tmp_path, capsys):
    """Its boxes and map were made from the listed bytes: never exported or shown beside others."""
    from diffmine import pipeline
    from diffmine.report import ReportConfig, write_report

    copy, data = relisted_copy(run, tmp_path)
    edited = pd.read_parquet(copy.clusters_path)["image_id"].iloc[0]
    edit_in_place(data, edited)
    capsys.readouterr()
    for fmt in ("coco", "csv"):
        extra = ["--copy-images"] if fmt == "coco" else []
        assert cli.main(["export", "--run", str(copy.path), "--format", fmt, "--out", str(tmp_path / fmt), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{data / edited}: changed since `diffmine prepare` listed it" in err
        assert "re-run `diffmine prepare`" in err
    assert not (tmp_path / "coco" / "annotations.json").exists() and not (tmp_path / "csv" / "patches.csv").exists()
    write_report(copy)
    out = capsys.readouterr().out
    assert f"skipped {data / edited}: changed since `diffmine prepare` listed it" in out
    assert RunImages(copy).get(edited) is None and RunImages(run).get(edited) is not None
    # recorded for `status` (where the report's "... more" line sends the reader), until fixed
    problems = copy.problems()
    assert problems.loc[problems["step"] == "report", "image_id"].tolist() == [edited]
    copy.report_path.unlink()  # `diffmine report` renders it again: its record names the image left out
    pipeline.report_step(copy, ReportConfig())
    assert copy.lineage.get("report")["left_out"] == 1
    shutil.copy(run.dataset_root / edited, data / edited)  # the listed bytes back (a new mtime)
    pipeline.report_step(copy, ReportConfig())  # the same inputs: rendered again for the image it left out
    assert "report: made again" in capsys.readouterr().out
    assert "report" not in set(copy.problems()["step"]) and "left_out" not in copy.lineage.get("report")


def test_csv_cells_that_start_like_a_formula_are_written_as_text(run, tmp_path, monkeypatch):
    real = export.clustered_patches
    formulas = ['=HYPERLINK("http://x","y")', "+cmd|calc!A1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    labelled = lambda r: real(r).assign(label=[formulas[n % len(formulas)] for n in range(len(real(r)))])
    monkeypatch.setattr(export, "clustered_patches", labelled)
    written = export.export(run, "csv", tmp_path / "csv")
    with open(written, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows[:len(formulas)]] == ["'" + f for f in formulas]
    assert not any(r["image_id"].startswith("'") or r["path"].startswith("'") for r in rows)  # plain text kept
    frame = pd.DataFrame({"image_id": ["=1+1", "a.png"], "x0": [-3, 4], "note": ["ok", "-x"]})
    assert export.spreadsheet_safe(frame).to_dict("list") == {"image_id": ["'=1+1", "a.png"], "x0": [-3, 4],
                                                              "note": ["ok", "'-x"]}  # numbers stay numbers


class FakeDataset:
    """Enough of ``datasets`` for the folder handling of --format hf, where the package is missing."""

    def __init__(self, data):
        self.rows = len(data["label"])

    @classmethod
    def from_dict(cls, data, features=None):
        return cls(data)

    def save_to_disk(self, path):
        json.dump({"rows": self.rows}, open(f"{path}/dataset_info.json", "w"))


@pytest.fixture
def fake_datasets(monkeypatch):
    fake = SimpleNamespace(Dataset=FakeDataset, Features=dict, Image=lambda: None, Value=lambda kind: kind,
                           Sequence=lambda feature, length: feature)
    monkeypatch.setitem(sys.modules, "datasets", fake)


def test_an_export_refuses_a_folder_it_did_not_make_and_keeps_it(run, tmp_path, capsys, fake_datasets):
    mine = tmp_path / "mine"  # the user's own datasets folder
    mine.mkdir()
    (mine / "dataset_info.json").write_text("{}")
    (mine / "data-00000-of-00001.arrow").write_bytes(b"precious")
    for fmt in export.FORMATS:
        assert cli.main(["export", "--run", str(run.path), "--format", fmt, "--out", str(mine)]) == 2
        assert f"{mine}: not empty and not a diffmine export" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["data-00000-of-00001.arrow", "dataset_info.json"]
    assert (mine / "data-00000-of-00001.arrow").read_bytes() == b"precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(export.RunError, match="not a folder"):
        export.check_replaceable(tmp_path / "file")
    export.check_replaceable(tmp_path / "absent")  # absent or empty: may be written
    (tmp_path / "empty").mkdir()
    export.check_replaceable(tmp_path / "empty")


def test_an_export_replaces_its_own_earlier_export_and_nothing_beside_it(run, tmp_path, fake_datasets):
    out, sibling = tmp_path / "hf", tmp_path / "hf.tmp"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("the user's")
    made = {"hf": {"dataset_info.json"}, "csv": {"patches.csv"}, "coco": {"annotations.json"},
            "coco --copy-images": {"annotations.json", "images"}}
    for fmt in ("hf", "hf", "csv", "coco --copy-images", "csv", "coco"):  # each over the one before
        assert cli.main(["export", "--run", str(run.path), "--format", *fmt.split(), "--out", str(out)]) == 0
        assert json.loads((out / export.MARKER).read_text())["format"] == fmt.split()[0]
        # an earlier export is replaced whole: no file of it stays (a coco export's images/ under a csv one)
        assert {p.name for p in out.iterdir()} == made[fmt] | {export.MARKER}
        if fmt == "hf":
            assert json.loads((out / "dataset_info.json").read_text())["rows"] == len(pd.read_parquet(run.clusters_path))
        (out / "stale.txt").write_text("from the earlier export")
    assert (sibling / "keep.txt").read_text() == "the user's"
    assert out.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.tmp"]  # no temporary folder left


def test_an_export_to_the_current_folder_or_through_a_link_replaces_the_folder_itself(run, tmp_path, monkeypatch):
    """``--out .`` (an earlier export: it was removed, and nothing written; an empty folder: refused
    as not empty) and ``--out LINK`` (a link to an earlier export: refused) name the folder itself."""
    out, link = tmp_path / "out", tmp_path / "link"
    assert cli.main(["export", "--run", str(run.path), "--format", "csv", "--out", str(out)]) == 0
    monkeypatch.chdir(out)
    assert cli.main(["export", "--run", str(run.path), "--format", "coco", "--out", "."]) == 0
    assert {p.name for p in out.iterdir()} == {"annotations.json", export.MARKER}
    link.symlink_to(out)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", "--run", str(run.path), "--format", "csv", "--out", "link"]) == 0
    assert link.is_symlink() and {p.name for p in out.iterdir()} == {"patches.csv", export.MARKER}
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    assert cli.main(["export", "--run", str(run.path), "--format", "csv", "--out", "."]) == 0
    assert {p.name for p in (tmp_path / "empty").iterdir()} == {"patches.csv", export.MARKER}
