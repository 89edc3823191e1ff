"""The report is a static site: a real headless Chromium follows its links from the overview to a
label, a cluster and an image; pages are escaped, bounded and rewritten only when they change."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from diffmine.report import ReportConfig, image_key, render, write_report
from diffmine.rundir import Run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def run(tiny_run):
    return tiny_run


def links(html: str, prefix: str) -> list[str]:
    return re.findall(rf'href="({prefix}[^"]*\.html)"', html)


def test_every_label_cluster_and_shown_image_has_its_page(run):
    report = run.report_path.parent
    index = run.report_path.read_text()
    clusters = pd.read_parquet(run.clusters_path)
    for i, label in enumerate(run.labels):
        assert f'href="label-{i}.html">{label}</a>' in index
        page = (report / f"label-{i}.html").read_text()
        for rank, group in clusters[clusters["label"] == label].groupby("cluster_rank"):
            # size and coverage (distinct images) of each ranked cluster, and its page of all members
            assert f'data-value="{len(group)}">{len(group)}</td><td data-value="{group["image_id"].nunique()}">' in page
            members = (report / f"cluster-{i}-{rank}.html").read_text()
            assert members.count('<tr class="member">') == len(group)
            for image_id in group["image_id"]:
                assert f'href="image-{image_key(image_id)}.html"' in members
        for kind in ("top", "least", "random"):
            assert f'data-kind="{kind}"' in page
    for page in report.glob("*.html"):  # every crop links to an image view that exists
        for href in links(page.read_text(), "image-"):
            assert (report / href).is_file(), (page.name, href)
    assert "data:image/png;base64," not in "".join(p.read_text() for p in report.glob("*.html"))  # files, not inlined
    assert (report / "settings.html").read_text().count("&#34;resolution&#34;: 32") >= 1  # the lineage records


def test_a_report_rendered_again_rewrites_no_file_and_drops_what_is_no_longer_shown(run, tmp_path):
    report = run.report_path.parent
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in report.rglob("*") if p.is_file()}
    write_report(run)  # forced re-render, same results
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in report.rglob("*") if p.is_file()} == before
    (report / "assets" / "left-over.png").write_bytes(b"x")
    write_report(run, ReportConfig(members=1))
    assert not (report / "assets" / "left-over.png").exists()
    assert (report / "cluster-0-0.html").read_text().count('<tr class="member">') == 1  # capped
    write_report(run)


def test_every_cluster_link_has_its_page_when_clusters_are_capped(run, tmp_path):
    """An image view linked each patch to its cluster's page, also where the site has none (a
    cluster past --clusters or under --min-cluster-size): dead links."""
    copy = Run(shutil.copytree(run.path, tmp_path / "copy"))
    write_report(copy, ReportConfig(clusters=1))
    report = copy.report_path.parent
    linked = {href for page in report.glob("image-*.html") for href in links(page.read_text(), "cluster-")}
    assert linked and all((report / href).is_file() for href in linked)
    assert all("cluster-" not in p.name or p.name.endswith("-0.html") for p in report.glob("cluster-*.html"))


def test_the_skipped_images_page_is_this_renders(run, tmp_path):
    """The problems page and the index's count read the problems before this render recorded its
    own: an image broken showed 0, and once mended showed 1 for good (the report then up to date)."""
    copy = Run(shutil.copytree(run.path, tmp_path / "copy"))
    data = shutil.copytree(copy.dataset_root, tmp_path / "data")
    listing = pd.read_parquet(copy.images_path)
    listing["path"] = [str(data / p) for p in listing["path"]]
    listing.to_parquet(copy.images_path)
    shown = Run(copy.path).patches()["image_id"].iloc[0]
    image = Path(Run(copy.path).images().set_index("image_id").loc[shown, "path"])
    kept = image.read_bytes()
    image.write_bytes(b"broken")
    write_report(copy)
    report = copy.report_path.parent
    assert "Skipped images (1)" in copy.report_path.read_text() and image.name in (report / "problems.html").read_text()
    image.write_bytes(kept)  # the listed bytes again
    write_report(copy)
    assert "Skipped images (0)" in copy.report_path.read_text() and image.name not in (report / "problems.html").read_text()


def test_one_colour_scale_for_every_map_of_the_run(run):
    from diffmine.images import map_scale

    report = run.report_path.parent
    shown = [i for i in run.typicality_index()["image_id"] if (report / f"image-{image_key(i)}.html").is_file()]
    scale = map_scale(run.latent_typicality_map(i) for i in shown)
    for image_id in shown[:3]:
        assert f"(±{scale:.3g})" in (report / f"image-{image_key(image_id)}.html").read_text()
    legend = np.asarray(Image.open(report / "assets" / "legend.png").convert("RGB"))
    assert legend.shape[1] > 200  # the colour bar


def test_labels_paths_and_prompts_are_escaped():
    common = {"run_name": "<i>r</i>", "crop_px": 64, "view_px": 128, "labels_nav": [{"name": "<script>x</script>", "href": "label-0.html"}]}
    view = {"image_id": "<img src=x onerror=alert(1)>", "label": "<b>", "label_href": "label-0.html", "key": "k",
            "path": "a/<b>.png", "patches": [], "image": "assets/a.png", "map": "assets/b.png", "overlay": "assets/c.png"}
    html = render("image.html.j2", {**common, "view": view, "legend": "assets/legend.png", "scale": 1.0})
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert "<img src=x" not in html and "a/&lt;b&gt;.png" in html


def chromium(url: str, profile, *extra: str) -> str:
    """The DOM after load (scripts run), or what ``extra`` asks for (a screenshot)."""
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                           *(extra or ["--dump-dom"]), url], capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make browser` installs it)")
def test_chromium_follows_label_cluster_image_links_and_shows_the_image_and_its_map(run, tmp_path):
    report = run.report_path.parent
    dom = chromium(run.report_path.resolve().as_uri(), tmp_path / "p")
    label_page = links(dom, "label-")[0]
    dom = chromium((report / label_page).resolve().as_uri(), tmp_path / "p")
    assert dom.count('<tr class="cluster"') == 2  # k = 2
    cluster_page = links(dom, "cluster-")[0]
    dom = chromium((report / cluster_page).resolve().as_uri(), tmp_path / "p")
    image_page = links(dom, "image-")[0]
    url = (report / image_page).resolve().as_uri()
    dom = chromium(url, tmp_path / "p")
    assert 'class="source"' in dom and 'class="map"' in dom and 'class="legend"' in dom
    loaded, total = map(int, re.search(r'data-images-loaded="(\d+)/(\d+)"', dom).groups())
    assert loaded == total >= 4  # source, map, overlay, legend: every file found from file://
    shot = tmp_path / "shot.png"
    chromium(url, tmp_path / "p", f"--screenshot={shot}", "--window-size=1000,700")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.std() > 20  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3)[::3], axis=0)) > 200  # an image and a heat map drawn


def test_the_overview_shows_the_loss_curve_and_warns_when_the_model_is_near_chance(run):
    from diffmine import pipeline
    from diffmine.classify import ClassifyConfig
    from diffmine.report import classify_quality

    summary = pipeline.classify_step(run, ClassifyConfig(per_label=6, samples=2), progress=False)
    index = write_report(run).read_text()  # a 4-step model has not learned the labels
    assert 'id="loss"' in index and "over 4 steps" in index
    assert 'id="classify"' in index and f"{summary['accuracy']:.3f}" in index
    assert ('id="near-chance"' in index) == classify_quality(summary)["near_chance"]
    assert classify_quality({"accuracy": 0.30, "chance": 0.25, "images": 40})["near_chance"]
    assert not classify_quality({"accuracy": 0.90, "chance": 0.25, "images": 40})["near_chance"]
    loss = np.asarray(Image.open(run.report_path.parent / "assets" / "loss.png").convert("L"))
    assert loss.std() > 10  # a drawn plot


def test_notebook_helpers_show_a_cluster_an_image_and_the_run(run):
    clusters = pd.read_parquet(run.clusters_path)
    label = run.labels[0]
    members = clusters[(clusters["label"] == label) & (clusters["cluster_rank"] == 0)]
    grid = run.show_cluster(label, 0, size=40)
    assert grid.size == (min(len(members), 8) * 42, -(-len(members) // 8) * 42)  # one cell per member
    image_id = members.sort_values("rank_in_cluster")["image_id"].iloc[0]
    view = np.asarray(run.show_image(image_id, side=64))
    assert view.shape == (64, 2 * 64 + 4, 3)  # the image, a gap, the overlay
    boxes = clusters[clusters["image_id"] == image_id]
    x0, y0 = int(boxes["x0"].iloc[0]) * 2, int(boxes["y0"].iloc[0]) * 2  # 32 px drawn at 64
    assert tuple(view[y0, 64 + 4 + x0]) == (255, 200, 0)  # its mined box outlined on the overlay
    text = repr(run)
    assert f"{len(run.images())} images, 2 labels" in text and "model trained 4 steps" in text
    assert f"{len(clusters)} clustered patches in 4 clusters" in text and "cluster" in text.split("done:")[1]
    with pytest.raises(KeyError, match="no cluster 9"):
        run.show_cluster(label, 9)


def test_a_cluster_grid_names_the_members_it_cannot_show(run, tmp_path, capsys):
    from conftest import edit_in_place, relisted_copy

    copy, data = relisted_copy(run, tmp_path)
    clusters = pd.read_parquet(copy.clusters_path)
    label = copy.labels[0]
    members = clusters[(clusters["label"] == label) & (clusters["cluster_rank"] == 0)]
    images = members.sort_values("rank_in_cluster")["image_id"].drop_duplicates().tolist()
    edit_in_place(data, images[0])
    capsys.readouterr()
    shown = len(members) - (members["image_id"] == images[0]).sum()
    assert copy.show_cluster(label, 0, size=40).size == (min(shown, 8) * 42, -(-shown // 8) * 42)
    assert f"skipped {data / images[0]}: changed since" in capsys.readouterr().out
    for image_id in images[1:]:
        edit_in_place(data, image_id)
    with pytest.raises(ValueError, match="none of the images of cluster 0"):
        copy.show_cluster(label, 0, size=40)


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o077, 0o600)])
def test_run_files_follow_the_umask(tmp_path, umask, mode):
    import torch

    from diffmine.atomic import write_text
    from diffmine.models.base import save_weights

    old = os.umask(umask)
    try:
        save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # safetensors alone would make it 0600
        write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == mode
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode


def test_compare_draws_both_runs_on_one_colour_scale(tiny_run, monkeypatch):
    """A run whose maps are a tenth of the other's must look weaker on the compare page (each
    overlay scaled to its own range would draw both alike)."""
    import base64
    import io

    from diffmine.compare import build_context
    from diffmine.rundir import Run

    weaker = Run(tiny_run.path)
    monkeypatch.setattr(weaker, "typicality_map", lambda image_id: tiny_run.typicality_map(image_id) * 0.1)
    context = build_context(tiny_run, weaker, examples=2, crops=1)
    decode = lambda uri: np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))), np.float32)  # noqa: E731
    examples = [ex for label in context["labels"] for ex in label["examples"]]
    assert examples and context["colorbar"].startswith("data:image/png;base64,")
    for ex in examples:
        image = decode(ex["image"])
        change_a, change_b = np.abs(decode(ex["a"]) - image).mean(), np.abs(decode(ex["b"]) - image).mean()
        assert change_a > 3 * change_b > 0


def test_compare_pairs_images_by_their_bytes_not_their_names(tiny_run, tmp_path, capsys):
    """Another collection under the same file names: B's map of another image was drawn over A's
    image, and correlated with A's map, as if both runs had scored it."""
    from conftest import TINY_ARGS

    from diffmine import cli
    from diffmine.compare import build_context
    from diffmine.synthetic import SynthConfig, generate

    images = generate(tmp_path / "data", SynthConfig(labels=2, per_label=6, size=32, seed=1), progress=False)
    assert cli.main(["run", "--data", str(images), "--run", str(tmp_path / "other"), "--resolution", "32",
                     "--prompt", "A scene from {label}.", "--null-prompt", "A scene.", *TINY_ARGS]) == 0
    other = Run(tmp_path / "other")
    assert set(other.images()["image_id"]) == set(tiny_run.images()["image_id"])  # the same names, other pixels
    capsys.readouterr()
    context = build_context(tiny_run, other, examples=2, crops=1)
    assert context["shared_count"] == 0 and not [ex for label in context["labels"] for ex in label["examples"]]
    assert "12 image id(s)" in capsys.readouterr().err and all(row["n_shared"] == 0 for row in context["means"])


