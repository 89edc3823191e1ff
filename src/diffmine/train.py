"""Finetuning (or, for the embedded model, training from scratch) with the label as the prompt.

One loop for both backends, the way diffusers' text-to-image examples do it, behind
``accelerate``: mixed precision, gradient accumulation, warm-up, gradient clipping, optional
EMA, checkpoints every N steps (limited in number) and resume. The null prompt is learned by
replacing the label prompt with it with probability ``p_uncond``.

Everything random in step ``s`` (the batch, t, eps, which prompts are dropped) is drawn from
generators seeded by ``(seed, s)``, so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import BadImage, Problem, load_image, to_model_input
from .models import Backend
from .models.base import WEIGHTS_FILE, read_weights, save_weights


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    learning_rate: float | None = None  # None: the backend's default (5e-4 embedded, 1e-5 SD, 1e-4 LoRA)
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    p_uncond: float = 0.15
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate's names)
    ema_decay: float = 0.0  # 0 disables; e.g. 0.999 keeps an EMA of the weights for inference
    gradient_checkpointing: bool = False
    hflip: bool = False
    random_crop: float = 0.0  # e.g. 0.1: crop up to 10% of each side away, resize back (seeded per step)
    cache_latents: bool = False  # encode each image once (SD's VAE is costly); no augmentation then
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The images of global step ``step``: consecutive slices of a per-epoch permutation."""
    per_epoch = max(1, n // batch_size)
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[within * batch_size:(within + 1) * batch_size]


class ImageCache:
    """Decoded, resized images, kept in memory when the dataset is small enough, else re-read."""

    def __init__(self, paths, resolution, resize, multiple, max_bytes=2 << 30):
        self.paths, self.resolution, self.resize, self.multiple = paths, resolution, resize, multiple
        self.keep = len(paths) * resolution * resolution * 3 * 2 <= max_bytes
        self.cache: dict[int, np.ndarray] = {}
        self.bad: dict[int, str] = {}

    def get(self, i: int) -> np.ndarray | None:
        if i in self.cache:
            return self.cache[i]
        if i in self.bad:
            return None
        try:
            image = load_image(self.paths[i], self.resolution, self.resize, self.multiple)
        except BadImage as exc:
            self.bad[i] = exc.problem
            return None
        if self.keep:
            self.cache[i] = image
        return image


def most_common_size(items: list[tuple[int, np.ndarray | None]]) -> list[tuple[int, np.ndarray]]:
    """The readable (index, image) pairs of the most common size: images of different sizes
    (keep-aspect resize) cannot share a tensor."""
    items = [(i, a) for i, a in items if a is not None]
    if not items:
        return []
    sizes = [a.shape for _, a in items]
    common = max(set(sizes), key=sizes.count)
    return [(i, a) for i, a in items if a.shape == common]


def augment(pixels: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Seeded flips and random crops (resized back to the input size) of (B, 3, H, W) images."""
    import torch.nn.functional as F

    if config.hflip:
        flip = torch.rand(len(pixels), generator=generator) < 0.5
        pixels[flip] = pixels[flip].flip(-1)
    if config.random_crop > 0:
        H, W = pixels.shape[-2:]
        out = torch.empty_like(pixels)
        for n in range(len(pixels)):
            keep = 1 - config.random_crop * torch.rand(1, generator=generator).item()
            h, w = max(1, round(H * keep)), max(1, round(W * keep))
            y = int(torch.randint(0, H - h + 1, (1,), generator=generator))
            x = int(torch.randint(0, W - w + 1, (1,), generator=generator))
            crop = pixels[n:n + 1, :, y:y + h, x:x + w]
            out[n] = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)[0]
        pixels = out
    return pixels


def latest_checkpoint(model_dir: Path) -> Path | None:
    checkpoints = sorted((model_dir / "checkpoints").glob("step-*"))
    complete = [c for c in checkpoints if (c / "state.json").is_file()]
    return complete[-1] if complete else None


def train(run, backend: Backend, config: TrainConfig, progress: bool = True) -> Path:
    """Train ``backend`` on the run's images; writes ``RUN/model`` and returns it."""
    from accelerate import Accelerator

    images = run.images()
    dataset = run.step_config("dataset")
    prompt_of = {label: run.prompt(label) for label in dataset["labels"]}
    null_prompt = run.prompt(None)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accumulation)
    backend.to(accelerator.device)
    if config.gradient_checkpointing:
        backend.unet.enable_gradient_checkpointing()
    params = [p for p in backend.denoiser.parameters() if p.requires_grad]
    lr = config.learning_rate or backend.default_learning_rate
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    warmup = max(1, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ema = None
    if config.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay)
    model_dir = run.model_dir
    start = 0
    checkpoint = latest_checkpoint(model_dir)
    if checkpoint is not None:
        backend.load_trainable_state(read_weights(checkpoint / WEIGHTS_FILE))
        state = torch.load(checkpoint / "optimizer.pt", map_location=accelerator.device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        start = json.loads((checkpoint / "state.json").read_text())["step"]
        accelerator.print(f"resuming from {checkpoint} (step {start})")
    denoiser, optimizer = accelerator.prepare(backend.denoiser, optimizer)
    cache = ImageCache(images["path"].tolist(), dataset["resolution"], dataset["resize"], backend.latent_factor)
    labels = images["label"].tolist()
    # data-dependent encoder settings (the embedded model's latent scale) from a fixed,
    # evenly spread sample: the same on every process and on every resume
    spread = np.unique(np.linspace(0, len(images) - 1, min(64, len(images))).astype(int))
    sample = most_common_size([(i, cache.get(int(i))) for i in spread])
    if sample:
        backend.calibrate(to_model_input(np.stack([a for _, a in sample])))
    if config.cache_latents and (config.hflip or config.random_crop):
        raise ValueError("cache_latents encodes each image once: it cannot be combined with hflip or random_crop")
    latent_cache: dict[int, torch.Tensor] = {}
    T = backend.scheduler.config.num_train_timesteps
    alphas = backend.scheduler.alphas_cumprod.to(accelerator.device)
    denoiser.train()
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train", disable=not progress or rank != 0)
    for step in bar:
        chosen = batch_indices(len(images), config.batch_size * world, step, config.seed)[rank::world]
        arrays = [(i, cache.get(int(i))) for i in chosen]
        arrays = most_common_size(arrays)
        if not arrays:
            continue
        g = _step_generator(config.seed, step)
        if config.cache_latents:
            missing = [(i, a) for i, a in arrays if int(i) not in latent_cache]
            if missing:
                with torch.no_grad():
                    encoded = backend.encode_images(to_model_input(np.stack([a for _, a in missing])).to(accelerator.device))
                latent_cache.update({int(i): z.float() for (i, _), z in zip(missing, encoded)})
            latents = torch.stack([latent_cache[int(i)] for i, _ in arrays])
        else:
            pixels = augment(to_model_input(np.stack([a for _, a in arrays])), config, g)
            with torch.no_grad():
                latents = backend.encode_images(pixels.to(accelerator.device)).float()
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        timesteps = torch.randint(0, T, (len(arrays),), generator=g).to(latents.device)
        drop = (torch.rand(len(arrays), generator=g) < config.p_uncond).tolist()
        prompts = [null_prompt if d else prompt_of[labels[i]] for (i, _), d in zip(arrays, drop)]
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with accelerator.accumulate(denoiser):
            with accelerator.autocast():
                pred = denoiser(noisy, timesteps, prompts)
            loss = (pred.float() - noise).pow(2).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None and accelerator.sync_gradients:
            ema.step(params)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
            _save_checkpoint(model_dir, backend, optimizer, scheduler, ema, done, config.keep_checkpoints)
        accelerator.wait_for_everyone()
    if rank == 0:
        if ema is not None:
            ema.copy_to(params)  # inference uses the averaged weights
        backend.save(model_dir)
        run.record_problems("train", [Problem(images["image_id"][i], images["path"][i], p) for i, p in sorted(cache.bad.items())])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model_dir


def _save_checkpoint(model_dir: Path, backend, optimizer, scheduler, ema, step: int, keep: int) -> None:
    directory = model_dir / "checkpoints" / f"step-{step:07d}"
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(backend.trainable_state(), directory / WEIGHTS_FILE)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    torch.save(state, directory / "optimizer.pt")
    # state.json last: a checkpoint without it was interrupted and is ignored on resume
    (directory / "state.json").write_text(json.dumps({"step": step}))
    for old in sorted((model_dir / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
