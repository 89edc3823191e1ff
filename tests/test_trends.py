"""Trends over ordered labels, on the ordered synthetic set (diffmine.synthetic.generate_ordered):
an element whose share of the images grows over five eras (0.1 -> 0.9), one that fades, one that
stays at 0.5, and a ``control`` label outside the order that never carries the constant element,
so that it is typical of the eras at all. Each element cluster found is told apart by the
ground-truth masks of its members; its measured prevalence must follow the planted share.

The fixture: 64 px, 16 images per era, no distractor, 80 control images, 600 steps of batch 16,
the smallest scale tried where every element is learned (at 32 px none was). Measured 2026-12-02
(benchmarks/README.md, "The standard error of a patch"): with mining's stratified error every
element has a pure cluster on the ordered set's seeds 0-2, and with the two-or-three-group split
the quality test passes on all three, for models trained with 1 or 2 threads (replayed from the
stored best matches; seed 0, this fixture, run through this file). That was on AMD; trained on an
Intel Xeon with AMX, seed 0's fading element kept two groups under BIC and failed (span 0.31): the
groups are now chosen by AIC, which passes seeds 0-2 there (benchmarks/README.md, "Two or three
groups: AIC")."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from conftest import trained_synthetic_run

from diffmine import cli, pipeline
from diffmine.clustering import ClusterConfig
from diffmine.features import FeatureConfig
from diffmine.mining import MineConfig
from diffmine import pages, trends
from diffmine.pages import report_links
from diffmine.rundir import Run
from diffmine.synthetic import ORDERED_ELEMENTS, OrderedConfig, generate_ordered
from diffmine.train import TrainConfig
from diffmine.trends import (TrendsConfig, candidate_boxes, element_thresholds, trend_strength, two_group_split,
                             upper_group_cut)
from diffmine.typicality import TypicalityConfig

ORDERED = OrderedConfig(eras=5, per_label=16, size=64, distractors=0, element_scale=1.0, control=80, seed=0)
TRAIN = TrainConfig(steps=600, batch_size=16, checkpoint_every=1000, seed=0)
MINE, CLUSTER = MineConfig(per_image=5, top=1000, least=5, random=5), ClusterConfig(k=6)
ORDER = [f"era{i + 1}" for i in range(ORDERED.eras)]


@pytest.fixture(scope="module")
def ordered(tmp_path_factory):
    root = tmp_path_factory.mktemp("trends")
    run = trained_synthetic_run(root / "run", generate_ordered(root / "data", ORDERED, progress=False), ORDERED.size,
                                TRAIN, TypicalityConfig(samples=8, shard_size=50, seed=0))
    pipeline.mine_step(run, MINE, progress=False)
    pipeline.cluster_step(run, CLUSTER, FeatureConfig(ensemble=2), progress=False)
    result = pipeline.trends_step(run, ORDER, TrendsConfig(), progress=False)
    return root / "data" / "masks", run, result


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The same steps on 32 px scenes and a model trained 20 steps (seconds): for what the document,
    the page and the command show, not for the prevalence (see ``ordered``)."""
    root = tmp_path_factory.mktemp("trends-small")
    config = OrderedConfig(eras=5, per_label=4, size=32, control=4, seed=0)
    run = trained_synthetic_run(root / "run", generate_ordered(root / "data", config, progress=False), config.size,
                                TrainConfig(steps=20, batch_size=8, seed=0), TypicalityConfig(samples=4, seed=0))
    pipeline.mine_step(run, MineConfig(per_image=3, top=100, least=2, random=2), progress=False)
    pipeline.cluster_step(run, ClusterConfig(k=3), FeatureConfig(ensemble=1), progress=False)
    result = pipeline.trends_step(run, ORDER, TrendsConfig(), progress=False)
    return root / "data" / "masks", run, result


def member_kind(masks, member) -> str | None:
    """The planted element a member box lies on (a third of the box or more), if any."""
    image_id, x0, y0, x1, y1 = member
    label, name = image_id.split("/")
    for element in ORDERED_ELEMENTS:
        path = masks / element / label / name
        if path.is_file() and (np.asarray(Image.open(path))[y0:y1, x0:x1] > 0).mean() >= 1 / 3:
            return element
    return None


def purest(masks, result, element: str) -> dict:
    """The element cluster whose members lie most on the planted ``element`` (at least 60%)."""
    scored = []
    for el in result["elements"]:
        kinds = [member_kind(masks, m) for m in el["members"]]
        scored.append((kinds.count(element) / len(kinds), el["size"], el))
    purity, _, best = max(scored, key=lambda s: s[:2])
    assert purity >= 0.6, f"no cluster of the {element} element (best purity {purity:.2f})"
    return best


