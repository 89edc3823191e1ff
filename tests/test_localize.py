"""Localization without box supervision: typicality against boxes / masks (paper section 5.2)."""

import csv
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffmine import pipeline
from diffmine.cli import main
from diffmine.evaluate import evaluate_run
from diffmine.localize import (ImageNames, blur_map, boxes_mask, computed_latent_maps, localize, read_boxes,
                               region_scores, scale_boxes)
from diffmine.report import ReportConfig, write_report
from diffmine.rundir import Run
from diffmine.typicality import TypicalityConfig

# -- pure functions --------------------------------------------------------------------------


def test_perfect_map_gives_ap_1_and_constant_map_gives_the_area_fraction():
    mask = boxes_mask(np.array([[2, 3, 6, 5]]), (10, 8))  # 4 x 2 pixels of 80
    assert mask.sum() == 8 and mask[3:5, 2:6].all()
    perfect = region_scores(mask.astype(np.float32), mask)
    assert perfect["auc_pr"] == pytest.approx(1.0)
    assert perfect["inside"] == 1.0 and perfect["outside"] == 0.0
    constant = region_scores(np.zeros((10, 8), np.float32), mask)
    assert constant["random"] == pytest.approx(0.1)
    assert constant["auc_pr"] == pytest.approx(0.1)  # an uninformative map scores the area fraction
    assert np.isnan(region_scores(np.zeros((4, 4)), np.zeros((4, 4), bool))["auc_pr"])


def test_boxes_scale_from_the_original_size_to_the_map_size():
    # original 1000 wide, 500 high -> map 100 x 50: a factor 10 on both axes
    assert scale_boxes([[100, 50, 300, 250]], (500, 1000), (50, 100)).tolist() == [[10, 5, 30, 25]]
    # unequal factors (keep-aspect vs square): x / 8, y / 16
    assert scale_boxes([[8, 16, 24, 64]], (1024, 512), (64, 64)).tolist() == [[1, 1, 3, 4]]
    # a box partly on a map pixel covers it; one smaller than a pixel still covers one
    assert scale_boxes([[9, 17, 23, 63]], (1024, 512), (64, 64)).tolist() == [[1, 1, 3, 4]]
    assert scale_boxes([[5.5, 5.5, 5.6, 5.6]], (1024, 1024), (64, 64)).tolist() == [[0, 0, 1, 1]]
    # boxes running past the image are clipped to the map
    assert scale_boxes([[900, 900, 1100, 1100]], (1000, 1000), (10, 10)).tolist() == [[9, 9, 10, 10]]
    # two boxes of one (image, label) are united
    assert boxes_mask([[0, 0, 2, 2], [1, 1, 3, 3]], (4, 4)).sum() == 7


def test_blur_smooths_and_zero_leaves_the_map():
    spike = np.zeros((9, 9), np.float32)
    spike[4, 4] = 1
    assert blur_map(spike, 0) is spike
    blurred = blur_map(spike, 1.0)
    assert blurred.sum() == pytest.approx(1.0, rel=1e-3) and 0 < blurred[4, 4] < 1 and blurred[4, 5] > 0
    with pytest.raises(ValueError, match="sigma"):
        blur_map(spike, -1)


def test_chestxray8_box_list_parses(tmp_path):
    # the real BBox_List_2017.csv header: "Bbox [x,y,w,h]" unquoted, then three empty columns
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                    "00013118_008.png,Atelectasis,225.08,547.02,86.1,79.19,,,\n"
                    "00014716_007.png,Cardiomegaly,314.5,437.0,388.0,310.0,,,\n\n")
    boxes = read_boxes(path)
    assert boxes[["image", "label"]].values.tolist() == [["00013118_008.png", "Atelectasis"], ["00014716_007.png", "Cardiomegaly"]]
    assert boxes.iloc[0][["x0", "y0", "x1", "y1"]].tolist() == pytest.approx([225.08, 547.02, 311.18, 626.21])
    # the same list quoted, and with clean column names
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('Image Index,Finding Label,"Bbox [x,y,w,h]",,,\n00013118_008.png,Atelectasis,225.08,547.02,86.1,79.19\n')
    clean = tmp_path / "clean.csv"
    clean.write_text("Image Index,Finding Label,x,y,w,h\n00013118_008.png,Atelectasis,225.08,547.02,86.1,79.19\n")
    for other in (quoted, clean):
        assert read_boxes(other).iloc[0][["x0", "y0", "x1", "y1"]].tolist() == pytest.approx([225.08, 547.02, 311.18, 626.21])


