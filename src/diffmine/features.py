"""DIFT features (Tang et al. 2023) of mined patches, from the trained model itself.

The image is noised at t = 0.161 (of the diffusion time), the UNet runs label-conditioned, and
the output of one up-block is read with a forward hook; the forward pass stops right after that
block (the rest of the UNet is not needed). Optionally averaged over an ensemble of noise
draws. Each patch's feature is the mean over its box mapped to the feature grid, L2-normalised.
A patch whose image cannot be read (or changed since it was listed) gets none (NaN): clustering
leaves it out, and the step names the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .atomic import write_with
from .data import BadImage, Problem, image_batches, listed_by_id, to_model_input
from .models import Backend
from .machine import resolve_precision
from .typicality import _barrier, autocast, draw_noise


@dataclass
class FeatureConfig:
    t: float = 0.161
    block: int | None = None  # index into unet.up_blocks; None: the backend's default (1)
    ensemble: int = 4
    batch_size: int = 32  # images per forward pass (times the ensemble)
    precision: str = "auto"  # as TypicalityConfig.precision: bf16 where native, else fp32
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"t (--feature-t) must be in [0, 1], got {self.t}")
        if self.ensemble < 1 or self.batch_size < 1 or (self.block is not None and self.block < 0):
            raise ValueError("ensemble and batch_size (--feature-ensemble, --feature-batch-size) must be >= 1, "
                             "block (--feature-block) >= 0")
        resolve_precision(self.precision)  # validates


def check_block(backend: Backend, config: FeatureConfig) -> None:
    """ValueError unless ``config.block`` is an up-block of the model: before a step drops its features."""
    blocks = len(backend.unet.up_blocks)
    if config.block is not None and config.block >= blocks:
        raise ValueError(f"--feature-block {config.block}: the model has up-blocks 0..{blocks - 1}")


FEATURE_KINDS = ("top", "rejected")  # the mined patches that get a feature, in this order


class _Stop(Exception):
    pass


@torch.inference_mode()
def dift_feature_maps(backend: Backend, pixels: torch.Tensor, prompts: list[str], config: FeatureConfig) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, hf, wf) up-block activations averaged over the ensemble."""
    block_index = backend.default_feature_block if config.block is None else config.block
    block = backend.unet.up_blocks[block_index]
    latents = backend.encode_images(pixels.to(backend.device)).float()
    T = backend.scheduler.config.num_train_timesteps
    step = min(T - 1, int(config.t * T))
    _, noise = draw_noise(config.seed, config.ensemble, tuple(latents.shape[1:]), T, estimator="paper")
    noise = noise.to(latents.device)
    alpha = backend.scheduler.alphas_cumprod[step].to(latents.device)
    B, E = latents.shape[0], config.ensemble
    noisy = alpha.sqrt() * latents.repeat_interleave(E, 0) + (1 - alpha).sqrt() * noise.repeat(B, 1, 1, 1)
    states = backend.encode_prompts(prompts).repeat_interleave(E, 0)
    captured = {}

    def hook(_module, _inputs, output):
        captured["features"] = output[0] if isinstance(output, tuple) else output
        raise _Stop  # nothing after this block is needed

    handle = block.register_forward_hook(hook)
    try:
        with autocast(latents.device, config.precision):
            backend.denoiser(noisy, torch.full((B * E,), step, device=latents.device), states)
    except _Stop:
        pass
    finally:
        handle.remove()
    features = captured["features"].float()
    return features.view(B, E, *features.shape[1:]).mean(1)


