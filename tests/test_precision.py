"""Precision per machine: ``auto`` is recorded resolved; bf16 and fp32 mine the same patches where
bf16 is native (skipped elsewhere: emulated bf16 is 8-16x slower and not what auto picks)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from diffmine import cli, machine, pipeline
from diffmine.data import to_model_input
from diffmine.mining import patch_scores
from diffmine.rundir import Run, RunError
from diffmine.synthetic import SynthConfig, generate
from diffmine.typicality import TypicalityConfig, typicality_latent_maps, upsample

SIZE, STEPS = 32, 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A run of 2 labels x 6 images of 32 px: a model trained a few dozen steps, typicality at auto."""
    root = tmp_path_factory.mktemp("precision")
    images = generate(root / "data", SynthConfig(labels=2, per_label=6, size=SIZE, seed=0), progress=False)
    assert cli.main(["--threads", "1", "run", "--data", str(images), "--run", str(root / "run"), "--resolution", str(SIZE),
                     "--steps", str(STEPS), "--batch-size", "8", "--checkpoint-every", str(STEPS), "--samples", "4",
                     "--top", "10", "--least", "2", "--random", "2", "--k", "2", "--feature-ensemble", "1"]) == 0
    return images, Run(root / "run")


def test_auto_is_recorded_resolved_and_a_resume_elsewhere_keeps_the_stored_precision(tiny, monkeypatch, capsys):
    _, run = tiny
    native = machine.resolve_precision("auto", "cpu")
    assert run.lineage.get("typicality")["settings"]["precision"] == native
    assert run.lineage.get("features")["settings"]["precision"] == native
    # the same run on a machine where auto resolves the other way: the stored precision is kept
    other = "fp32" if native == "bf16" else "bf16"
    monkeypatch.setattr(machine, "native_bf16", lambda device="cpu": other == "bf16")
    assert pipeline.typicality_step(run, TypicalityConfig(samples=4), progress=False) == 0
    out = capsys.readouterr().out
    assert f"keeping the stored result's precision {native}" in out and "up to date" in out
    # an explicit other precision is a changed setting of an expensive result
    with pytest.raises(RunError, match="precision"):
        pipeline.typicality_step(run, TypicalityConfig(samples=4, precision=other), progress=False)


def test_contrast_maps_record_auto_resolved_and_a_resume_elsewhere_keeps_it(tiny, tmp_path, monkeypatch, capsys):
    """Contrast maps are resumed like typicality's: on a machine where auto resolves the other way,
    the shards a killed run lacks are computed at the stored precision, never mixed with it."""
    from diffmine.clustering import ClusterConfig
    from diffmine.contrast import ContrastConfig
    from diffmine.features import FeatureConfig
    from diffmine.lineage import contrast_name
    from diffmine.mining import MineConfig

    copy = Run(tmp_path / "copy")
    shutil.copytree(tiny[1].path, copy.path)
    a, b = copy.labels
    native = machine.resolve_precision("auto", "cpu")

    def contrast():
        pipeline.contrast_step(copy, a, b, ContrastConfig(samples=2, shard_size=2), MineConfig(top=4, least=1, random=1),
                               ClusterConfig(k=1), FeatureConfig(ensemble=1), progress=False)
        return copy.lineage.get(contrast_name(a, b))["settings"]["precision"]

    assert contrast() == native
    sorted(copy.contrast_dir(a, b).glob("shard-*.parquet"))[-1].unlink()  # a killed run: its last shard's index
    monkeypatch.setattr(machine, "native_bf16", lambda device="cpu": native == "fp32")
    capsys.readouterr()
    assert contrast() == native
    assert f"keeping the stored result's precision {native}" in capsys.readouterr().out
    record = copy.lineage.get(contrast_name(a, b))  # as an earlier version recorded it: unresolved
    copy.lineage.put(contrast_name(a, b), {**record["settings"], "precision": "auto"}, record["inputs"],
                     record["command"], identity=record["identity"])
    assert contrast() == "auto" and "maps up to date" in capsys.readouterr().out


@pytest.mark.skipif(not machine.native_bf16("cpu"), reason="bf16 is not native on this CPU (no amx_bf16 / avx512_bf16)")
def test_bf16_and_fp32_rank_and_mine_the_same_patches(tiny):
    images, run = tiny
    backend, _ = pipeline.load_model(run, device=torch.device("cpu"))
    paths = sorted(Path(images).glob("*/*.png"))
    pixels = to_model_input(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))
    prompts = [run.prompt(p.parent.name) for p in paths]
    k = 8  # patch side (px)
    scores = {}
    for precision in ("fp32", "bf16"):
        maps = typicality_latent_maps(backend, pixels, prompts, run.prompt(None), TypicalityConfig(samples=8, precision=precision))
        pixel_maps = upsample(maps.numpy(), (SIZE, SIZE))
        scores[precision] = np.concatenate([patch_scores(m, k).ravel() for m in pixel_maps])
    assert not np.array_equal(scores["fp32"], scores["bf16"])  # bf16 did run
    rho = spearmanr(scores["fp32"], scores["bf16"]).statistic
    top = len(scores["fp32"]) // 20  # the top 5% of all patch positions
    best = {p: set(np.argsort(-s)[:top]) for p, s in scores.items()}
    overlap = len(best["fp32"] & best["bf16"]) / top
    print(f"bf16 vs fp32: Spearman rho {rho:.3f}, top-{top} overlap {overlap:.2f}")
    assert rho > 0.95 and overlap > 0.8
