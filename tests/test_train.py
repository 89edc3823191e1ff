"""Training checkpoints, resumes exactly, and skips bad images."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from diffmine import pipeline
from diffmine.models import load_backend
from diffmine.models.base import read_weights
from diffmine.rundir import Run
from diffmine.synthetic import SynthConfig, generate
from diffmine.train import TrainConfig

SMALL = dict(block_out_channels=(16, 32, 32), cross_attention_dim=16, attention_head_dim=4, prompt_tokens=2)


def _tiny_run(path, images):
    run = Run(path)
    pipeline.prepare(run, images, "A scene from {label}.", "A scene.", 32)
    return run


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("small"), SynthConfig(labels=2, per_label=6, size=32), progress=False)


def test_resumed_training_equals_uninterrupted(small_data, tmp_path):
    straight = _tiny_run(tmp_path / "a", small_data)
    pipeline.train_step(straight, TrainConfig(steps=6, batch_size=4, checkpoint_every=3), SMALL, progress=False)
    resumed = _tiny_run(tmp_path / "b", small_data)
    pipeline.train_step(resumed, TrainConfig(steps=3, batch_size=4, checkpoint_every=3), SMALL, progress=False)
    assert (resumed.model_dir / "checkpoints" / "step-0000003" / "state.json").is_file()
    pipeline.train_step(resumed, TrainConfig(steps=6, batch_size=4, checkpoint_every=3), SMALL, progress=False)
    a = read_weights(straight.model_dir / "trainable.safetensors")
    b = read_weights(resumed.model_dir / "trainable.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # and training changed the weights at all
    fresh = pipeline.new_backend(straight, "tiny", 0, **SMALL).trainable_state()
    assert any(not torch.equal(fresh[k], a[k]) for k in a)


def test_resumed_training_with_gradient_accumulation_equals_uninterrupted(small_data, tmp_path):
    """A checkpoint between two optimizer steps (step 3 of micro-batches accumulated in pairs)."""
    config = dict(batch_size=4, checkpoint_every=3, grad_accumulation=2)
    straight = _tiny_run(tmp_path / "a", small_data)
    pipeline.train_step(straight, TrainConfig(steps=6, **config), SMALL, progress=False)
    resumed = _tiny_run(tmp_path / "b", small_data)
    pipeline.train_step(resumed, TrainConfig(steps=3, **config), SMALL, progress=False)
    pipeline.train_step(resumed, TrainConfig(steps=6, **config), SMALL, progress=False)
    a = read_weights(straight.model_dir / "trainable.safetensors")
    b = read_weights(resumed.model_dir / "trainable.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_saved_model_loads_back_identically(small_data, tmp_path):
    run = _tiny_run(tmp_path / "r", small_data)
    pipeline.train_step(run, TrainConfig(steps=2, batch_size=4), SMALL, progress=False)
    backend = load_backend(run.model_dir)
    x = torch.randn(2, 48, 8, 8)
    states = backend.encode_prompts(["A scene from norland.", "A scene."])
    again = load_backend(run.model_dir)
    with torch.no_grad():
        torch.testing.assert_close(backend.unet(x, torch.tensor([10, 500]), states).sample,
                                   again.unet(x, torch.tensor([10, 500]), again.encode_prompts(["A scene from norland.", "A scene."])).sample)
    with pytest.raises(KeyError, match="no embedding for 'A car.'"):
        backend.encode_prompts(["A car."])


def test_bad_images_are_skipped_and_listed_never_fatal(small_data, tmp_path, capsys):
    import shutil

    from diffmine.typicality import TypicalityConfig

    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    (data / "norland" / "empty.png").write_bytes(b"")
    (data / "sudland" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "sudland" / "notes.txt").write_text("hello")
    Image.new("CMYK", (40, 40)).save(data / "norland" / "cmyk.jpg")  # odd but fine
    run = _tiny_run(tmp_path / "run", data)
    capsys.readouterr()
    pipeline.train_step(run, TrainConfig(steps=3, batch_size=8), SMALL, progress=False)
    pipeline.typicality_step(run, TypicalityConfig(samples=2, shard_size=5), progress=False)
    out = capsys.readouterr().out  # one line per skipped image, from each step that skipped it
    for path in ("norland/empty.png", "sudland/broken.jpg"):
        assert out.count(f"skipped {data / path}: ") == 2, out
    # a step that replaces an expensive result says why: here the model trained on
    pipeline.train_step(run, TrainConfig(steps=4, batch_size=8), SMALL, progress=False)
    pipeline.typicality_step(run, TypicalityConfig(samples=2, shard_size=5), progress=False)
    assert "typicality: replacing the stored result (model changed since typicality was made)" in capsys.readouterr().out
    problems = run.problems()
    from diffmine.query import QueryError, query

    # SQL sees every skipped image, the typicality step's too, and says why a table is absent
    served = query(run, "SELECT DISTINCT image_id, step FROM problems")
    assert sorted(map(tuple, served.to_numpy())) == sorted(set(zip(problems["image_id"], problems["step"])))
    with pytest.raises(QueryError, match="mined table is not served: mine has not been made; re-run `diffmine mine"):
        query(run, "SELECT * FROM mined")
    by_file = dict(zip(problems["image_id"], problems["problem"]))
    assert "empty file" in by_file["norland/empty.png"]
    assert "cannot decode" in by_file["sudland/broken.jpg"]
    assert "extension" in by_file["sudland/notes.txt"]
    assert "norland/cmyk.jpg" not in by_file
    assert run.typicality_map("norland/cmyk.jpg").shape == (32, 32)


def test_augmentations_are_seeded_and_keep_the_shape():
    from diffmine.train import augment

    pixels = torch.rand(4, 3, 16, 16) * 2 - 1
    config = TrainConfig(hflip=True, random_crop=0.25)
    a = augment(pixels.clone(), config, torch.Generator().manual_seed(1))
    b = augment(pixels.clone(), config, torch.Generator().manual_seed(1))
    c = augment(pixels.clone(), config, torch.Generator().manual_seed(2))
    assert a.shape == pixels.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_cached_latents_train_like_encoding_every_step(small_data, tmp_path):
    cached = _tiny_run(tmp_path / "c", small_data)
    pipeline.train_step(cached, TrainConfig(steps=3, batch_size=4, cache_latents=True), SMALL, progress=False)
    plain = _tiny_run(tmp_path / "p", small_data)
    pipeline.train_step(plain, TrainConfig(steps=3, batch_size=4), SMALL, progress=False)
    a = read_weights(cached.model_dir / "trainable.safetensors")
    b = read_weights(plain.model_dir / "trainable.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    with pytest.raises(ValueError, match="cannot be combined"):
        pipeline.train_step(_tiny_run(tmp_path / "x", small_data), TrainConfig(steps=1, cache_latents=True, hflip=True),
                            SMALL, progress=False)


def test_metrics_csv_has_one_row_per_step_and_a_resume_keeps_them_once(small_data, tmp_path):
    import pandas as pd

    straight = _tiny_run(tmp_path / "a", small_data)
    pipeline.train_step(straight, TrainConfig(steps=6, batch_size=4, checkpoint_every=3), SMALL, progress=False)
    full = pd.read_csv(straight.model_dir / "metrics.csv")
    assert list(full.columns) == ["step", "loss", "learning_rate", "images_per_s"]
    assert full["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert (full["loss"] > 0).all() and (full["images_per_s"] > 0).all()
    assert full["learning_rate"].is_monotonic_increasing  # the warm-up
    resumed = _tiny_run(tmp_path / "b", small_data)
    pipeline.train_step(resumed, TrainConfig(steps=3, batch_size=4, checkpoint_every=3), SMALL, progress=False)
    with open(resumed.model_dir / "metrics.csv", "a") as f:  # rows an interrupted run logged after its checkpoint
        f.write("4,9.0,0.1,1.0\n5,9.0,0.1,1.0\n")
    pipeline.train_step(resumed, TrainConfig(steps=6, batch_size=4, checkpoint_every=3), SMALL, progress=False)
    again = pd.read_csv(resumed.model_dir / "metrics.csv")
    assert again["step"].tolist() == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(again["loss"], full["loss"], rtol=1e-6)  # the resumed steps are the same steps
    if importlib.util.find_spec("tensorboard") is not None:  # the optional extra: events through accelerate
        assert list((straight.model_dir / "logs").rglob("events.out.tfevents.*"))


def test_lr_schedule_warms_up_then_decays_to_zero_at_the_last_step():
    from diffmine.train import lr_factor

    constant = TrainConfig(steps=110, warmup_steps=10)
    # the constant schedule is the one before the option existed: min(1, (s + 1) / warmup)
    assert [lr_factor(s, constant) for s in range(110)] == [min(1.0, (s + 1) / 10) for s in range(110)]
    for kind in ("cosine", "linear"):
        config = TrainConfig(steps=110, warmup_steps=10, lr_schedule=kind)
        f = [lr_factor(s, config) for s in range(110)]
        assert f[:10] == [(s + 1) / 10 for s in range(10)]  # the same warm-up
        assert all(a >= b for a, b in zip(f[9:], f[10:]))  # then never rises
        assert 0 < f[-1] < 0.02  # the last step still learns, a little
        assert f[60] == pytest.approx(0.5, abs=0.01)  # half-way through the decay
    assert lr_factor(30, TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine")) == pytest.approx(
        0.5 * (1 + np.cos(np.pi * 21 / 101)))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_min_snr_weights():
    from diffmine.train import snr_weights

    snr = torch.tensor([0.25, 1.0, 5.0, 20.0, 1000.0])
    alphas = snr / (1 + snr)  # SNR = a / (1 - a)
    torch.testing.assert_close(snr_weights(alphas, 5.0), torch.tensor([1.0, 1.0, 1.0, 0.25, 0.005]))
    assert torch.equal(snr_weights(alphas, 0.0), torch.ones(5))
    with pytest.raises(ValueError, match="snr_gamma"):
        TrainConfig(snr_gamma=-1)


def test_recipe_options_train_deterministically_resume_exactly_and_are_recorded(small_data, tmp_path):
    import shutil

    import pandas as pd

    from diffmine.models.tiny import TinyBackend
    from diffmine.train import lr_factor, train

    recipe = dict(batch_size=4, checkpoint_every=3, warmup_steps=2, lr_schedule="cosine", snr_gamma=5.0)
    config = TrainConfig(steps=6, **recipe)
    straight = _tiny_run(tmp_path / "a", small_data)
    pipeline.train_step(straight, config, SMALL, progress=False)
    # an interrupted run: trained to its step-3 checkpoint (of 6 asked: the decay is over --steps), then resumed
    resumed = _tiny_run(tmp_path / "b", small_data)
    pipeline.train_step(resumed, config, SMALL, progress=False)
    shutil.rmtree(resumed.model_dir / "checkpoints" / "step-0000006")
    train(resumed, pipeline.new_backend(resumed, "tiny", 0, **SMALL), config, progress=False)
    a = read_weights(straight.model_dir / "trainable.safetensors")
    b = read_weights(resumed.model_dir / "trainable.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    rates = pd.read_csv(straight.model_dir / "metrics.csv")["learning_rate"].to_numpy()
    np.testing.assert_allclose(rates, [TinyBackend.default_learning_rate * lr_factor(s, config) for s in range(6)])
    assert rates[1] == rates.max() and rates[-1] < rates[2]
    # the options change the model; the record names them, and leaves them out at their old values
    plain = _tiny_run(tmp_path / "p", small_data)
    pipeline.train_step(plain, TrainConfig(steps=6, batch_size=4, checkpoint_every=3, warmup_steps=2), SMALL, progress=False)
    p = read_weights(plain.model_dir / "trainable.safetensors")
    assert any(not torch.equal(a[k], p[k]) for k in a)
    recorded = straight.lineage.get("model")["settings"]
    assert recorded["lr_schedule"] == "cosine" and recorded["snr_gamma"] == 5.0
    assert "lr_schedule" not in plain.lineage.get("model")["settings"]
    assert "snr_gamma" not in plain.lineage.get("model")["settings"]


def test_interrupted_training_is_resumed_not_cleared_by_fewer_steps(small_data, tmp_path, capsys):
    """An interrupted training (record incomplete) reached its last checkpoint, not the steps it
    asked for: asking fewer than that is refused without --force (it would discard the
    checkpoints), asking at least that resumes from it."""
    run = _tiny_run(tmp_path / "r", small_data)
    pipeline.train_step(run, TrainConfig(steps=3, batch_size=4, checkpoint_every=3), SMALL, progress=False)
    record = run.lineage.get("model")  # as if a 100-step training had been killed after its step-3 checkpoint
    run.lineage.put("model", record["settings"], record["inputs"], "train", identity="(training)",
                    complete=False, steps=100)
    checkpoint = run.model_dir / "checkpoints" / "step-0000003"
    with pytest.raises(pipeline.RunError, match="reached step 3.*--force"):
        pipeline.train_step(run, TrainConfig(steps=2, batch_size=4, checkpoint_every=3), SMALL, progress=False)
    assert (checkpoint / "state.json").is_file()
    capsys.readouterr()
    pipeline.train_step(run, TrainConfig(steps=5, batch_size=4, checkpoint_every=3), SMALL, progress=False)
    assert "resuming from" in capsys.readouterr().out and (checkpoint / "state.json").is_file()
    assert run.lineage.get("model")["complete"] and run.lineage.get("model")["steps"] == 5
    pipeline.train_step(run, TrainConfig(steps=2, batch_size=4, checkpoint_every=3), SMALL, progress=False,
                        force=True)  # with --force: a new model of 2 steps
    assert run.lineage.get("model")["steps"] == 2 and not checkpoint.exists()
