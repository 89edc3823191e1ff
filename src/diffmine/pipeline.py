"""The steps of a run, each reading and writing the run directory; the CLI is a thin layer on this.

    prepare -> train -> typicality -> mine -> cluster (features + k-means) -> report

None of them asks which backend it has.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from .clustering import ClusterConfig, run_clustering
from .data import DatasetError, scan_dataset
from .cotypicality import CotypicalityConfig, run_cotypicality
from .features import FeatureConfig, run_features
from .mining import MineConfig, run_mining
from .models import Backend, create_backend, load_backend
from .rundir import Run, RunError
from .train import TrainConfig, train
from .translate import TranslateConfig, run_translate
from .typicality import TypicalityConfig, run_typicality


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare(run: Run, data: str | Path, prompt: str, null_prompt: str, resolution: int, resize: str = "square",
            model: str = "tiny") -> None:
    """List the dataset into the run and record the prompts and image size every step will use."""
    if "{label}" not in prompt:
        raise DatasetError(f"the prompt must contain '{{label}}', got {prompt!r}")
    dataset = scan_dataset(data)
    if null_prompt in {prompt.format(label=l) for l in dataset.label_names}:
        raise DatasetError(f"the null prompt {null_prompt!r} equals a label prompt")
    run.path.mkdir(parents=True, exist_ok=True)
    run.save_dataset(dataset)
    run.set_step_config("dataset", {
        "data": str(data) if str(data).startswith("hf:") else str(Path(data).resolve()), "root": str(dataset.root), "images": len(dataset),
        "labels": dataset.label_names, "prompt": prompt, "null_prompt": null_prompt,
        "resolution": resolution, "resize": resize, "model": model,
    })
    for p in dataset.problems[:10]:
        print(f"skipped {p.path or p.image_id}: {p.problem}")
    if len(dataset.problems) > 10:
        print(f"... and {len(dataset.problems) - 10} more (see {run.path}/problems.parquet)")


def all_prompts(run: Run) -> list[str]:
    return [run.prompt(label) for label in run.labels] + [run.prompt(None)]


def new_backend(run: Run, model: str, seed: int, **options) -> Backend:
    return create_backend(model, all_prompts(run), seed=seed, **options)


def train_step(run: Run, config: TrainConfig, model_options: dict | None = None, progress: bool = True) -> Path:
    """Train the run's model from scratch (embedded) or from pretrained weights (SD); resumable."""
    dataset = run.step_config("dataset")
    settings = {**asdict(config), "model": dataset["model"], "model_options": model_options or {}}
    previous = run.config.get("train")
    if previous is not None and _comparable(previous) != _comparable(settings) and run.model_dir.exists():
        # other settings: the old checkpoints belong to another model
        import shutil

        shutil.rmtree(run.model_dir)
    run.set_step_config("train", settings)
    backend = new_backend(run, dataset["model"], config.seed, **(model_options or {}))
    return train(run, backend, config, progress=progress)


def _comparable(settings: dict) -> dict:
    # the number of steps may grow: training on resumes from the last checkpoint
    return {k: v for k, v in settings.items() if k not in ("steps", "checkpoint_every", "keep_checkpoints")}


def model_identity(run: Run) -> dict:
    """The identity of the run's trained model (changes whenever its weights do)."""
    stat = (run.model_dir / "trainable.safetensors").stat()
    return {"model": "run", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def load_model(run: Run, model: str | None = None, device: torch.device | None = None, **options) -> tuple[Backend, dict]:
    """The run's trained model, or ``model`` (e.g. ``sd:PATH`` to score with pretrained weights).

    Returns the backend and an identity that changes whenever the weights do.
    """
    if model is None:
        backend = load_backend(run.model_dir)
        identity = model_identity(run)
    else:
        backend = create_backend(model, all_prompts(run), seed=0, **options)
        identity = {"model": model, "options": options}
    return backend.to(device or default_device()), identity


def distributed_context() -> tuple[int, int, torch.device]:
    """(process index, number of processes, device) under accelerate/torchrun, else (0, 1, default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, default_device()
    # `accelerate launch` and `torchrun` both set RANK / WORLD_SIZE / LOCAL_RANK; the process
    # group is torch.distributed's own (gloo on CPU, NCCL on GPUs)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def typicality_step(run: Run, config: TypicalityConfig, model: str | None = None, model_options: dict | None = None,
                    progress: bool = True) -> int:
    """Typicality with the run's trained model, or with ``model`` (e.g. pretrained ``sd:PATH``)."""
    rank, world, device = distributed_context()
    backend, identity = load_model(run, model, device, **(model_options or {}))
    written = run_typicality(run, backend, config, identity, rank, world, progress)
    if rank == 0:
        run.set_step_config("typicality", {**asdict(config), "model": identity})
    return written


def mine_step(run: Run, config: MineConfig, progress: bool = True):
    return run_mining(run, config, progress)


def scoring_model(run: Run, device: torch.device | None = None) -> Backend:
    """The model that computed the run's typicality: features come from the same one."""
    used = run.config.get("typicality", {}).get("model", {"model": "run"})
    if used.get("model") == "run":
        return load_model(run, device=device)[0]
    return load_model(run, used["model"], device, **used.get("options", {}))[0]


def cluster_step(run: Run, config: ClusterConfig, features: FeatureConfig, progress: bool = True):
    """DIFT features of the top patches, then k-means per label; returns the clustered patches.

    Data-parallel under accelerate/torchrun: every process computes the features of its share
    of the images, process 0 gathers them and clusters; the other processes return None.
    """
    rank, world, device = distributed_context()
    backend = scoring_model(run, device)
    run_features(run, backend, features, progress, rank, world)
    if rank != 0:
        return None
    return run_clustering(run, config)


def translate_step(run: Run, config: TranslateConfig, progress: bool = True) -> int:
    """Translate the run's images to other labels with the run's trained model."""
    backend, identity = load_model(run)
    return run_translate(run, backend, config, identity, progress)


def cotypicality_step(run: Run, config: CotypicalityConfig, features: FeatureConfig, progress: bool = True):
    """Co-typicality of the translated scenes, scored and described by the run's trained model."""
    backend, identity = load_model(run)
    return run_cotypicality(run, backend, config, features, identity, progress)


__all__ = ["prepare", "train_step", "typicality_step", "mine_step", "cluster_step", "load_model", "RunError"]
