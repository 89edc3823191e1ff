"""DIFT features (Tang et al. 2023) of mined patches, from the trained model itself.

The image is noised at t = 0.161 (of the diffusion time), the UNet runs label-conditioned, and
the output of one up-block is read with a forward hook; the forward pass stops right after that
block (the rest of the UNet is not needed). Optionally averaged over an ensemble of noise
draws. Each patch's feature is the mean over its box mapped to the feature grid, L2-normalised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .data import BadImage, iter_images, to_model_input
from .models import Backend
from .typicality import autocast, draw_noise


@dataclass
class FeatureConfig:
    t: float = 0.161
    block: int | None = None  # index into unet.up_blocks; None: the backend's default (1)
    ensemble: int = 4
    batch_size: int = 32  # images per forward pass (times the ensemble)
    precision: str = "fp32"
    seed: int = 0


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


def patch_features(backend: Backend, patches: pd.DataFrame, paths: dict[str, str], prompt_of: dict[str, str],
                   resolution: int, resize: str, config: FeatureConfig, progress: bool = True) -> np.ndarray:
    """(len(patches), C) DIFT features, rows aligned with ``patches``; each image is run once."""
    backend.denoiser.eval()
    image_ids = list(dict.fromkeys(patches["image_id"]))
    by_image = {i: g for i, g in patches.reset_index(drop=True).groupby("image_id")}
    features: np.ndarray | None = None
    bar = tqdm(total=len(image_ids), desc="features", unit="img", disable=not progress)
    pending: list[tuple[str, np.ndarray]] = []

    def flush():
        nonlocal features
        if not pending:
            return
        pixels = to_model_input(np.stack([a for _, a in pending]))
        prompts = [prompt_of[by_image[i]["label"].iloc[0]] for i, _ in pending]
        maps = dift_feature_maps(backend, pixels, prompts, config)
        for (image_id, array), fm in zip(pending, maps):
            group = by_image[image_id]
            pooled = pool_boxes(fm, group[["x0", "y0", "x1", "y1"]].to_numpy(), array.shape[:2])
            if features is None:
                features = np.zeros((len(patches), pooled.shape[1]), np.float32)
            features[group.index.to_numpy()] = pooled
        bar.update(len(pending))
        pending.clear()

    for n, item in iter_images([paths[i] for i in image_ids], resolution, resize, backend.latent_factor):
        if isinstance(item, BadImage):  # listed in typicality already; its patches get zero features
            bar.update()
            continue
        if pending and (pending[0][1].shape != item.shape or len(pending) >= config.batch_size):
            flush()
        pending.append((image_ids[n], item))
    flush()
    bar.close()
    return features if features is not None else np.zeros((0, 1), np.float32)


def run_features(run, backend: Backend, config: FeatureConfig, progress: bool = True) -> np.ndarray:
    """DIFT features of the run's top patches -> ``features/features.npy``."""
    patches = run.mined_patches("top")
    dataset = run.step_config("dataset")
    images = run.images()
    paths = dict(zip(images["image_id"], images["path"]))
    prompt_of = {label: run.prompt(label) for label in dataset["labels"]}
    features = patch_features(backend, patches, paths, prompt_of, dataset["resolution"],
                              dataset["resize"], config, progress)
    run.features_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.features_path.with_name("features.tmp.npy")
    np.save(tmp, features)
    tmp.replace(run.features_path)
    run.set_step_config("features", asdict(config))
    return features