def test_compare_names_an_image_edited_since_listing_and_records_it_until_fixed(tiny_run, tmp_path, capsys):
    """The compare page leaves the edited image out with one line, as the report does, and the
    run it belongs to lists it as a problem of step compare until the listed bytes are back."""
    from conftest import edit_in_place, relisted_copy

    from diffmine.compare import compare_runs
    from diffmine.data import CHANGED

    copy, data = relisted_copy(tiny_run, tmp_path)
    top = copy.patches("top").sort_values("typicality", ascending=False)
    edited = top["image_id"].iloc[0]  # its label's most typical patch: on the page
    edit_in_place(data, edited)
    capsys.readouterr()
    compare_runs(copy, tiny_run, tmp_path / "page.html", crops=1)
    assert capsys.readouterr().out.splitlines() == [f"skipped {data / edited}: {CHANGED}"]
    problems = copy.problems()
    assert problems.loc[problems["step"] == "compare", "image_id"].tolist() == [edited]
    assert "compare" not in set(tiny_run.problems()["step"])  # the other run read its own, unchanged image
    shutil.copy(tiny_run.dataset_root / edited, data / edited)  # the listed bytes back
    compare_runs(copy, tiny_run, tmp_path / "page.html", crops=1)
    assert capsys.readouterr().out == "" and "compare" not in set(copy.problems()["step"])


