"""evaluate: masks found by image id taken literally, and only fresh clusters and baselines scored."""

import shutil

from diffmine import cli
from diffmine.evaluate import evaluate_run, find_mask
from diffmine.rundir import Run


def test_find_mask_takes_glob_characters_in_an_image_id_literally(tmp_path):
    folder = tmp_path / "fm" / "lab"
    folder.mkdir(parents=True)
    (folder / "a1.png").write_bytes(b"")
    assert find_mask(tmp_path / "fm", "lab/a[12].jpg") is None  # not a1.png: the brackets are a name
    (folder / "a[12].png").write_bytes(b"")
    assert find_mask(tmp_path / "fm", "lab/a[12].jpg") == folder / "a[12].png"
    assert find_mask(tmp_path / "fm", "lab/a1.jpg") == folder / "a1.png"
    assert find_mask(tmp_path / "fm", "lab/a?.jpg") is None


def test_stale_clusters_and_unrecorded_baselines_are_left_out_not_scored(tiny_run, tmp_path, capsys):
    copy = Run(tmp_path / "run")
    shutil.copytree(tiny_run.path, copy.path)
    masks = tiny_run.path.parent / "data" / "masks"
    before = evaluate_run(copy, masks)
    assert before["clusters"] and before["left_out"] == []
    baseline = copy.path / "baselines" / "unrecorded" / "patches.parquet"  # no lineage record: not its result
    baseline.parent.mkdir(parents=True)
    shutil.copy(copy.clusters_path, baseline)
    assert cli.main(["mine", "--run", str(copy.path), "--top", "6", "--least", "2", "--random", "2"]) == 0
    capsys.readouterr()
    assert copy.clusters_path.is_file() and copy.stale("cluster")  # the old clusters are still on disk
    after = evaluate_run(copy, masks)
    assert "clusters" not in after and "baselines" not in after
    assert after["hit_rate"]["top"]["per_label"]  # the fresh mining result is still scored
    cluster_note, baseline_note = after["left_out"]
    # the step to re-run, with the flags the clusters were made with
    assert cluster_note.startswith("cluster left out") and cluster_note.endswith(
        f"re-run `diffmine cluster --feature-ensemble 1 --k 2 --run {copy.path}`")
    assert baseline_note.startswith("baseline-unrecorded left out")
    assert cli.main(["evaluate", "--run", str(copy.path), "--masks", str(masks)]) == 0
    text = capsys.readouterr().out
    assert "summary (clusters" not in text and cluster_note in text
    assert [line.split()[-1] for line in text.splitlines() if line.startswith("overall")] == ["-"]  # no purity
