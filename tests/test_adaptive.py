"""The adaptive estimator: nested draws, the refinement rule, determinism, resume, the draws column."""

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from diffmine import adaptive, mining, pipeline
from diffmine.adaptive import AdaptiveConfig, draws_summary, refine, schedule
from diffmine.mining import MineConfig
from diffmine.rundir import Run
from diffmine.typicality import TypicalityConfig, draw_noise, draw_units

from conftest import barely_trained_run

CONFIG = TypicalityConfig(samples=16, shard_size=4, estimator="adaptive")
# a budget of 8 mean draws binds below the cap of 16: the tests below cover the budgeted rounds
TARGETS = AdaptiveConfig(top=1, per_image=1, significance=False, first_draws=4, bound=1.0, bound_out=1.0, budget=8.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    """12 images of 2 labels at 32 px and a tiny model trained 2 steps: the numbers only need to match."""
    return barely_trained_run(tmp_path_factory.mktemp("adaptive"), per_label=6)


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory) -> Run:
    """The adaptive typicality, computed uninterrupted."""
    run = Run(tmp_path_factory.mktemp("reference") / "run")
    shutil.copytree(trained.path, run.path)
    pipeline.typicality_step(run, CONFIG, progress=False, adaptive=TARGETS)
    return run


def copy_of(run: Run, path) -> Run:
    shutil.copytree(run.path, path, ignore=shutil.ignore_patterns("typicality"))
    return Run(path)


def assert_same_maps(a: Run, b: Run) -> None:
    ia, ib = a.typicality_index(), b.typicality_index()
    assert ia["draws"].tolist() == ib["draws"].tolist() and ia["status"].tolist() == ib["status"].tolist()
    for image_id in ia.loc[ia["status"] == "ok", "image_id"]:
        np.testing.assert_array_equal(a.latent_typicality_map(image_id), b.latent_typicality_map(image_id))