def test_compare_against_a_run_it_cannot_write_names_the_images_it_left_out(tiny_run, tmp_path, capsys, monkeypatch):
    """Run B is only read: one it may not write (a read-only reference) still gets its page made with
    --out, its left-out images named, not recorded (recording them stopped the command)."""
    from conftest import edit_in_place, relisted_copy

    from diffmine.compare import compare_runs
    from diffmine.data import CHANGED

    copy, data = relisted_copy(tiny_run, tmp_path)
    edited = copy.patches("top").sort_values("typicality", ascending=False)["image_id"].iloc[0]
    edit_in_place(data, edited)

    def read_only(step, problems):
        raise PermissionError(13, "Permission denied", str(copy.path / ".problems.lock"))

    monkeypatch.setattr(copy, "record_problems", read_only)
    capsys.readouterr()
    assert compare_runs(tiny_run, copy, tmp_path / "page.html", crops=1).is_file()
    assert capsys.readouterr().out.splitlines() == [f"skipped {data / edited}: {CHANGED}"]


def test_keep_aspect_images_are_shown_at_their_maps_size(tmp_path):
    """keep-aspect rounds the width to the model's latent factor (50 x 32 at height 32 -> 48 wide,
    not 50): the report and the exports must load the images at the maps' size, not their own."""
    from conftest import TINY_ARGS

    from diffmine import cli
    from diffmine.images import RunImages
    from diffmine.rundir import Run

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for n in range(6):
            pixels = rng.integers(0, 255, (32, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{n}.png")
    assert cli.main(["run", "--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--resolution", "32",
                     "--resize", "keep-aspect", *TINY_ARGS]) == 0
    run = Run(tmp_path / "run")
    image_id = run.images()["image_id"][0]
    assert run.typicality_map(image_id).shape == (32, 48)
    assert run.width_multiple() == 4 and RunImages(run).get(image_id).shape == (32, 48, 3)
    assert run.report_path.is_file()
    assert cli.main(["export", "--run", str(run.path), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0
    import json
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert {image["width"] for image in coco["images"]} == {48}
