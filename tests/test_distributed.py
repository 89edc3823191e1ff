"""Data-parallel typicality through torch.distributed (2 CPU processes, gloo) equals one process."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from diffmine import pipeline
from diffmine.rundir import Run
from diffmine.synthetic import SynthConfig, generate
from diffmine.train import TrainConfig

SMALL = dict(block_out_channels=(16, 32, 32), cross_attention_dim=16, attention_head_dim=4, prompt_tokens=2)


@pytest.mark.slow
def test_two_processes_give_exactly_the_single_process_maps(tmp_path):
    data = generate(tmp_path / "data", SynthConfig(labels=2, per_label=10, size=32), progress=False)
    single = Run(tmp_path / "single")
    pipeline.prepare(single, data, "A scene from {label}.", "A scene.", 32)
    pipeline.train_step(single, TrainConfig(steps=2, batch_size=4), SMALL, progress=False)
    parallel = Run(tmp_path / "parallel")
    shutil.copytree(single.path, parallel.path)
    # bit-for-bit equality holds at the same BLAS thread count (other counts sum in another order)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    reference = [sys.executable, "-m", "diffmine", "typicality", "--run", str(single.path), "--samples", "3", "--shard-size", "3"]
    assert subprocess.run(reference, capture_output=True, env=env, timeout=300).returncode == 0
    # accelerate's own launcher, as the README documents it (gloo on CPU)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "diffmine", "typicality", "--run", str(parallel.path), "--samples", "3", "--shard-size", "3"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(p.name for p in parallel.typicality_dir.glob("shard-*.parquet"))
    assert shards == sorted(p.name for p in single.typicality_dir.glob("shard-*.parquet"))
    assert len(shards) == 7  # 20 images in shards of 3, split over both processes
    for image_id in single.images()["image_id"]:
        np.testing.assert_array_equal(parallel.typicality_map(image_id), single.typicality_map(image_id))