def test_the_document_has_the_promised_shape(small):
    _, run, result = small
    assert result["order"] == ORDER and len(result["elements"]) >= 2
    on_disk = json.loads((run.path / "trends" / "trends.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    strengths = [abs(el["trend"]) for el in result["elements"]]
    assert strengths == sorted(strengths, reverse=True)
    for el in result["elements"]:
        assert {"id", "label", "size", "prevalence", "typicality", "members"} <= set(el)
        assert len(el["prevalence"]) == len(el["typicality"]) == len(ORDER)
        assert len(el["members"]) == el["size"] and all(len(m) == 5 for m in el["members"])


@pytest.mark.slow
def test_growing_rises_fading_falls_constant_stays_flat(ordered):
    masks, _, result = ordered
    growing, fading, constant = (purest(masks, result, e) for e in ("growing", "fading", "constant"))
    print({e["id"]: e["prevalence"] for e in (growing, fading, constant)})
    # rounded: a rank correlation of exactly 0.9 (one adjacent swap of 5) comes out as 0.8999999999999998
    rho = lambda el: round(float(spearmanr(range(len(ORDER)), el["prevalence"]).statistic), 9)  # noqa: E731
    assert rho(growing) >= 0.9 and np.ptp(growing["prevalence"]) >= 0.4
    assert rho(fading) <= -0.9 and np.ptp(fading["prevalence"]) >= 0.4
    assert np.ptp(constant["prevalence"]) <= 0.25
    assert growing["direction"] == "rising" and fading["direction"] == "falling"


def test_the_page_shows_every_element_with_its_plot(small):
    _, run, result = small
    page = run.path / "report" / "trends.html"
    html = page.read_text()
    assert "base64" not in html
    assert html.count('alt="prevalence over the order"') == len(result["elements"])
    for src in html.split('src="')[1:]:
        assert (page.parent / src.split('"')[0]).is_file()
    assert {"title": "Trends over " + ", ".join(ORDER), "href": "trends.html"} in report_links(run)
    # the page says the rule the trends were made with (it named --threshold members' under split)
    assert run.lineage.get("trends")["settings"]["threshold"] == "split" and "Otsu" in html and "own members" not in html
    assert "the 10th percentile of the element's own members" in pages.threshold_words("members", 10.0)


def test_a_label_with_dollar_signs_is_drawn_as_text_not_mathtext():
    png = pages._plot(["$\\foo$", "a$b", "era3"], [0.1, 0.5, 0.9])  # "$\foo$" is invalid mathtext
    assert png.startswith(b"\x89PNG")


def test_a_page_that_fails_leaves_trends_unrecorded_and_a_missing_page_is_made_again(small, tmp_path, monkeypatch):
    _, run, _ = small
    copy = Run(tmp_path / "run")
    shutil.copytree(run.path, copy.path)
    pages.trends_page_path(copy).unlink()

    def fail(*args, **kwargs):
        raise RuntimeError("page failed")

    monkeypatch.setattr(pages, "write_trends_page", fail)
    with pytest.raises(RuntimeError):
        pipeline.trends_step(copy, ORDER, TrendsConfig(), progress=False, force=True)
    assert copy.lineage.get("trends") is None  # not "up to date" without its page
    monkeypatch.undo()
    pipeline.trends_step(copy, ORDER, TrendsConfig(), progress=False)
    assert pages.trends_page_path(copy).is_file() and copy.lineage.get("trends") is not None
    pages.trends_page_path(copy).unlink()  # a page deleted (or from before this fix) is made again
    pipeline.trends_step(copy, ORDER, TrendsConfig(), progress=False)
    assert pages.trends_page_path(copy).is_file()


def test_settings_that_do_not_change_the_result_keep_the_trends_up_to_date(small, tmp_path, monkeypatch):
    """--chunk (images held at once) never changes the trends, nor --stride for typical boxes or
    --per-image for the grid: none of them makes the stored trends stale; --stride for the grid does."""
    _, run, _ = small
    copy = Run(tmp_path / "run")
    shutil.copytree(run.path, copy.path)
    measured = []
    real = trends.run_trends
    monkeypatch.setattr(trends, "run_trends", lambda *args, **kwargs: measured.append(args[3]) or real(*args, **kwargs))
    pipeline.trends_step(copy, ORDER, TrendsConfig(chunk=2, per_image=2), progress=False)
    assert measured == []
    pipeline.trends_step(copy, ORDER, TrendsConfig(candidates="typical", stride=1), progress=False)
    pipeline.trends_step(copy, ORDER, TrendsConfig(candidates="typical", stride=2, chunk=3), progress=False)
    assert [config.candidates for config in measured] == ["typical"]
    pipeline.trends_step(copy, ORDER, TrendsConfig(stride=1), progress=False)
    assert len(measured) == 2 and measured[-1].stride == 1


def test_cli_prints_json_and_refuses_unknown_labels(small, capsys):
    _, run, result = small
    assert cli.main(["trends", "--run", str(run.path), "--order", ",".join(ORDER), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["elements"] == json.loads(json.dumps(result))["elements"]
    stored = run.lineage.get("trends")
    assert cli.main(["trends", "--run", str(run.path), "--order", "era1,nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert run.lineage.get("trends") == stored  # a refused order leaves the stored result as it was


def test_candidate_boxes_cover_the_image_and_strength_signs():
    boxes = candidate_boxes(32, 30, 6, 3)
    assert boxes[:, 2].max() == 30 and boxes[:, 3].max() == 32 and boxes.min() == 0
    assert trend_strength(np.array([0.1, 0.3, 0.5])) > 0 > trend_strength(np.array([0.9, 0.5, 0.2]))
    assert trend_strength(np.array([0.5, 0.5, 0.5])) == 0.0


def test_upper_group_cut_finds_the_element_above_look_alikes():
    # best matches of images with nothing like the element, with a look-alike, and with it: the
    # ordered set's shape (Otsu's two-group cut falls between the first two)
    rng = np.random.default_rng(0)
    nothing, look_alike, element = rng.normal(0.15, 0.05, 40), rng.normal(0.5, 0.05, 25), rng.normal(0.9, 0.03, 15)
    values = np.concatenate([nothing, look_alike, element])
    assert two_group_split(values) < look_alike.min()
    assert look_alike.max() < upper_group_cut(values) < element.min()
    # two groups stay two: the cut is Otsu's
    low, high = rng.normal(0.2, 0.08, 60), rng.normal(0.9, 0.04, 20)
    assert upper_group_cut(np.concatenate([low, high])) == two_group_split(np.concatenate([low, high]))
    assert low.max() < upper_group_cut(np.concatenate([low, high])) < high.min()
    assert np.isnan(upper_group_cut(np.full(5, 0.3))) and upper_group_cut(np.array([0.2, 0.9])) == pytest.approx(0.55)


def test_two_group_split_parts_two_groups_and_falls_back_without_them():
    rng = np.random.default_rng(0)
    low, high = rng.normal(0.1, 0.05, 70), rng.normal(0.6, 0.05, 30)
    cut = two_group_split(np.concatenate([high, low]))
    assert low.max() < cut < high.min()
    assert two_group_split(np.array([0.2, 0.9])) == pytest.approx(0.55)
    assert np.isnan(two_group_split(np.full(5, 0.3))) and np.isnan(two_group_split(np.array([np.nan, 0.4])))
    # an element without two distinct best matches keeps its members' threshold; NaN rows are unreadable images
    best = np.stack([np.concatenate([low, high]), np.full(100, 0.3)], 1)
    best[0] = np.nan
    split = element_thresholds(best, np.array([0.9, 0.25]), "split")
    assert low.max() < split[0] < high.min() and split[1] == 0.25
    assert element_thresholds(best, np.array([0.9, 0.25]), "members").tolist() == [0.9, 0.25]
    with pytest.raises(ValueError, match="threshold"):
        TrendsConfig(threshold="median")


def test_the_control_label_carries_no_constant_element_and_leaves_the_eras_unchanged(tmp_path):
    config = OrderedConfig(eras=3, per_label=4, size=32, seed=0)
    plain = generate_ordered(tmp_path / "plain", config, progress=False)
    with_control = generate_ordered(tmp_path / "control", OrderedConfig(**{**config.__dict__, "control": 10}),
                                    progress=False)
    for era in ("era1", "era2", "era3"):
        for path in sorted((plain / era).iterdir()):
            assert (with_control / era / path.name).read_bytes() == path.read_bytes()
    assert len(list((with_control / "control").iterdir())) == 10 and not (plain / "control").exists()
    masks = tmp_path / "control" / "masks"
    assert not (masks / "constant" / "control").exists()
    carriers = [len(list((masks / element / "control").iterdir())) for element in ("growing", "fading")]
    assert carriers == [5, 5]


def test_an_image_edited_since_listing_is_named_and_left_out_until_fixed(small, tmp_path, capsys):
    """Its candidate boxes would be described on other pixels: the image is named in one line,
    recorded as a problem of step trends and left out of its label's prevalence; once it is fixed,
    the next trends (no --force) measures it again: the untouched run's document, another result."""
    from conftest import edit_in_place, relisted_copy

    from diffmine.data import CHANGED

    _, run, result = small
    copy, data = relisted_copy(run, tmp_path)
    index = copy.typicality_index()
    edited = index.loc[index["label"] == ORDER[0], "image_id"].iloc[0]
    edit_in_place(data, edited)
    (copy.path / "trends" / "trends.json").unlink()  # made again, now that the image is edited
    capsys.readouterr()
    left_out = pipeline.trends_step(copy, ORDER, TrendsConfig(), progress=False)
    assert capsys.readouterr().out.splitlines().count(f"skipped {data / edited}: {CHANGED}") == 1
    problems = copy.problems()
    assert problems.loc[problems["step"] == "trends", "image_id"].tolist() == [edited]
    assert left_out["images"] == {**result["images"], ORDER[0]: result["images"][ORDER[0]] - 1}
    partial = copy.lineage.get("trends")
    shutil.copy(run.dataset_root / edited, data / edited)  # the listed bytes back
    assert pipeline.trends_step(copy, ORDER, TrendsConfig(), progress=False) == result
    assert "trends" not in set(copy.problems()["step"])
    whole = copy.lineage.get("trends")
    assert partial["left_out"] == 1 and "left_out" not in whole and whole["identity"] != partial["identity"]
