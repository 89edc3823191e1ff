"""Shared fixtures: one tiny model trained once per session on the built-in dataset."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from diffmine import pipeline  # noqa: E402
from diffmine.clustering import ClusterConfig  # noqa: E402
from diffmine.features import FeatureConfig  # noqa: E402
from diffmine.mining import MineConfig  # noqa: E402
from diffmine.rundir import Run  # noqa: E402
from diffmine.synthetic import SynthConfig, generate  # noqa: E402
from diffmine.train import TrainConfig  # noqa: E402
from diffmine.typicality import TypicalityConfig  # noqa: E402

# Small enough for CI (about four and a half minutes on 2 cores). Measured with this exact config
# (training is deterministic): overall AUC-PR 0.33 vs 0.028 random; the ring (0.61) and checker
# (0.55) elements are learned well, the cross (0.12) and triangle (0.05) only begin to be.
SYNTH = SynthConfig(labels=4, per_label=40, size=64, seed=0)
TRAIN = TrainConfig(steps=400, batch_size=32, checkpoint_every=200, seed=0)
TYPICALITY = TypicalityConfig(samples=12, shard_size=50, seed=0)


def trained_synthetic_run(path, images, size: int, train: TrainConfig, typicality: TypicalityConfig | None = None) -> Run:
    """A run at ``path`` of a synthetic dataset, listed with the scene prompts and trained (and
    its typicality computed when ``typicality`` is given)."""
    run = Run(path)
    pipeline.prepare(run, images, "A scene from {label}.", "A scene.", size)
    pipeline.train_step(run, train, progress=False)
    if typicality is not None:
        pipeline.typicality_step(run, typicality, progress=False)
    return run


def barely_trained_run(out, per_label: int) -> Run:
    """``out``/trained: 2 labels x ``per_label`` synthetic images of 32 px and a small tiny model
    trained 2 steps (seconds), for tests whose numbers only need to match each other."""
    data = generate(out / "data", SynthConfig(labels=2, per_label=per_label, size=32), progress=False)
    run = Run(out / "trained")
    pipeline.prepare(run, data, "A scene from {label}.", "A scene.", 32)
    small = dict(block_out_channels=(16, 32, 32), cross_attention_dim=16, attention_head_dim=4, prompt_tokens=2)
    pipeline.train_step(run, TrainConfig(steps=2, batch_size=4), small, progress=False)
    return run


def run_files(path) -> dict[str, bytes]:
    """Every file of a run and its bytes, the step locks aside (taking a lock is no change): equal
    before and after a refused command, which must leave the run as it was."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and ".locks" not in p.parts}


def relisted_copy(run: Run, out) -> tuple:
    """``out``/run and ``out``/data: copies of a finished run and of its dataset, the copy listed
    from the copied data (the same listing: its results stay up to date), for tests that edit an image."""
    import shutil

    copy, data = Run(out / "run"), out / "data"
    shutil.copytree(run.path, copy.path)
    shutil.copytree(run.dataset_root, data)
    pipeline.prepare(copy, data, "A scene from {label}.", "A scene.", run.step_config("dataset")["resolution"])
    assert not copy.stale("cluster")
    return copy, data


def edit_in_place(data, image_id: str) -> None:
    """Overwrite image ``image_id`` of the dataset folder ``data`` with other pixels (same path and size)."""
    import numpy as np
    from PIL import Image

    with Image.open(data / image_id) as image:
        size = image.size
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(data / image_id)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return generate(out, SYNTH, progress=False), out / "masks"


@pytest.fixture(scope="session")
def trained_run(synthetic_data, tmp_path_factory):
    """A run through every step: train, typicality, mine, cluster."""
    images, _ = synthetic_data
    run = trained_synthetic_run(tmp_path_factory.mktemp("run") / "run", images, SYNTH.size, TRAIN, TYPICALITY)
    pipeline.mine_step(run, MineConfig(top=60, least=20, random=20), progress=False)
    pipeline.cluster_step(run, ClusterConfig(k=6), FeatureConfig(ensemble=2), progress=False)
    return run


TINY_ARGS = ["--steps", "4", "--batch-size", "4", "--checkpoint-every", "2", "--samples", "2",
             "--typicality-shard-size", "4", "--top", "10", "--least", "2", "--random", "2", "--k", "2",
             "--feature-ensemble", "1"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny run with its report (2 labels x 6 images of 32 px, 4 training steps, K = 2;
    seconds): for what the report and the exports show, not for the quality of the maps."""
    from diffmine import cli

    root = tmp_path_factory.mktemp("tiny")
    images = generate(root / "data", SynthConfig(labels=2, per_label=6, size=32, seed=0), progress=False)
    assert cli.main(["run", "--data", str(images), "--run", str(root / "run"), "--resolution", "32",
                     "--prompt", "A scene from {label}.", "--null-prompt", "A scene.", *TINY_ARGS]) == 0
    return Run(root / "run")