def test_generic_box_list_parses(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("image,label,x0,y0,x1,y1\na/1.png,cat,0,0,10,5\na/1.png,cat,20,20,30,30\n")
    boxes = read_boxes(path)
    assert len(boxes) == 2 and boxes.iloc[1][["x0", "y0", "x1", "y1"]].tolist() == [20, 20, 30, 30]


@pytest.mark.parametrize("content, problem", [
    ("file,kind,a,b\nx.png,cat,1,2\n", "not a box list"),
    ("image,label,x0,y0,x1,y1\nx.png,cat,-1,0,5,5\n", "line 2: negative"),
    ("image,label,x0,y0,x1,y1\nx.png,cat,5,0,5,5\n", "line 2: empty box"),
    ("Image Index,Finding Label,x,y,w,h\nx.png,cat,1,1,0,4\n", "empty box"),
    ("image,label,x0,y0,x1,y1\nx.png,cat,a,0,5,5\n", "must be numbers"),
    ("image,label,x0,y0,x1,y1\n,cat,0,0,5,5\n", "empty image or label"),
])
def test_bad_box_lists_name_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "my_boxes.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as info:
        read_boxes(path)
    assert "my_boxes.csv" in str(info.value)


def test_image_names_match_by_id_or_unique_file_name():
    names = ImageNames(["cats/a.png", "dogs/a.png", "cats/b.jpg", "x/y/c.png"])
    assert names("dogs/a.png") == "dogs/a.png"
    assert names("b.jpg") == "cats/b.jpg"  # unique file name
    assert names("b.png") == "cats/b.jpg"  # unique stem (a mask saved as PNG)
    assert names("c.png") == "x/y/c.png"
    assert names("a.png") is None  # two images are called a.png
    assert names("nowhere.png") is None


# -- on the trained fixture run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory):
    """A copy of the session run, so that its localize/ results stay out of the other tests."""
    path = tmp_path_factory.mktemp("localize") / "run"
    shutil.copytree(trained_run.path, path)
    return Run(path)


def _mask_boxes(masks):
    """One box per synthetic mask: the bounding box of its nonzero pixels, image_id, label."""
    rows = []
    for path in sorted(masks.rglob("*.png")):
        ys, xs = np.nonzero(np.asarray(Image.open(path)))
        if len(xs):
            rows.append([f"{path.parent.name}/{path.name}", path.parent.name, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return rows


@pytest.fixture(scope="module")
def boxes_csv(synthetic_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("boxes") / "boxes.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "x0", "y0", "x1", "y1"])
        writer.writerows(_mask_boxes(synthetic_data[1]))
        writer.writerow(["not_in_the_run.png", "norland", 0, 0, 5, 5])
    return path


@pytest.fixture(scope="module")
def before_run(synthetic_data, tmp_path_factory):
    """'Before finetuning': 6 images per label scored by an untrained model, at half the size."""
    images, _ = synthetic_data
    data = tmp_path_factory.mktemp("before_data")
    for label_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        (data / label_dir.name).mkdir()
        for path in sorted(label_dir.glob("*.png"))[:6]:
            shutil.copy(path, data / label_dir.name / path.name)
    run = Run(tmp_path_factory.mktemp("before") / "run")
    pipeline.prepare(run, data, "A scene from {label}.", "A scene.", 32)
    pipeline.typicality_step(run, TypicalityConfig(samples=4, seed=0), model="tiny", progress=False)
    return run


def _json(argv, capsys):
    assert main(argv + ["--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def _assert_shape(result, labels):
    assert set(result) >= {"overall", "per_label"}
    assert set(result["per_label"]) == set(labels)
    for stats in [result["overall"], *result["per_label"].values()]:
        assert set(stats) == {"auc_pr", "random", "inside", "outside", "images"}


def test_boxes_from_masks_localize_well_above_random(run, boxes_csv, capsys):
    result, err = _json(["localize", "--run", str(run.path), "--boxes", str(boxes_csv)], capsys)
    assert set(result) == {"split", "overall", "per_label", "splits"} and result["split"] == "train"
    _assert_shape(result, run.labels)
    overall = result["overall"]
    print("boxes:", overall)
    assert overall["images"] == len(run.images())
    assert overall["auc_pr"] > 2 * overall["random"]
    assert overall["inside"] > overall["outside"]
    assert "1 entries match no image" in err and "not_in_the_run.png" in err  # reported, not fatal
    assert json.loads((run.path / "localize" / "summary.json").read_text()) == result
    results = pd.read_parquet(run.path / "localize" / "results.parquet")
    assert len(results) == len(run.images()) and (results["map"] == "stored").all()
    assert run.lineage.get("localize")["unmatched"] == 1


def test_masks_give_the_evaluate_numbers(run, synthetic_data, capsys):
    masks = synthetic_data[1]
    result, _ = _json(["localize", "--run", str(run.path), "--masks", str(masks)], capsys)
    _assert_shape(result, run.labels)
    print("masks:", result["overall"])
    assert result["overall"]["auc_pr"] > 2 * result["overall"]["random"]
    # the same maps against the same masks as `diffmine evaluate`
    evaluated = evaluate_run(run, masks)
    assert result["overall"]["auc_pr"] == pytest.approx(evaluated["overall"]["auc_pr"])
    assert result["overall"]["random"] == pytest.approx(evaluated["overall"]["random"])


def test_before_run_side_by_side(run, before_run, boxes_csv, capsys):
    result, err = _json(["localize", "--run", str(run.path), "--boxes", str(boxes_csv), "--before", str(before_run.path)], capsys)
    _assert_shape(result, run.labels)
    _assert_shape(result["before"], before_run.labels)
    assert result["before"]["overall"]["images"] == 24 and result["overall"]["images"] == len(run.images())
    print("before:", result["before"]["overall"], "after:", result["overall"])
    assert str(before_run.path) in err  # its unmatched boxes are reported too
    assert main(["localize", "--run", str(run.path), "--boxes", str(boxes_csv), "--before", str(before_run.path)]) == 0
    table = capsys.readouterr().out
    assert "AUC-PR before" in table and "AUC-PR after" in table and "overall" in table


def test_boxes_are_scaled_to_each_runs_image_size(run, before_run, boxes_csv):
    # the before run is at 32 px, the boxes in the 64 px originals' coordinates
    after, _, _ = localize(run, boxes_csv)
    before, _, _ = localize(before_run, boxes_csv)
    merged = before.merge(after, on=["image_id", "label"], suffixes=("_before", "_after"))
    assert len(merged) == 24
    for row in merged.itertuples():
        (x0, y0, x1, y1), = row.boxes_after
        assert list(row.boxes_before[0]) == [x0 // 2, y0 // 2, -(-x1 // 2), -(-y1 // 2)]
        assert (row.height_before, row.width_before) == (32, 32)


def test_a_box_of_another_label_is_scored_under_that_label(run, tmp_path):
    index = run.typicality_index()
    image = index.iloc[0]
    other = next(label for label in run.labels if label != image["label"])
    path = tmp_path / "multi.csv"
    path.write_text(f"image,label,x0,y0,x1,y1\n{image['image_id']},{image['label']},0,0,20,20\n"
                    f"{image['image_id']},{other},10,10,40,40\n")
    results, computed, _ = localize(run, path)
    assert results.set_index("label")["map"].to_dict() == {image["label"]: "stored", other: "computed"}
    assert list(computed) == [results.set_index("label").loc[other, "key"]]
    stored = run.latent_typicality_map(image["image_id"])
    assert not np.allclose(computed[results.set_index("label").loc[other, "key"]], stored, atol=1e-4)
    # the compute path under the image's own label reproduces the stored map (same draws)
    backend = pipeline.scoring_model(run)
    again = computed_latent_maps(run, backend, image["path"], [image["label"]])[0]
    assert np.abs(again - stored).max() <= 1e-3 * max(1.0, np.abs(stored).max()) + 1e-4


def test_a_label_the_model_does_not_know_is_an_error_naming_it(run, tmp_path, capsys):
    image_id = run.typicality_index().iloc[0]["image_id"]
    path = tmp_path / "unknown.csv"
    path.write_text(f"image,label,x0,y0,x1,y1\n{image_id},Pneumothorax,0,0,20,20\n")
    assert main(["localize", "--run", str(run.path), "--boxes", str(path)]) == 2
    assert "Pneumothorax" in capsys.readouterr().err


def test_no_matching_entry_is_an_error(run, tmp_path, capsys):
    path = tmp_path / "elsewhere.csv"
    path.write_text("image,label,x0,y0,x1,y1\nelsewhere.png,norland,0,0,20,20\n")
    assert main(["localize", "--run", str(run.path), "--boxes", str(path)]) == 2
    assert "elsewhere.csv: no entry matches" in capsys.readouterr().err


def test_report_shows_the_localization_section(run, boxes_csv, tmp_path, capsys):
    image = run.typicality_index().iloc[0]
    other = next(label for label in run.labels if label != image["label"])
    path = tmp_path / "with_multi.csv"
    path.write_text(boxes_csv.read_text() + f"{image['image_id']},{other},0,0,20,20\n")
    assert main(["localize", "--run", str(run.path), "--boxes", str(path), "--blur", "1"]) == 0
    capsys.readouterr()
    html = (write_report(run, ReportConfig(clusters=2)).parent / "localization.html").read_text()
    assert 'id="localization"' in html and "AUC-PR" in html
    section = html[html.index('id="localization"'):]
    assert section.count('class="example localization"') >= len(run.labels)
    assert f"computed under {other}" in section  # the map made under the box's label is shown


def test_held_out_means_not_trained_on_even_after_the_listing_splits_otherwise(tmp_path):
    """Listing again with --holdout after training marks images held out that the model saw: a
    held-out score counts only images the model did not train on (RUN/model/trained-on.parquet)."""
    from conftest import barely_trained_run

    run = barely_trained_run(tmp_path, per_label=4)  # trained on all 8 images (no holdout)
    pipeline.typicality_step(run, TypicalityConfig(samples=2, seed=0), progress=False)
    pipeline.prepare(run, tmp_path / "data" / "images", "A scene from {label}.", "A scene.", 32, holdout=0.5)
    assert (run.images()["split"] == "holdout").sum() == 4
    pipeline.typicality_step(run, TypicalityConfig(samples=2, seed=0), progress=False)
    result = pipeline.localize_step(run, masks=tmp_path / "data" / "masks")
    assert set(result["splits"]) == {"train"} and result["splits"]["train"]["overall"]["images"] == 8
