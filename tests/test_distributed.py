"""Data-parallel steps through torch.distributed (2 CPU processes, gloo) equal one process."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from diffmine import pipeline
from diffmine.mining import MineConfig
from diffmine.rundir import Run
from diffmine.typicality import TypicalityConfig

from conftest import barely_trained_run

# bit-for-bit equality holds at the same BLAS thread count (other counts sum in another order)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Run:
    """20 images of 2 labels and a tiny model trained 2 steps: the numbers only need to match."""
    return barely_trained_run(tmp_path_factory.mktemp("distributed"), per_label=10)


def _single_and_torchrun(command: list[str], single: Run, parallel: Run) -> None:
    """``diffmine COMMAND --run single ...`` in one process, then in 2 under torchrun into ``parallel``;
    both must succeed."""
    # torchrun; "--" ends its own options, else it reads diffmine's --run as an abbreviated --run-path
    for launcher, run in (([sys.executable, "-m"], single),
                          ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "--"], parallel)):
        result = subprocess.run([*launcher, "diffmine", command[0], "--run", str(run.path), *command[1:]],
                                capture_output=True, text=True, env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]


def _copies(run: Run, directory) -> tuple[Run, Run]:
    single, parallel = Run(directory / "single"), Run(directory / "parallel")
    shutil.copytree(run.path, single.path)
    shutil.copytree(run.path, parallel.path)
    return single, parallel


def test_two_processes_give_exactly_the_single_process_maps(trained, tmp_path):
    single, parallel = _copies(trained, tmp_path)
    reference = [sys.executable, "-m", "diffmine", "typicality", "--run", str(single.path), "--samples", "3", "--shard-size", "3"]
    assert subprocess.run(reference, capture_output=True, env=ENV, timeout=300).returncode == 0
    # accelerate's own launcher, as the README documents it (gloo on CPU)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "diffmine", "typicality", "--run", str(parallel.path), "--samples", "3", "--shard-size", "3"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"all processes: \d/7 shards", result.stderr)  # process 0's overall count
    shards = sorted(p.name for p in parallel.typicality_dir.glob("shard-*.parquet"))
    assert shards == sorted(p.name for p in single.typicality_dir.glob("shard-*.parquet"))
    assert len(shards) == 7  # 20 images in shards of 3, split over both processes
    for image_id in single.images()["image_id"]:
        np.testing.assert_array_equal(parallel.typicality_map(image_id), single.typicality_map(image_id))


def test_two_processes_give_exactly_the_single_process_adaptive_maps(trained, tmp_path):
    """The adaptive estimator's rounds: shards of each round dealt to both processes, the images to
    refine decided by each from the files on disk; the same draws and maps as one process."""
    single, parallel = _copies(trained, tmp_path)
    _single_and_torchrun(["typicality", "--samples", "16", "--estimator", "adaptive", "--shard-size", "3",
                          "--adaptive-top", "1", "--adaptive-per-image", "1", "--no-adaptive-significance",
                          "--adaptive-first-draws", "4", "--adaptive-bound", "1", "--adaptive-bound-out", "1",
                          "--adaptive-budget", "8"], single, parallel)
    draws = single.typicality_index()["draws"]
    assert draws.min() == 4 and draws.max() > 4 and draws.mean() <= 8  # some images refined, within the budget
    assert parallel.typicality_index()["draws"].tolist() == draws.tolist()
    for image_id in single.images()["image_id"]:
        np.testing.assert_array_equal(parallel.latent_typicality_map(image_id), single.latent_typicality_map(image_id))


def test_two_processes_give_exactly_the_single_process_features(trained, tmp_path):
    # typicality and mining here, once: both runs cluster the same mined patches
    mined = Run(tmp_path / "mined")
    shutil.copytree(trained.path, mined.path)
    pipeline.typicality_step(mined, TypicalityConfig(samples=2, shard_size=20), progress=False)
    pipeline.mine_step(mined, MineConfig(per_image=2, top=20, least=2, random=2), progress=False)
    single, parallel = _copies(mined, tmp_path)
    # batches of 3 images: 7 blocks dealt round-robin, the last one short
    _single_and_torchrun(["cluster", "--k", "3", "--feature-ensemble", "2", "--feature-batch-size", "3"], single, parallel)
    features = np.load(single.features_path)
    assert features.shape == (40, 32) and np.abs(features).sum(1).min() > 0  # every patch has a feature
    np.testing.assert_array_equal(np.load(parallel.features_path), features)
    assert [p.name for p in parallel.features_path.parent.iterdir()] == ["features.npy"]  # parts gathered, removed
    pd.testing.assert_frame_equal(pd.read_parquet(parallel.clusters_path), pd.read_parquet(single.clusters_path))


def test_a_single_process_rerun_removes_the_parts_a_killed_data_parallel_run_left(trained, tmp_path):
    """torchrun killed after one process wrote its part: the features made again by one process
    leave no part behind, and status no longer reports parts still to gather."""
    from diffmine.clustering import ClusterConfig
    from diffmine.features import FeatureConfig
    from diffmine.status import status

    run = Run(tmp_path / "run")
    shutil.copytree(trained.path, run.path)
    pipeline.typicality_step(run, TypicalityConfig(samples=2, shard_size=20), progress=False)
    pipeline.mine_step(run, MineConfig(per_image=2, top=20, least=2, random=2), progress=False)
    run.features_path.parent.mkdir(parents=True)
    np.savez(run.features_path.parent / "part-00001-of-00002.npz", rows=np.arange(3), features=np.ones((3, 32), np.float32))
    assert "1/2 processes' parts written" in status(run)
    pipeline.cluster_step(run, ClusterConfig(k=3), FeatureConfig(ensemble=1), progress=False)
    assert [p.name for p in run.features_path.parent.iterdir()] == ["features.npy"]
    assert "parts written" not in status(run)


def test_the_gathered_features_keep_the_images_a_process_could_not_read(tmp_path):
    """A process's part carries the images it skipped: process 0 names them all, and their patches
    (a process whose images were all bad knows no feature width) have no feature, NaN, not zero."""
    from diffmine.data import Problem
    from diffmine.features import _gather_parts, _part_path, _save_part

    bad = Problem("b/1.png", "/data/b/1.png", "cannot decode image")
    _save_part(_part_path(tmp_path, 0, 2), np.array([0, 2]), np.ones((2, 4), np.float32), [])
    _save_part(_part_path(tmp_path, 1, 2), np.array([1]), np.zeros((1, 0), np.float32), [bad])
    features, skipped = _gather_parts(tmp_path, 2, 3)
    assert skipped == [bad] and not list(tmp_path.iterdir())
    assert np.isnan(features[1]).all() and (features[[0, 2]] == 1).all()


def test_training_launched_as_several_cpu_processes_is_refused_before_writing(tmp_path, capsys, monkeypatch):
    """accelerate distributes training over GPUs only: under torchrun on CPU every process trained
    the whole model again, all of them writing the same model folder."""
    from diffmine import cli
    from diffmine.synthetic import SynthConfig, generate

    images = generate(tmp_path / "data", SynthConfig(labels=2, per_label=2, size=32), progress=False)
    assert cli.main(["prepare", "--data", str(images), "--run", str(tmp_path / "run"), "--resolution", "32"]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli.main(["train", "--run", str(tmp_path / "run"), "--steps", "2"]) == 2
    assert "launched as 2 processes on CPU" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists() and "model" not in Run(tmp_path / "run").lineage.records()