def test_nested_draws_every_prefix_is_stratified_antithetic():
    t, noise = draw_noise(0, 32, (4, 4, 4), 1000, 0.1, 0.7, "adaptive")
    assert t.min() >= 100 and t.max() < 700
    for n in (2, 4, 8, 16, 32):  # one draw in each of n equal strata
        assert sorted(((t[:n] - 100) * n // 600).tolist()) == list(range(n))
    assert torch.equal(noise[1::2], -noise[0::2])
    # a prefix does not depend on the cap; the seed and shape do change the draws
    t8, noise8 = draw_noise(0, 8, (4, 4, 4), 1000, 0.1, 0.7, "adaptive")
    assert torch.equal(t8, t[:8]) and torch.equal(noise8, noise[:8])
    assert not torch.equal(draw_noise(1, 8, (4, 4, 4), 1000, 0.1, 0.7, "adaptive")[1], noise8)
    assert draw_units(noise[None, :6, 0], "adaptive").shape == (1, 3, 4, 4)  # antithetic pairs
    assert schedule(4, 64) == [4, 8, 16, 32, 64] and schedule(4, 100) == [4, 8, 16, 32, 64, 100]


def test_refine_gives_draws_to_the_images_whose_patches_can_still_change_the_top():
    rows = [  # (image, label, draws, candidate scores, their standard errors)
        ("a-best", "a", 4, [10.0], [0.1]),     # in, clearly above the best left out (5): decided
        ("a-edge", "a", 4, [5.0, 0.0], [0.1, 0.1]),  # out, but 5 + 2 x 0.1 reaches the worst in (4.9)
        ("a-in", "a", 4, [4.9], [0.1]),        # in, but 4.9 - 0.2 is below the best left out (5): undecided
        ("a-low", "a", 4, [1.0], [0.1]),       # out, far below: decided
        ("a-capped", "a", 64, [4.95], [0.1]),  # would be undecided, but at the cap
        ("b-weak", "b", 4, [1.0], [1.0]),      # not significant yet (z = 1); z = 4 at 16 x the draws
        ("b-negative", "b", 4, [-5.0], [0.1]),  # can never pass the significance filter
        ("b-sure", "b", 4, [10.0], [1.0]),     # in (fewer candidates than top): decided
    ]
    latest = pd.DataFrame(rows, columns=["image_id", "label", "draws", "cand_s", "cand_se"]).assign(status="ok")
    config = AdaptiveConfig(top=3, bound=2.0, bound_out=2.0, budget=0)
    active = set(latest["image_id"])
    assert refine(latest, active, config, 64) == {"a-edge", "a-in", "b-weak"}
    assert refine(latest, active - {"a-in"}, config, 64) == {"a-edge", "b-weak"}  # final images stay final
    # without the significance filter, b's two images are in (top 3 of 3): decided
    assert refine(latest, active, AdaptiveConfig(top=3, significance=False, bound=2.0, bound_out=2.0), 64) == {"a-edge", "a-in"}


def test_refine_bounds_in_and_out_apart_and_spends_a_budget_most_uncertain_first():
    rows = [  # top 1 of label a; every se 1 (the floor too: the same spread everywhere)
        ("x1", "a", 4, [5.0], [1.0]),  # in; bar: the best left out, 4.5 (|gap| / se = 0.5)
        ("x2", "a", 4, [4.5], [1.0]),  # out; bar: the worst in, 5.0 (0.5)
        ("x3", "a", 4, [4.0], [1.0]),  # out (1.0)
        ("x4", "a", 4, [0.0], [1.0]),  # out (5.0): decided at any bound used here
    ]
    latest = pd.DataFrame(rows, columns=["image_id", "label", "draws", "cand_s", "cand_se"]).assign(status="ok")
    active = set(latest["image_id"])
    both = AdaptiveConfig(top=1, significance=False, bound=2.0, bound_out=2.0, tight_bound=2.0, tight_bound_out=2.0)
    assert refine(latest, active, both, 64) == {"x1", "x2", "x3"}
    # a narrower bound out: x3 (4 + 0.5 < 5) is decided, x2 (4.5 + 0.5 reaches 5) is not
    assert refine(latest, active, AdaptiveConfig(top=1, significance=False, bound=2.0, bound_out=0.5), 64) == {"x1", "x2"}
    # a narrower bound in: x1 (5 - 0.4 >= 4.5) is decided
    assert refine(latest, active, AdaptiveConfig(top=1, significance=False, bound=0.4, bound_out=2.0), 64) == {"x2", "x3"}
    # a budget: each refined image costs its next 4 draws; the closest to their bar first, ties by id
    assert refine(latest, active, both, 64, budget_left=100) == {"x1", "x2", "x3"}
    assert refine(latest, active, both, 64, budget_left=8) == {"x1", "x2"}
    assert refine(latest, active, both, 64, budget_left=7) == {"x1"}
    assert refine(latest, active, both, 64, budget_left=3) == set()
    # the wide bounds while their images' next draws (12) take at most half the budget left, else
    # the tight ones: at a tight bound out of 0.5, x3 is decided
    tight_out = AdaptiveConfig(top=1, significance=False, bound=2.0, bound_out=2.0, tight_bound=2.0, tight_bound_out=0.5)
    assert refine(latest, active, tight_out, 64, budget_left=24) == {"x1", "x2", "x3"}
    assert refine(latest, active, tight_out, 64, budget_left=23) == {"x1", "x2"}
    with pytest.raises(ValueError, match="budget"):
        AdaptiveConfig(first_draws=8, budget=6)


def test_adaptive_is_deterministic_and_records_its_draws(trained, reference, tmp_path, capsys):
    index = reference.typicality_index()
    assert set(index["draws"]) <= set(schedule(4, 16)) and index["draws"].min() == 4 and index["draws"].max() > 4
    assert index["draws"].mean() <= TARGETS.budget  # the budget holds
    assert not (reference.typicality_dir / adaptive.WORK).exists()  # the work folder is gone
    assert reference.step_config("typicality")["adaptive"]["top"] == 1  # the targets are the result's settings
    # `diffmine status` says where the draws went
    from diffmine.status import status
    stopped = ", ".join(f"{n}: {c}" for n, c in index["draws"].value_counts().sort_index().items())
    assert f"draws per image: {index['draws'].mean():.2f} on average; images at {stopped}; per label " in status(reference)
    assert len(stopped.split(", ")) >= 2  # some images stopped early, some went on
    again = copy_of(trained, tmp_path / "again")
    pipeline.typicality_step(again, CONFIG, progress=False, adaptive=TARGETS)
    assert_same_maps(reference, again)
    # the units of each image's draws are stored beside its map: mining's standard errors
    from diffmine.shards import read_array
    r = index.iloc[0]
    units = read_array(reference.typicality_dir, r["shard"], f"{r['key']}/units").astype(np.float32)
    assert len(units) == r["draws"] // 2
    np.testing.assert_allclose(units.mean(0), reference.latent_typicality_map(r["image_id"]), atol=2e-3)
    patches = pipeline.mine_step(again, MineConfig(top=3, per_image=2, least=1, random=1), progress=False)
    assert (patches["kind"] == "top").any() or (patches["kind"] == "rejected").any()
    assert "--top 3 (typicality targeted 1)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="flip needs the same draws on every image"):  # some images have 4 units
        pipeline.mine_step(again, MineConfig(top=3, per_image=2, least=1, random=1, significance_test="flip"))
    assert again.mined_patches().equals(patches[patches["kind"] == "top"].reset_index(drop=True))  # kept as it was
    # the report says so too: the summary above the labels and a mean-draws column
    from diffmine.report import write_report
    page = write_report(again).read_text()
    assert 'id="adaptive"' in page and f"draws per image {draws_summary(again.typicality_index())}" in page
    assert "mean draws" in page
    plain_run = copy_of(trained, tmp_path / "plain")
    pipeline.typicality_step(plain_run, TypicalityConfig(samples=4, shard_size=4), progress=False)
    pipeline.mine_step(plain_run, MineConfig(top=3, per_image=2, least=1, random=1), progress=False)
    plain = write_report(plain_run).read_text()
    assert 'id="adaptive"' not in plain and "mean draws" not in plain


def test_a_map_computed_under_another_label_takes_the_images_own_draws(reference, tmp_path):
    """localize scores a box of another label on a map computed there: in an adaptive run it
    averages the same nested draws as the image's stored map, not the cap's."""
    from diffmine.localize import computed_latent_maps, localize

    index = reference.typicality_index()
    image = index[index["draws"] < CONFIG.samples].iloc[0]  # an image that stopped before the cap
    backend = pipeline.scoring_model(reference)
    stored = reference.latent_typicality_map(image["image_id"])
    again = computed_latent_maps(reference, backend, image["path"], [image["label"]], int(image["draws"]))[0]
    assert np.abs(again - stored).max() <= 1e-3 * max(1.0, np.abs(stored).max()) + 1e-4
    capped = computed_latent_maps(reference, backend, image["path"], [image["label"]])[0]  # the cap's 16 draws
    assert np.abs(capped - stored).max() > 1e-3 * max(1.0, np.abs(stored).max()) + 1e-4
    other = next(label for label in reference.labels if label != image["label"])
    path = tmp_path / "multi.csv"
    path.write_text(f"image,label,x0,y0,x1,y1\n{image['image_id']},{other},2,2,20,20\n")
    results, computed, _ = localize(reference, path)
    expected = computed_latent_maps(reference, backend, image["path"], [other], int(image["draws"]))[0]
    np.testing.assert_allclose(computed[results["key"].iloc[0]], expected, atol=1e-5)


def killed(run: Run, monkeypatch, target: str, dies) -> list[tuple]:
    """Run the adaptive typicality until ``adaptive.<target>`` (``_round_shard``, ``_final_shard``) is
    called with arguments that ``dies(args, calls so far)`` accepts: there the run is killed. Returns
    the arguments of the calls made before; ``target`` is itself again after."""
    real = getattr(adaptive, target)
    calls = []

    def maybe_dies(*args, **kwargs):
        if dies(args, calls):
            raise KeyboardInterrupt
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(adaptive, target, maybe_dies)
    with pytest.raises(KeyboardInterrupt):
        pipeline.typicality_step(run, CONFIG, progress=False, adaptive=TARGETS)
    monkeypatch.setattr(adaptive, target, real)
    assert (run.typicality_dir / adaptive.WORK / "plan.json").is_file()
    return calls


def in_round(r: int):
    """Killed at round ``r``'s first shard (args[5] of ``_round_shard`` is the round)."""
    return lambda args, calls: args[5] == r


def after_calls(n: int):
    return lambda args, calls: len(calls) == n


@pytest.mark.parametrize("where", ["round", "final"])
def test_a_killed_adaptive_run_resumes_to_the_same_maps(trained, reference, tmp_path, monkeypatch, where):
    run = copy_of(trained, tmp_path / "killed")
    # round: killed at round 1's first shard (round 0 written); final: after one final shard
    killed(run, monkeypatch, *(("_round_shard", in_round(1)) if where == "round" else ("_final_shard", after_calls(1))))
    pipeline.typicality_step(run, CONFIG, progress=False, adaptive=TARGETS)
    assert_same_maps(reference, run)
    assert not (run.typicality_dir / adaptive.WORK).exists()


@pytest.mark.parametrize("where", ["round 0", "round 1", "final"])
def test_status_says_how_far_the_rounds_of_a_killed_adaptive_run_got(trained, tmp_path, monkeypatch, where):
    """Killed in round 0 (one of its 3 shards written), in round 1 (one of its shards written) or
    while the final maps are written (one of 3): status says where it resumes, from the files."""
    from diffmine.status import status

    run = copy_of(trained, tmp_path / "killed")
    if where == "final":
        killed(run, monkeypatch, "_final_shard", after_calls(1))
        expected = "every round done, final maps of 1/3 shards written; resumes there"
    elif where == "round 0":
        calls = killed(run, monkeypatch, "_round_shard", after_calls(1))
        expected = f"round 0 of rounds 0-2 (4 draws per image), {len(calls[0][8])} of the 12 planned images done; resumes there"
    else:  # killed at round 1's second shard: every image went through round 0, one shard of round 1 is written
        calls = killed(run, monkeypatch, "_round_shard", lambda args, calls: args[5] == 1 and calls[-1][5] == 1)
        (n,) = [len(args[8]) for args in calls if args[5] == 1]  # the images of round 1's one shard written
        expected = (f"round 1 of rounds 0-2 (8 draws per image), {n} image{'s' * (n != 1)} refined so far, "
                    "of at most 12 still undecided")
    assert f"\n  adaptive rounds: {expected}" in status(run)
    pipeline.typicality_step(run, CONFIG, progress=False, adaptive=TARGETS)
    assert "adaptive rounds" not in status(run)


@pytest.mark.parametrize("change", ["nothing", "an image added"])
def test_listing_again_keeps_the_finished_rounds_of_an_interrupted_run(trained, reference, tmp_path, monkeypatch,
                                                                       change):
    """`diffmine prepare` again under an interrupted adaptive typicality: no planned image is scored
    again (its plan stands while its images are listed as they were), their maps are the
    uninterrupted run's, and an added image is planned after them."""
    run = copy_of(trained, tmp_path / "killed")
    real = adaptive._round_shard
    computed = []  # (round, images) of each round shard computed after the new listing
    killed(run, monkeypatch, "_round_shard", in_round(1))  # round 0 written, killed in round 1
    data = run.dataset_root
    if change == "an image added":
        data = tmp_path / "data"
        shutil.copytree(run.dataset_root, data)
        shutil.copy(next((data / "sudland").glob("*.png")), data / "norland" / "img_9999.png")
    pipeline.prepare(run, data, "A scene from {label}.", "A scene.", 32)
    monkeypatch.setattr(adaptive, "_round_shard", lambda *a, **kw: computed.append((a[5], len(a[8]))) or real(*a, **kw))
    pipeline.typicality_step(run, CONFIG, progress=False, adaptive=TARGETS)
    assert sum(n for r, n in computed if r == 0) == (1 if change == "an image added" else 0)
    old = reference.typicality_index().set_index("image_id")
    index = run.typicality_index().set_index("image_id")
    assert len(index) == len(run.images()) and index.loc[old.index, "draws"].tolist() == old["draws"].tolist()
    for image_id in old.index:
        np.testing.assert_array_equal(run.latent_typicality_map(image_id), reference.latent_typicality_map(image_id))


def test_new_images_are_scored_adaptively_beside_the_final_ones(trained, reference, tmp_path, monkeypatch):
    """An incremental run plans only the new images; the old maps stay bit for bit, and the old
    images' candidates come from the candidates tables, not from their maps."""
    k = reference.step_config("typicality")["adaptive"]["patch"] or mining.default_patch_size(32, 32)
    tables = sorted((reference.typicality_dir / adaptive.CANDIDATES).glob("shard-*.parquet"))
    assert [t.stem for t in tables] == [s.stem for s in reference.typicality_shards()]
    old = reference.typicality_index()
    from_tables = adaptive._final_candidates(reference, set(), k, TARGETS.per_image, CONFIG.samples)
    assert len(from_tables) == len(old) and from_tables["draws"].tolist() == old["draws"].tolist()
    run = Run(tmp_path / "incremental")
    shutil.copytree(reference.path, run.path)
    shutil.rmtree(run.typicality_dir / adaptive.CANDIDATES)  # a run made before the tables: from the maps
    from_maps = adaptive._final_candidates(run, set(), k, TARGETS.per_image, CONFIG.samples)
    for a, b in zip(from_tables.itertuples(), from_maps.itertuples()):  # the same, up to the maps' float16
        np.testing.assert_allclose(a.cand_s, b.cand_s, rtol=1e-2, atol=1e-4)
    shutil.copytree(reference.typicality_dir / adaptive.CANDIDATES, run.typicality_dir / adaptive.CANDIDATES)
    data = tmp_path / "data"
    shutil.copytree(reference.dataset_root, data)
    shutil.copy(next((data / "sudland").glob("*.png")), data / "norland" / "img_9999.png")
    pipeline.prepare(run, data, "A scene from {label}.", "A scene.", 32)
    opened = []
    real_candidates = adaptive.candidates
    monkeypatch.setattr(adaptive, "candidates", lambda *a, **kw: opened.append(1) or real_candidates(*a, **kw))
    pipeline.typicality_step(run, CONFIG, progress=False, adaptive=TARGETS)
    assert 1 <= len(opened) <= len(adaptive.schedule(TARGETS.first_draws, CONFIG.samples))  # the new image's rounds only
    index = run.typicality_index()
    assert len(index) == 13 and index["draws"].min() >= 4
    for image_id in reference.typicality_index()["image_id"]:
        np.testing.assert_array_equal(run.latent_typicality_map(image_id), reference.latent_typicality_map(image_id))


def test_contrast_and_classify_refuse_the_adaptive_estimator():
    from diffmine.classify import ClassifyConfig
    from diffmine.contrast import ContrastConfig

    for cls in (ContrastConfig, ClassifyConfig):
        with pytest.raises(ValueError, match="adaptive"):
            cls(estimator="adaptive")
    with pytest.raises(ValueError, match="even"):
        TypicalityConfig(samples=15, estimator="adaptive")


@pytest.mark.parametrize("relisted", [True, False])
@pytest.mark.parametrize("round", [1, 2])
def test_an_image_edited_under_an_interrupted_adaptive_run_redoes_only_what_it_changes(trained, tmp_path, monkeypatch,
                                                                                      relisted, round):
    """Killed in round 1 or 2 (of 0-2), then one image edited (listed anew, or not): the resumed run
    scores round 0 again only for the edited image's shard, and ends with the maps an uninterrupted
    run makes on the final files (the edited image's own map, or its problem when it was not listed anew)."""
    from conftest import edit_in_place

    data = tmp_path / "data"
    shutil.copytree(trained.dataset_root, data)
    run, uninterrupted = copy_of(trained, tmp_path / "killed"), copy_of(trained, tmp_path / "uninterrupted")
    for each in (run, uninterrupted):
        pipeline.prepare(each, data, "A scene from {label}.", "A scene.", 32)
    killed(run, monkeypatch, "_round_shard", in_round(round))  # the rounds before written
    # the image with round 0's best candidate, made black: the bars of later rounds move
    first = adaptive._round_rows(run.typicality_dir / adaptive.WORK, 0)
    edited = first.loc[first["cand_s"].map(max).idxmax(), "image_id"]
    place = run.images()["image_id"].tolist().index(edited)
    shard = run.images()["image_id"].iloc[place // 4 * 4:place // 4 * 4 + 4].tolist()  # 3 shards of 4, in listing order
    edit_in_place(data, edited)
    if relisted:
        from diffmine.status import status

        for each in (run, uninterrupted):
            pipeline.prepare(each, data, "A scene from {label}.", "A scene.", 32)
        assert ("\n  adaptive rounds: 1 image listed anew since the rounds were planned; the next run scores their shards "
                "again from round 0 and keeps the other shards' rounds") in status(run)
    real = adaptive._round_shard
    computed = {"uninterrupted": [], "resumed": []}  # (round, images) of each round shard computed

    def scored(which: str) -> list[tuple]:
        monkeypatch.setattr(adaptive, "_round_shard", lambda *a, **kw: computed[which].append(
            (a[5], tuple(a[8]["image_id"]))) or real(*a, **kw))
        pipeline.typicality_step(run if which == "resumed" else uninterrupted, CONFIG, progress=False, adaptive=TARGETS)
        return computed[which]

    full, resumed = scored("uninterrupted"), scored("resumed")
    assert [images for r, images in resumed if r == 0] == [tuple(shard)]
    assert set(resumed) < set(full)  # the other shards' rounds were kept
    assert_same_maps(uninterrupted, run)
    index = run.typicality_index().set_index("image_id")
    assert (index.loc[edited, "status"] == "ok") == relisted