def pool_boxes(feature_map: torch.Tensor, boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Mean feature over each box, L2-normalised.

    Args:
        feature_map: (C, hf, wf)
        boxes: (N, 4) x0, y0, x1, y1 in image pixels (x1, y1 exclusive)
        image_size: (H, W)
    Returns:
        (N, C) float32, unit norm
    """
    C, hf, wf = feature_map.shape
    H, W = image_size
    out = np.empty((len(boxes), C), np.float32)
    fm = feature_map.cpu().numpy()
    for n, (x0, y0, x1, y1) in enumerate(boxes):
        fx0, fx1 = int(np.floor(x0 * wf / W)), max(int(np.ceil(x1 * wf / W)), int(np.floor(x0 * wf / W)) + 1)
        fy0, fy1 = int(np.floor(y0 * hf / H)), max(int(np.ceil(y1 * hf / H)), int(np.floor(y0 * hf / H)) + 1)
        out[n] = fm[:, fy0:fy1, fx0:fx1].mean((1, 2))
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def feature_blocks(n_images: int, batch_size: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """Positions (in the run's image order) of the images one process computes features for.

    The images are cut into blocks of ``batch_size`` consecutive images, dealt round-robin; a
    block is one forward pass (split further only where the image size changes), so every
    image goes through the model with the same batch-mates whatever the number of processes,
    and a data-parallel run equals a single-process one bit for bit.
    """
    blocks = range(process_index * batch_size, n_images, num_processes * batch_size)
    return [i for start in blocks for i in range(start, min(start + batch_size, n_images))]


def patch_features(backend: Backend, patches: pd.DataFrame, paths: dict[str, str], prompt_of: dict[str, str],
                   resolution: int, resize: str, config: FeatureConfig, progress: bool = True,
                   process_index: int | None = None,
                   listed: dict[str, tuple] | None = None) -> tuple[np.ndarray, list[Problem]]:
    """(len(patches), C) DIFT features, rows aligned with ``patches`` (each image is run once), and
    the images that could not be read.

    Images go through the model in blocks of ``config.batch_size`` (see :func:`feature_blocks`).
    A bad image's patches get NaN, no feature (``clustering.described``): a zero vector would join
    some cluster (the zero patches of one image even make one of their own) and pull its centroid
    towards nothing it shows; C is 0 if no image could be read. ``process_index``: of a
    data-parallel run, for its own progress bar. ``listed``: each image's (size, mtime_ns,
    fingerprint) in the listing (``data.listed_by_id``): an image edited since is bad, not
    described at boxes mined on other pixels.
    """
    backend.denoiser.eval()
    image_ids = list(dict.fromkeys(patches["image_id"]))
    by_image = {i: g for i, g in patches.reset_index(drop=True).groupby("image_id")}
    features, skipped = np.full((len(patches), 0), np.nan, np.float32), []
    bar = tqdm(total=len(image_ids), desc="features" if process_index is None else f"features [{process_index}]",
               unit="img", position=process_index or 0, disable=not progress)
    for start in range(0, len(image_ids), config.batch_size):
        block = image_ids[start:start + config.batch_size]
        for positions, batch in image_batches([paths[i] for i in block], resolution, resize, backend.latent_factor,
                                              config.batch_size, listed=[listed[i] for i in block] if listed else None):
            if isinstance(batch, BadImage):
                skipped.append(Problem(block[positions[0]], batch.path, batch.problem))
            else:
                prompts = [prompt_of[by_image[block[n]]["label"].iloc[0]] for n in positions]
                maps = dift_feature_maps(backend, to_model_input(batch), prompts, config)
                for n, feature_map in zip(positions, maps):
                    group = by_image[block[n]]
                    pooled = pool_boxes(feature_map, group[["x0", "y0", "x1", "y1"]].to_numpy(), batch.shape[1:3])
                    if not features.shape[1]:
                        features = np.full((len(patches), pooled.shape[1]), np.nan, np.float32)
                    features[group.index.to_numpy()] = pooled
            bar.update(len(positions))
    bar.close()
    return features, skipped


def _part_path(directory: Path, process_index: int, num_processes: int) -> Path:
    return directory / f"part-{process_index:05d}-of-{num_processes:05d}.npz"


def _save_part(path: Path, rows: np.ndarray, features: np.ndarray, skipped: list[Problem]) -> None:
    """One process's features (at ``rows`` of the whole) and the images it could not read."""
    bad = np.array([[p.image_id, p.path, p.problem] for p in skipped], dtype=str).reshape(-1, 3)
    write_with(path, lambda f: np.savez(f, rows=rows, features=features, skipped=bad))


def _gather_parts(directory: Path, num_processes: int, n_rows: int) -> tuple[np.ndarray, list[Problem]]:
    """(n_rows, C) features assembled from every process's part, and the images the processes
    could not read (in process order); the parts are removed (with any left by a killed run of
    another number of processes)."""
    parts, skipped = [], []
    for r in range(num_processes):
        with np.load(_part_path(directory, r, num_processes)) as part:
            parts.append((part["rows"], part["features"]))
            skipped += [Problem(*row) for row in part["skipped"].tolist()]
    _remove_parts(directory)
    features = np.full((n_rows, max(f.shape[1] for _, f in parts)), np.nan, np.float32)
    for rows, part in parts:
        if part.shape[1]:  # a process whose images were all bad knows no width
            features[rows] = part
    return features, skipped


def _remove_parts(directory: Path) -> None:
    """Every process's part in ``directory``: gathered, or left by a killed data-parallel run."""
    for path in directory.glob("part-*.npz"):
        path.unlink()


def run_features(run, backend: Backend, config: FeatureConfig, progress: bool = True,
                 process_index: int = 0, num_processes: int = 1, patches: pd.DataFrame | None = None,
                 out: Path | None = None, step: str = "features") -> np.ndarray | None:
    """DIFT features of the run's top and rejected patches -> ``features/features.npy`` (rows of
    ``run.mined_patches(FEATURE_KINDS)``: clustering clusters the top ones and counts coverage on all).

    Data-parallel over ``num_processes`` (torch.distributed): each process computes the images
    of :func:`feature_blocks` and writes ``features/part-RANK-of-WORLD.npz`` (its row indices,
    features and unreadable images); after a barrier process 0 gathers them. Returns the (N, C)
    features on process 0, None on the others. ``patches``, ``out`` and ``step``: other patches (a
    contrast's), where their features go and the step that names the images left out (one line
    each, recorded as its problems: the patches of an image that could not be read have none).
    """
    patches = run.mined_patches(FEATURE_KINDS) if patches is None else patches
    out = run.features_path if out is None else out
    dataset = run.step_config("dataset")
    images = run.images()
    paths = dict(zip(images["image_id"], images["path"]))
    prompt_of = {label: run.prompt(label) for label in dataset["labels"]}
    image_ids = list(dict.fromkeys(patches["image_id"]))
    mine = [image_ids[i] for i in feature_blocks(len(image_ids), config.batch_size, process_index, num_processes)]
    rows = np.flatnonzero(patches["image_id"].isin(mine).to_numpy())
    part, skipped = patch_features(backend, patches.iloc[rows], paths, prompt_of, dataset["resolution"],
                                   dataset["resize"], config, progress, process_index if num_processes > 1 else None,
                                   listed_by_id(images))
    if num_processes == 1:
        features = part
        _remove_parts(out.parent)  # a killed data-parallel run's, which status would report as still to gather
    else:
        directory = out.parent
        _save_part(_part_path(directory, process_index, num_processes), rows, part, skipped)
        _barrier(num_processes)
        if process_index != 0:
            return None
        features, skipped = _gather_parts(directory, num_processes, len(patches))
    write_with(out, lambda f: np.save(f, features))
    run.report_skipped(step, skipped)
    return features
