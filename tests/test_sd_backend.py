"""The Stable Diffusion backend through the real pipeline, on a tiny random-weight SD folder.

No download: the pipeline (unet/, vae/, text_encoder/, tokenizer/, scheduler/) is built here with
random weights in the SD layout (tests/sd_fixtures.py), at 32 px with latent factor 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from sd_fixtures import build_sd_folder  # noqa: E402

from diffmine.clustering import ClusterConfig  # noqa: E402
from diffmine.features import FeatureConfig  # noqa: E402
from diffmine.mining import MineConfig  # noqa: E402
from diffmine.models import ModelError, create_backend, load_backend  # noqa: E402
from diffmine.models.base import WEIGHTS_FILE, read_weights  # noqa: E402
from diffmine.pipeline import cluster_step, mine_step, prepare, train_step, typicality_step  # noqa: E402
from diffmine.report import write_report  # noqa: E402
from diffmine.rundir import Run  # noqa: E402
from diffmine.synthetic import SynthConfig, generate  # noqa: E402
from diffmine.train import TrainConfig  # noqa: E402
from diffmine.typicality import TypicalityConfig  # noqa: E402

RES = 32
TYP = TypicalityConfig(samples=2, batch_size=16, shard_size=4)


@pytest.fixture(scope="session", autouse=True)
def _offline():
    import huggingface_hub.constants as constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    yield
    constants.HF_HUB_OFFLINE = old


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory) -> Path:
    return build_sd_folder(tmp_path_factory.mktemp("sd") / "tiny-sd", "tiny")


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth"), SynthConfig(labels=2, per_label=4, size=RES), progress=False)


def _prepare(path: Path, data: Path, sd_folder: Path) -> Run:
    run = Run(path)
    prepare(run, data, "An image of {label}.", "An image.", RES, model=f"sd:{sd_folder}")
    return run


def _downstream(run: Run) -> None:
    mine_step(run, MineConfig(patch=8, per_image=2, top=20, least=4, random=4), progress=False)
    cluster_step(run, ClusterConfig(k=2), FeatureConfig(ensemble=1, batch_size=8), progress=False)


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory, data, sd_folder) -> dict:
    """Full finetune, 4 steps then resumed to 6, then every later step."""
    run = _prepare(tmp_path_factory.mktemp("runs") / "full", data, sd_folder)
    train_step(run, TrainConfig(steps=4, batch_size=4, checkpoint_every=2), progress=False)
    after_four = sorted(p.name for p in (run.model_dir / "checkpoints").iterdir())
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        train_step(run, TrainConfig(steps=6, batch_size=4, checkpoint_every=2), progress=False)
    after_six = sorted(p.name for p in (run.model_dir / "checkpoints").iterdir())
    typicality_step(run, TYP, progress=False)
    _downstream(run)
    report = write_report(run)
    return {"run": run, "after_four": after_four, "after_six": after_six, "log": log.getvalue(), "report": report}


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, data, sd_folder) -> Run:
    """The same data scored with the pretrained model, no training."""
    run = _prepare(tmp_path_factory.mktemp("runs") / "pretrained", data, sd_folder)
    typicality_step(run, TYP, model=f"sd:{sd_folder}", progress=False)
    mine_step(run, MineConfig(patch=8, per_image=2, top=20, least=4, random=4), progress=False)
    return run


# -- the backend itself -----------------------------------------------------------------------


def test_backend_parts_and_spec(sd_folder):
    backend = create_backend(f"sd:{sd_folder}", [])
    assert backend.latent_factor == 2 and backend.default_feature_block == 1
    assert backend.default_learning_rate == pytest.approx(1e-5)
    assert backend.spec == {"kind": "sd", "base": str(sd_folder.resolve()), "lora_rank": 0, "text_encoder": None}
    pixels = torch.rand(2, 3, RES, RES) * 2 - 1
    latents = backend.encode_images(pixels)
    assert latents.shape == (2, 4, RES // 2, RES // 2) and latents.dtype == torch.float32
    assert torch.equal(latents, backend.encode_images(pixels)), "encoding must be deterministic (posterior mean)"
    assert backend.decode_latents(latents).shape == pixels.shape
    states = backend.encode_prompts(["An image of a.", "An image.", "An image of a."])
    assert states.shape == (3, 77, 32)
    assert torch.equal(states[0], states[2]) and not torch.equal(states[0], states[1])
    # VAE and text encoder frozen, the whole UNet trainable
    assert not any(p.requires_grad for p in backend.vae.parameters())
    assert not any(p.requires_grad for p in backend.denoiser.prompt_encoder.parameters())
    assert all(p.requires_grad for p in backend.unet.parameters())
    assert set(backend.trainable_state()) == {f"unet.{n}" for n, _ in backend.unet.named_parameters()}


def test_prompt_cache_serves_training_after_inference(sd_folder):
    backend = create_backend(f"sd:{sd_folder}", [], lora_rank=2)
    with torch.inference_mode():
        backend.encode_prompts(["An image."])  # cached while in inference mode
    latents = torch.randn(1, 4, 16, 16)
    out = backend.denoiser(latents, torch.tensor([100]), ["An image."])
    out.pow(2).mean().backward()  # must not fail on an inference tensor


# -- errors -------------------------------------------------------------------------------------


def test_missing_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such model folder"):
        create_backend(f"sd:{tmp_path / 'nowhere'}", [])


def test_folder_without_unet_is_a_model_error(tmp_path, sd_folder):
    broken = tmp_path / "broken"
    broken.mkdir()
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (broken / sub).symlink_to(sd_folder / sub)
    with pytest.raises(ModelError, match=r"no unet/ subfolder") as info:
        create_backend(f"sd:{broken}", [])
    assert str(broken) in str(info.value)


def test_corrupt_weights_and_unknown_options_are_model_errors(tmp_path, sd_folder):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sd_folder, copy)
    for f in (copy / "unet").glob("diffusion_pytorch_model*"):
        f.write_bytes(b"not weights")
    with pytest.raises(ModelError, match=r"unet: cannot load the UNet"):
        create_backend(f"sd:{copy}", [])
    with pytest.raises(ModelError, match="unknown option"):
        create_backend(f"sd:{sd_folder}", [], block_out_channels=(8,))
    with pytest.raises(ModelError, match="no such model folder"):
        create_backend(f"sd:{sd_folder}", [], text_encoder=str(tmp_path / "nowhere"))


# -- the pipeline -------------------------------------------------------------------------------


def test_finetune_checkpoints_and_resumes(finetuned):
    assert finetuned["after_four"] == ["step-0000002", "step-0000004"]
    assert "resuming from" in finetuned["log"] and "step 4" in finetuned["log"]
    assert finetuned["after_six"] == ["step-0000004", "step-0000006"]
    run = finetuned["run"]
    assert (run.model_dir / "backend.json").is_file() and (run.model_dir / WEIGHTS_FILE).is_file()


def test_finetuned_run_typicality_mining_clusters_report(finetuned):
    run = finetuned["run"]
    index = run.typicality_index()
    assert len(index) == 8 and (index["status"] == "ok").all()
    latent = run.latent_typicality_map(index["image_id"][0])
    assert latent.shape == (RES // 2, RES // 2)
    full = run.typicality_map(index["image_id"][0])
    assert full.shape == (RES, RES) and full.dtype == np.float32 and np.isfinite(full).all()
    top = run.patches("top")
    assert len(top) and set(top["label"]) == set(run.labels)
    assert {"cluster", "cluster_rank", "rank_in_cluster"} <= set(top.columns)
    assert finetuned["report"].is_file() and "<html" in finetuned["report"].read_text().lower()


def test_loaded_full_model_matches_its_weights(finetuned, sd_folder):
    run = finetuned["run"]
    backend = load_backend(run.model_dir)
    saved = read_weights(run.model_dir / WEIGHTS_FILE)
    state = backend.trainable_state()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    base = create_backend(f"sd:{sd_folder}", [])
    assert any(not torch.equal(state[k], base.trainable_state()[k]) for k in saved), "training changed nothing"


def test_typicality_with_the_pretrained_model(pretrained):
    index = pretrained.typicality_index()
    assert len(index) == 8 and (index["status"] == "ok").all()
    assert pretrained.typicality_map(index["image_id"][3]).shape == (RES, RES)
    assert pretrained.config["typicality"]["model"].startswith("sd:")


def test_an_outside_folder_is_named_by_its_files_not_its_path(tmp_path, data, sd_folder, monkeypatch, capsys):
    """`typicality --model sd:FOLDER`: the record names the folder's files (a fingerprint) and keeps
    where it was read (absolute, though given relative) outside the identity. A copy of the run on
    a machine that keeps the folder elsewhere is the same model once typicality is given the new
    path: nothing is recomputed, and the later steps read the model from there."""
    from diffmine.pipeline import LOCAL, scoring_model
    from diffmine.rundir import RunError

    shutil.copytree(sd_folder, tmp_path / "models" / "sd")
    run = _prepare(tmp_path / "run", data, sd_folder)
    monkeypatch.chdir(tmp_path / "models")
    typicality_step(run, TYP, model="sd:sd", progress=False)
    record = run.lineage.get("typicality")
    assert record["settings"]["model"] == f"sd:{LOCAL}"
    assert record["location"] == {"base": str(tmp_path / "models" / "sd")}
    mine_step(run, MineConfig(patch=8, per_image=2, top=20, least=4, random=4), progress=False)

    copy = Run(tmp_path / "copy")
    shutil.copytree(run.path, copy.path)
    (tmp_path / "models" / "sd").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunError, match=r"moved|missing.*--model sd:FOLDER"):
        scoring_model(copy)
    from diffmine.status import status
    assert f"its model folder {tmp_path / 'models' / 'sd'} is missing" in status(copy)
    capsys.readouterr()
    shards = {p.name: p.stat().st_mtime_ns for p in copy.typicality_dir.rglob("*") if p.is_file()}
    assert typicality_step(copy, TYP, model=f"sd:{tmp_path / 'moved'}", progress=False) == 0
    assert "now read from" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in copy.typicality_dir.rglob("*") if p.is_file()} == shards
    assert copy.lineage.get("typicality")["identity"] == record["identity"] and copy.stale("mine") == []
    assert scoring_model(copy).spec["base"] == str(tmp_path / "moved")
    assert f"scored with the model in {tmp_path / 'moved'}" in status(copy)

    # other files at that path are another model: the later steps refuse it, and typicality replaces
    # its maps only with --force (a wrong path must not throw hours of maps away)
    shutil.rmtree(tmp_path / "moved")
    build_sd_folder(tmp_path / "moved", "tiny", seed=1)
    with pytest.raises(RunError, match="not the files typicality used"):
        scoring_model(copy)
    with pytest.raises(RunError, match="external_model changed.*--force"):
        typicality_step(copy, TYP, model=f"sd:{tmp_path / 'moved'}", progress=False)
    assert copy.lineage.get("typicality")["identity"] == record["identity"]
    typicality_step(copy, TYP, model=f"sd:{tmp_path / 'moved'}", progress=False, force=True)
    assert "replacing the stored result" in capsys.readouterr().out
    assert copy.lineage.get("typicality")["identity"] != record["identity"] and copy.stale("mine")


def test_an_outside_text_encoder_folder_is_named_by_its_files_too(tmp_path, data, sd_folder):
    from diffmine.pipeline import LOCAL, scoring_model

    run = _prepare(tmp_path / "run", data, sd_folder)
    typicality_step(run, TYP, model=f"sd:{sd_folder}", model_options={"text_encoder": str(sd_folder)}, progress=False)
    record = run.lineage.get("typicality")
    assert record["settings"]["model_options"] == {"text_encoder": LOCAL}
    assert record["location"] == {"base": str(sd_folder.resolve()), "text_encoder": str(sd_folder.resolve())}
    assert scoring_model(run).spec["text_encoder"] == str(sd_folder.resolve())


def test_a_hub_model_with_an_outside_text_encoder_folder_is_read_from_that_folder(tmp_path, data, sd_folder,
                                                                                monkeypatch):
    """`typicality --model sd:HUB_ID --text-encoder FOLDER`: the later steps load the hub model with
    the text encoder from where the record says (they were given the record's placeholder, "local
    folder", as a folder), and a copy whose text encoder folder moved is pointed to its new place."""
    from diffmine import pipeline
    from diffmine.status import status

    real = pipeline.create_backend

    def from_hub(model, prompts, seed=0, **options):  # offline: sd:org/tiny-sd is the tiny folder, loaded as a hub id
        if model != "sd:org/tiny-sd":
            return real(model, prompts, seed=seed, **options)
        backend = real(f"sd:{sd_folder}", prompts, seed=seed, **options)
        backend.unfingerprinted.pop("base_fingerprint")  # a hub id's files are not fingerprinted
        return backend

    monkeypatch.setattr(pipeline, "create_backend", from_hub)
    shutil.copytree(sd_folder, tmp_path / "clip")
    run = _prepare(tmp_path / "run", data, sd_folder)
    typicality_step(run, TYP, model="sd:org/tiny-sd", model_options={"text_encoder": str(tmp_path / "clip")},
                    progress=False)
    assert run.lineage.get("typicality")["location"] == {"text_encoder": str(tmp_path / "clip")}
    assert pipeline.scoring_model(run).spec["text_encoder"] == str(tmp_path / "clip")
    assert f"scored with the model in {tmp_path / 'clip'}" in status(run)

    (tmp_path / "clip").rename(tmp_path / "moved")
    assert "--model sd:org/tiny-sd --text-encoder TEXT_ENCODER_FOLDER" in status(run)
    assert typicality_step(run, TYP, model="sd:org/tiny-sd", model_options={"text_encoder": str(tmp_path / "moved")},
                           progress=False) == 0
    assert pipeline.scoring_model(run).spec["text_encoder"] == str(tmp_path / "moved")


def test_a_run_scored_before_outside_folders_were_fingerprinted_stays_up_to_date(tmp_path, data, sd_folder):
    """Its record named the folder by path: the same path and options are still the same model."""
    from diffmine.lineage import digest
    from diffmine.pipeline import scoring_model

    run = _prepare(tmp_path / "run", data, sd_folder)
    model = f"sd:{sd_folder.resolve()}"
    typicality_step(run, TYP, model=model, progress=False)
    record = run.lineage.get("typicality")
    settings = {**record["settings"], "model": model, "model_options": {}}
    run.lineage.put("typicality", settings, {**record["inputs"], "external_model": digest({"model": model, "options": {}})},
                    "typicality", width_multiple=record["width_multiple"])
    assert typicality_step(run, TYP, model=model, progress=False) == 0
    assert run.lineage.get("typicality")["settings"]["model"] == model
    assert scoring_model(run).spec["base"] == str(sd_folder.resolve())


def test_lora_trains_only_adapters_and_round_trips(tmp_path, data, sd_folder):
    run = _prepare(tmp_path / "lora", data, sd_folder)
    train_step(run, TrainConfig(steps=2, batch_size=4, checkpoint_every=2, warmup_steps=1), model_options={"lora_rank": 4},
               progress=False)
    saved = read_weights(run.model_dir / WEIGHTS_FILE)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    full_size = sum(f.stat().st_size for f in (sd_folder / "unet").glob("*.safetensors"))
    assert (run.model_dir / WEIGHTS_FILE).stat().st_size < full_size / 10
    assert any(v.abs().max() > 0 for k, v in saved.items() if ".lora_B." in k), "LoRA B still zero: no training"

    backend = load_backend(run.model_dir)
    assert backend.spec["lora_rank"] == 4 and backend.default_learning_rate == pytest.approx(1e-4)
    trainable = [n for n, p in backend.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(torch.equal(backend.trainable_state()[k], saved[k]) for k in saved)
    # save and load again: identical outputs
    backend.save(tmp_path / "copy")
    again = load_backend(tmp_path / "copy")
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([150, 600])
    prompts = [run.prompt(run.labels[0]), run.prompt(None)]
    with torch.no_grad():
        assert torch.equal(backend.denoiser.eval()(latents, t, prompts), again.denoiser.eval()(latents, t, prompts))
    # and the whole pipeline runs on the LoRA model
    typicality_step(run, TYP, progress=False)
    assert run.typicality_map(run.images()["image_id"][0]).shape == (RES, RES)


# -- compare ------------------------------------------------------------------------------------


def test_compare_finetuned_against_pretrained(finetuned, pretrained, tmp_path, sd_folder):
    import argparse

    from diffmine.compare import add_parser, cmd_compare, compare_runs

    page = compare_runs(finetuned["run"], pretrained, tmp_path / "cmp.html")
    html = page.read_text()
    assert html.count("data:image/png;base64,") >= 2 * 8  # maps of both runs and patches
    for label in finetuned["run"].labels:
        assert label in html
    assert "Mean typicality per label" in html
    # which model scored each run: the finetuned one, and the folder given to `typicality --model`
    assert "(trained in this run)" in html and html.count(f"sd:{sd_folder.resolve()}") >= 2

    root = argparse.ArgumentParser()
    add_parser(root.add_subparsers(dest="command"))
    args = root.parse_args(["compare", "--run", str(finetuned["run"].path), "--run", str(pretrained.path)])
    with contextlib.redirect_stdout(io.StringIO()):
        path = cmd_compare(args)
    assert path == finetuned["run"].path / "compare" / f"vs-{pretrained.path.name}.html" and path.is_file()


def test_applications_run_on_stable_diffusion(finetuned, tmp_path):
    """Translation (PnP hooks find SD's up-block resnets and self-attention), co-typicality and
    classification go through the same code on the SD backend."""
    from diffmine.classify import ClassifyConfig, run_classify
    from diffmine.cotypicality import CotypicalityConfig
    from diffmine.pipeline import cotypicality_step, load_model, translate_step
    from diffmine.translate import SourceInjection, TranslateConfig

    run = Run(tmp_path / "run")
    shutil.copytree(finetuned["run"].path, run.path)
    backend, _ = load_model(run)
    injection = SourceInjection(backend.unet, 1, 1, [1, 2, 3])
    assert len(injection.handles) > 1 and injection.attention_layers > 0
    injection.remove()
    translate_step(run, TranslateConfig(images=2, steps=4, shard_size=2), progress=False)
    index = run.translations_index()
    assert len(index) == 2 * 2 and (index["status"] == "ok").all()
    image = run.translation(index["image_id"][0], index["target_label"][0])
    assert image.shape == (RES, RES, 3) and image.dtype == np.uint8
    sequences = cotypicality_step(run, CotypicalityConfig(top=6, per_tuple=2, patch=8, umap_dim=2, k=2, samples=2),
                                  FeatureConfig(ensemble=1), progress=False)
    assert len(sequences) == 6 and {"cotypicality", "cluster_rank"} <= set(sequences.columns)
    summary = run_classify(run, backend, ClassifyConfig(per_label=2, samples=2), progress=False)
    assert summary["images"] == 4 and np.sum(summary["confusion"]) == 4


# -- the base model's fingerprint -----------------------------------------------------------------


def test_a_trained_model_records_its_local_base_fingerprint(tmp_path, sd_folder):
    from diffmine.models.sd import base_subfolders, fingerprint

    create_backend(f"sd:{sd_folder}", [], lora_rank=2).save(tmp_path / "model")
    spec = json.loads((tmp_path / "model" / "backend.json").read_text())
    assert spec["base_fingerprint"] == fingerprint(sd_folder, base_subfolders(False))
    load_backend(tmp_path / "model").save(tmp_path / "again")  # a loaded model keeps its spec, to the byte
    assert (tmp_path / "again" / "backend.json").read_bytes() == (tmp_path / "model" / "backend.json").read_bytes()


def test_the_fingerprint_reads_only_what_is_loaded(tmp_path, sd_folder, monkeypatch):
    import diffmine.models.sd as sd
    from diffmine.lineage import file_digest

    parts = sd.base_subfolders(False)
    copy = Path(shutil.copytree(sd_folder, tmp_path / "copy"))
    expected = sd.fingerprint(sd_folder, parts)
    (copy / "safety_checker").mkdir()
    (copy / "safety_checker" / "model.safetensors").write_bytes(b"unused" * 1000)
    (copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded: the safetensors file is")
    (copy / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"a variant, not loaded")
    (copy / "README.md").write_text("a model card")
    read = []
    monkeypatch.setattr(sd, "file_digest", lambda path: read.append(Path(path).relative_to(copy).as_posix()) or file_digest(path))
    assert sd.fingerprint(copy, parts) == expected  # same files, another path, unused ones beside
    assert "unet/diffusion_pytorch_model.safetensors" in read and "scheduler/scheduler_config.json" in read
    assert not [p for p in read if p.startswith("safety_checker") or p.endswith((".bin", ".fp16.safetensors", ".md"))]
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("0.012", "0.02"))
    assert sd.fingerprint(copy, parts) != expected


# -- a copied run, its base model elsewhere -----------------------------------------------------


def _cli(*args) -> tuple[int, str]:
    """(exit code, stderr) of `diffmine --threads 1 ARGS...`."""
    from diffmine.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--threads", "1", *map(str, args)])
    return code, err.getvalue()


@pytest.fixture(scope="session")
def moved(tmp_path_factory, data, sd_folder) -> dict:
    """A LoRA run trained on base folder A, with its typicality; then the run copied and A moved to B."""
    root = tmp_path_factory.mktemp("moved")
    base = Path(shutil.copytree(sd_folder, root / "A"))
    run = _prepare(root / "run", data, base)
    train_step(run, TrainConfig(steps=2, batch_size=4, checkpoint_every=2, warmup_steps=1), model_options={"lora_rank": 4},
               progress=False)
    typicality_step(run, TYP, progress=False)
    copy = Run(root / "copy")
    shutil.copytree(run.path, copy.path)
    base.rename(root / "B")
    return {"run": run, "copy": copy, "A": base, "B": root / "B"}


def test_a_copied_run_relocated_to_its_base_scores_the_same(moved, tmp_path):
    from diffmine.models import LOCATION_FILE
    from diffmine.models.sd import base_subfolders, fingerprint
    from diffmine.pipeline import model_digest
    from diffmine.status import status

    original, copy, base = moved["run"], moved["copy"], moved["B"]
    spec_file = copy.model_dir / "backend.json"
    spec_bytes, identity = spec_file.read_bytes(), copy.lineage.get("model")["identity"]
    assert json.loads(spec_bytes)["base_fingerprint"] == fingerprint(base, base_subfolders(False))
    # A is gone: a step that needs the model stops with one line naming backend.json, A and the mend
    code, err = _cli("typicality", "--run", copy.path)
    assert code == 2 and err.count("\n") == 1
    assert str(spec_file) in err and f"folder {moved['A']} is missing" in err
    assert f"`diffmine relocate --run {copy.path} --sd-base FOLDER`" in err
    # another SD folder of the same architecture (other random weights) is refused, naming both folders
    other = build_sd_folder(tmp_path / "other", "tiny", seed=1)
    code, err = _cli("relocate", "--run", copy.path, "--sd-base", other, "--force")
    assert code == 2 and err.count("\n") == 1 and str(other) in err and str(moved["A"]) in err
    assert not (copy.model_dir / LOCATION_FILE).exists()
    # the moved base is accepted; the model and its identity are untouched
    code, err = _cli("relocate", "--run", copy.path, "--sd-base", base)
    assert code == 0, err
    assert spec_file.read_bytes() == spec_bytes and model_digest(copy.model_dir) == identity
    assert f"base model: loaded from {base} (relocated from {moved['A']})" in status(copy)
    # typicality made again on the copy is the original's, bit for bit, under the same identity
    copy.lineage.drop("typicality")
    shutil.rmtree(copy.typicality_dir)
    typicality_step(copy, TYP, progress=False)
    assert copy.lineage.get("typicality")["identity"] == original.lineage.get("typicality")["identity"]
    for image_id in original.images()["image_id"]:
        assert np.array_equal(copy.latent_typicality_map(image_id), original.latent_typicality_map(image_id))
    mine_step(copy, MineConfig(patch=8, per_image=2, top=20, least=4, random=4), progress=False)
    assert copy.stale("typicality") == [] and copy.stale("mine") == []
    # and it trains on from its checkpoint, reading the base where it is now
    train_step(copy, TrainConfig(steps=3, batch_size=4, checkpoint_every=2, warmup_steps=1),
               model_options={"lora_rank": 4}, progress=False)
    assert copy.lineage.get("model")["steps"] == 3 and copy.stale("model") == []
    assert json.loads(spec_file.read_text())["base"] == str(base) and "relocated from" not in status(copy)


def test_training_on_refuses_a_received_location_inside_the_run_leaving_its_model_recorded(moved, tmp_path):
    """A received run's base-location.json naming a folder inside it: training on from the
    checkpoint is refused before the model's record is marked as training, so the trained model
    stays the run's (not "no trained model yet", and never trained again from scratch)."""
    from conftest import run_files

    from diffmine.models import LOCATION_FILE

    received = Run(tmp_path / "received")
    shutil.copytree(moved["copy"].path, received.path)
    inside = Path(shutil.copytree(moved["B"], received.path / "base"))
    (received.model_dir / LOCATION_FILE).write_text(json.dumps({"base": str(inside), "unverified": []}))
    before, record = run_files(received.path), received.lineage.get("model")
    with pytest.raises(ModelError, match=f"names the model folder {re.escape(str(inside))}, inside the run"):
        train_step(received, TrainConfig(steps=record["steps"] + 1, batch_size=4, checkpoint_every=2, warmup_steps=1),
                   model_options={"lora_rank": 4}, progress=False)
    assert received.lineage.get("model") == record and record["complete"]
    assert run_files(received.path) == before


def test_relocate_writing_into_the_run_is_a_write_clean_waits_for(moved, tmp_path, monkeypatch):
    """relocate writes base-location.json into the run outside any step: it holds a lock while it does."""
    from diffmine import relocate
    from diffmine.leftovers import running_steps

    copy = Run(tmp_path / "copy")
    shutil.copytree(moved["copy"].path, copy.path)
    seen, write_json = [], relocate.write_json
    monkeypatch.setattr(relocate, "write_json", lambda path, value: seen.append(running_steps(copy)) or write_json(path, value))
    assert _cli("relocate", "--run", copy.path, "--sd-base", moved["B"]) == (0, "")
    assert seen == [["relocate"]]
    # and it reads what it rewrites under that lock: a second relocate at once is refused, not lost
    from diffmine.lineage import step_lock
    with step_lock(copy.path, "relocate"):
        code, err = _cli("relocate", "--run", copy.path, "--text-encoder", moved["B"])
    assert code == 2 and "another diffmine process is running relocate" in err


@pytest.mark.parametrize("flag", ["--sd-base", "--text-encoder"])
def test_relocate_refuses_a_folder_inside_the_run_leaving_it_as_it_was(tmp_path, sd_folder, flag):
    """It accepted one, same files and all, into base-location.json, which every later step then
    refused to load (``models.recorded_source``): refused up front, with the steps' own line."""
    from conftest import run_files

    run = tmp_path / "run"
    create_backend(f"sd:{sd_folder}", [], lora_rank=2, text_encoder=str(sd_folder)).save(run / "model")
    inside = Path(shutil.copytree(sd_folder, run / "base"))
    before = run_files(run)
    code, err = _cli("relocate", "--run", run, flag, inside)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{flag}: names the model folder {inside}, inside the run" in err and "keep that folder outside" in err
    assert run_files(run) == before


@pytest.mark.parametrize("flag", ["--model", "--text-encoder"])
@pytest.mark.parametrize("listed", [False, True], ids=["new run", "listed run"])
def test_train_refuses_a_model_folder_inside_the_run_before_listing(tmp_path, data, sd_folder, flag, listed):
    """It wrote images.parquet and lineage.json (the listing, and an incomplete model record) before
    refusing: a refused train leaves the run as it was, a new one holding only that folder."""
    from conftest import run_files

    run = tmp_path / "run"
    if listed:
        _prepare(run, data, sd_folder)
    inside = Path(shutil.copytree(sd_folder, run / "base"))
    before = run_files(run)
    model = inside if flag == "--model" else sd_folder
    code, err = _cli("train", "--data", data, "--run", run, "--model", f"sd:{model}", "--resolution", RES,
                     "--steps", "2", "--batch-size", "4", "--prompt", "An image of {label}.", "--null-prompt",
                     "An image.", "--force", *((flag, inside) if flag == "--text-encoder" else ()))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{flag}: names the model folder {inside}, inside the run" in err
    assert run_files(run) == before
    assert listed or [p.name for p in run.iterdir()] == ["base"]


def test_relocating_a_run_trained_before_fingerprints_needs_force(moved, tmp_path):
    """Its backend.json (no fingerprint) keeps its bytes: relocated unverified only with --force."""
    from diffmine.models import LOCATION_FILE, relocations

    old = Run(tmp_path / "old")
    shutil.copytree(moved["copy"].path, old.path)
    (old.model_dir / LOCATION_FILE).unlink(missing_ok=True)
    spec = json.loads((old.model_dir / "backend.json").read_text())
    del spec["base_fingerprint"]
    (old.model_dir / "backend.json").write_text(json.dumps(spec, indent=2) + "\n")  # as diffmine 0.x wrote it
    spec_bytes = (old.model_dir / "backend.json").read_bytes()
    code, err = _cli("relocate", "--run", old.path, "--sd-base", moved["B"])
    assert code == 2 and err.count("\n") == 1 and "cannot be verified" in err and "--force" in err
    assert not (old.model_dir / LOCATION_FILE).exists()
    code, err = _cli("relocate", "--run", old.path, "--sd-base", moved["B"], "--force")
    assert code == 0, err
    assert relocations(old.model_dir) == {"base": str(moved["B"]), "unverified": ["base"]}
    backend = load_backend(old.model_dir)  # from B; its spec, saved again, is the old one to the byte
    backend.save(tmp_path / "again")
    assert (old.model_dir / "backend.json").read_bytes() == spec_bytes == (tmp_path / "again" / "backend.json").read_bytes()


def test_a_separate_text_encoder_is_fingerprinted_and_relocated(tmp_path, sd_folder):
    from diffmine.models.sd import encoder_subfolders, fingerprint

    base = Path(shutil.copytree(sd_folder, tmp_path / "A"))
    create_backend(f"sd:{base}", [], lora_rank=2, text_encoder=str(base)).save(tmp_path / "run" / "model")
    spec = json.loads((tmp_path / "run" / "model" / "backend.json").read_text())
    assert spec["text_encoder_fingerprint"] == fingerprint(base, encoder_subfolders(base))
    base.rename(tmp_path / "B")
    with pytest.raises(ModelError, match="--sd-base FOLDER"):
        load_backend(tmp_path / "run" / "model")
    assert _cli("relocate", "--run", tmp_path / "run", "--sd-base", tmp_path / "B")[0] == 0
    with pytest.raises(ModelError, match=r"its text encoder folder .* is missing.*--text-encoder FOLDER"):
        load_backend(tmp_path / "run" / "model")
    assert _cli("relocate", "--run", tmp_path / "run", "--text-encoder", tmp_path / "B")[0] == 0
    assert load_backend(tmp_path / "run" / "model").spec == spec
    (tmp_path / "B").rename(tmp_path / "C")  # moved again: the relocation names the missing folder
    with pytest.raises(ModelError, match=r"base-location.json: its base folder .*B is missing"):
        load_backend(tmp_path / "run" / "model")


def test_relocating_an_embedded_model_is_refused(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "backend.json").write_text(json.dumps({"kind": "tiny", "config": {}}))
    code, err = _cli("relocate", "--run", tmp_path / "run", "--sd-base", tmp_path)
    assert code == 2 and err.count("\n") == 1 and "no base model to relocate" in err
