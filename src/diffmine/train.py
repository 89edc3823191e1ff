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

import importlib.util
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from .atomic import write_json, write_table, write_text
from .data import BadImage, Problem, listed_of, load_image, to_model_input
from .models import Backend
from .models.base import WEIGHTS_FILE, read_weights, save_weights
from .rundir import TRAINED_ON_FILE, RunError
from .terminal import printable


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 32
    learning_rate: float | None = None  # None: the backend's default (5e-4 embedded, 1e-5 SD, 1e-4 LoRA)
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    lr_schedule: str = "constant"  # constant | cosine | linear: after warm-up, decay to 0 at `steps`
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    p_uncond: float = 0.15
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; 0: off (plain eps MSE)
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate's names)
    ema_decay: float = 0.0  # 0 disables; e.g. 0.999 keeps an EMA of the weights for inference
    gradient_checkpointing: bool = False
    hflip: bool = False
    random_crop: float = 0.0  # e.g. 0.1: crop up to 10% of each side away, resize back (seeded per step)
    cache_latents: bool = False  # encode each image once (SD's VAE is costly); no augmentation then
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise ValueError("steps, batch_size and grad_accumulation must be >= 1")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every and keep_checkpoints must be >= 1")
        if not 0.0 <= self.p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {self.p_uncond}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if not self.grad_clip > 0.0:  # NaN too; inf: no clipping
            raise ValueError(f"grad_clip must be > 0 (inf: no clipping), got {self.grad_clip}")
        if self.learning_rate is not None and not 0.0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or not 0.0 <= self.random_crop < 1.0:
            raise ValueError(f"warmup_steps must be >= 0 and random_crop in [0, 1), got {self.warmup_steps}, {self.random_crop}")
        if self.snr_gamma < 0:
            raise ValueError(f"snr_gamma must be >= 0 (0: off), got {self.snr_gamma}")
        # checked here, before the step records its settings: accelerate would refuse it only after
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")


LR_SCHEDULES = ("constant", "cosine", "linear")
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # accelerate's names


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of the base rate: a
    linear warm-up over ``warmup_steps``, then constant, or a cosine / linear decay that reaches
    0 at ``steps`` (the last step still learns a little). A function of the step alone, so a
    resumed run follows the same schedule; more ``--steps`` later stretch the decay from there."""
    warmup = max(1, config.warmup_steps)
    factor = min(1.0, (step + 1) / warmup)
    if config.lr_schedule == "constant" or step < warmup:
        return factor
    progress = min(1.0, (step - warmup + 1) / max(1, config.steps - warmup + 1))
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma for eps prediction: min(SNR, gamma) / SNR with
    SNR = alpha_bar / (1 - alpha_bar); 1 where SNR <= gamma (noisy steps), below 1 for the nearly
    clean steps whose easy, large-gradient losses would otherwise dominate. gamma 0: all ones."""
    if gamma <= 0:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The images of global step ``step``: consecutive slices of a per-epoch permutation."""
    per_epoch = max(1, n // batch_size)
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[within * batch_size:(within + 1) * batch_size]


class ImageCache:
    """Decoded, resized images, kept in memory when the dataset is small enough, else re-read.
    ``listed``: each image's (size, mtime_ns, fingerprint) in the listing (``data.listed_of``): an
    image edited since is bad, not trained on under the listing's identity."""

    def __init__(self, paths, resolution, resize, multiple, max_bytes=2 << 30, listed=None):
        self.paths, self.resolution, self.resize, self.multiple = paths, resolution, resize, multiple
        self.listed = listed
        self.keep = len(paths) * resolution * resolution * 3 * 2 <= max_bytes
        self.cache: dict[int, np.ndarray] = {}
        self.bad: dict[int, str] = {}

    def get(self, i: int) -> np.ndarray | None:
        if i in self.cache:
            return self.cache[i]
        if i in self.bad:
            return None
        try:
            image = load_image(self.paths[i], self.resolution, self.resize, self.multiple,
                               self.listed[i] if self.listed is not None else None)
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

    images = run.training_images()  # never the held-out split
    dataset = run.step_config("dataset")
    prompt_of = {label: run.prompt(label) for label in dataset["labels"]}
    null_prompt = run.prompt(None)
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # the optional extra
    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accumulation,
                              log_with="tensorboard" if tensorboard else None,
                              project_dir=str(run.model_dir / "logs") if tensorboard else None)
    backend.to(accelerator.device)
    if config.gradient_checkpointing:
        backend.unet.enable_gradient_checkpointing()
    params = [p for p in backend.denoiser.parameters() if p.requires_grad]
    lr = config.learning_rate or backend.default_learning_rate
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    ema = None
    if config.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay)
    model_dir = run.model_dir
    start = 0
    checkpoint = latest_checkpoint(model_dir)
    if checkpoint is not None:
        backend.load_trainable_state(read_weights(checkpoint / WEIGHTS_FILE))
        # safetensors + JSON only: a checkpoint is data, never code (optimizer.pt, a pickle
        # written by older versions, is never opened)
        state = _read_training_state(checkpoint, accelerator.device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
        start = json.loads((checkpoint / "state.json").read_text())["step"]
        # a checkpoint between two optimizer steps holds the weights of the last one, not the
        # gradients accumulated since: those micro-batches are trained again, in the same phase
        start -= start % config.grad_accumulation
        accelerator.print(f"resuming from {checkpoint} (step {start})")
    denoiser, optimizer = accelerator.prepare(backend.denoiser, optimizer)
    cache = ImageCache(images["path"].tolist(), dataset["resolution"], dataset["resize"], backend.latent_factor,
                       listed=listed_of(images))
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
    metrics = Metrics(model_dir / METRICS_FILE, start) if rank == 0 else None
    if tensorboard:
        accelerator.init_trackers("train", config={k: v for k, v in asdict(config).items()
                                                   if isinstance(v, (int, float, str, bool))})
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train", disable=not progress or rank != 0)
    for step in bar:
        chosen = batch_indices(len(images), config.batch_size * world, step, config.seed)[rank::world]
        arrays = [(i, cache.get(int(i))) for i in chosen]
        arrays = most_common_size(arrays)
        if not arrays:
            continue
        g = _step_generator(config.seed, step)
        started = time.perf_counter()
        learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step uses
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
            if config.snr_gamma > 0:
                per_sample = (pred.float() - noise).pow(2).flatten(1).mean(1)
                loss = (snr_weights(alphas[timesteps].float(), config.snr_gamma) * per_sample).mean()
            else:
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
        row = {"step": done, "loss": loss.item(), "learning_rate": learning_rate,
               "images_per_s": len(arrays) * world / max(time.perf_counter() - started, 1e-9)}
        if metrics is not None:
            metrics.append(row)
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=done)
        if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
            _save_checkpoint(model_dir, backend, optimizer, scheduler, ema, done, config.keep_checkpoints)
        accelerator.wait_for_everyone()
    if rank == 0:
        if ema is not None:
            ema.copy_to(params)  # inference uses the averaged weights
        backend.save(model_dir)
        # the images this model saw: a later listing (another --holdout, images added) may split
        # them otherwise, and a held-out score must not count an image the model trained on
        write_table(pa.table({"image_id": images["image_id"].tolist()}), model_dir / TRAINED_ON_FILE)
        problems = [Problem(images["image_id"][i], images["path"][i], p) for i, p in sorted(cache.bad.items())]
        run.report_skipped("train", problems)
        unlearned = sorted(set(labels) - {label for i, label in enumerate(labels) if i not in cache.bad})
        if unlearned:  # its prompt was trained on nothing: its typicality would say nothing of its images
            print(printable(f"train: every training image of {', '.join(map(repr, unlearned))} was left out "
                            "(unreadable, or changed since listed): the model learned nothing of that label (see "
                            "`diffmine status`)"), file=sys.stderr)
    accelerator.wait_for_everyone()
    if metrics is not None:
        metrics.close()
    accelerator.end_training()
    return model_dir


METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ("step", "loss", "learning_rate", "images_per_s")


class Metrics:
    """RUN/model/metrics.csv: one row per optimizer step (step = steps done), appended and flushed
    as training goes. A resumed run keeps the rows up to its checkpoint's step and drops the later
    ones (logged after that checkpoint by the interrupted run, and trained again now)."""

    def __init__(self, path: Path, start: int):
        kept = ""
        if start > 0 and path.is_file():
            lines = path.read_text().splitlines()
            kept = "".join(line + "\n" for line in lines[1:] if line and int(line.split(",")[0]) <= start)
        write_text(path, ",".join(METRICS_COLUMNS) + "\n" + kept)
        self.file = open(path, "a", encoding="utf-8")

    def append(self, row: dict) -> None:
        self.file.write(",".join(repr(row[c]) if isinstance(row[c], float) else str(row[c]) for c in METRICS_COLUMNS) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STRUCTURE = "optimizer.json"


def _save_checkpoint(model_dir: Path, backend, optimizer, scheduler, ema, step: int, keep: int) -> None:
    directory = model_dir / "checkpoints" / f"step-{step:07d}"
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(backend.trainable_state(), directory / WEIGHTS_FILE)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode_state(state, "", tensors)
    save_weights(tensors, directory / OPTIMIZER_TENSORS)
    write_json(directory / OPTIMIZER_STRUCTURE, structure)
    # state.json last: a checkpoint without it was interrupted and is ignored on resume
    write_json(directory / "state.json", {"step": step})
    for old in sorted((model_dir / "checkpoints").glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# Optimizer, scheduler and EMA state without pickle: every tensor goes into one safetensors file
# under its path in the state ("optimizer/state/3/exp_avg"), the rest into JSON, tagged so that
# int dict keys (the optimizer's parameter ids) and tuples (AdamW's betas) come back as they were.

def _encode_state(value, name: str, tensors: dict[str, torch.Tensor]):
    if isinstance(value, torch.Tensor):
        key = name or "tensor"
        while key in tensors:  # two paths that read alike ("a/b" key vs nested a, b)
            key += "+"
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, dict):
        if not all(k is None or isinstance(k, (str, int, float, bool)) for k in value):
            raise TypeError(f"checkpoint state {name!r}: dict keys must be str or numbers")
        return {"dict": [[k, _encode_state(v, f"{name}/{k}" if name else str(k), tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode_state(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"checkpoint state {name!r}: cannot store a {type(value).__name__} (tensors, numbers, "
                    "strings, lists and dicts only)")


def _decode_state(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode_state(v, tensors) for v in value]
    if isinstance(value, dict):
        (tag, content), = value.items()
        if tag == "tensor":
            return tensors[content]
        if tag == "tuple":
            return tuple(_decode_state(v, tensors) for v in content)
        if tag == "dict":
            return {k: _decode_state(v, tensors) for k, v in content}
        raise ValueError(f"unknown tag {tag!r}")
    return value


def _read_training_state(checkpoint: Path, device: torch.device) -> dict:
    """The optimizer, scheduler (and EMA) state saved by :func:`_save_checkpoint`."""
    structure, tensors = checkpoint / OPTIMIZER_STRUCTURE, checkpoint / OPTIMIZER_TENSORS
    if not structure.is_file() or not tensors.is_file():
        raise RunError(f"{checkpoint}: no {OPTIMIZER_STRUCTURE} and {OPTIMIZER_TENSORS} (a checkpoint of an older "
                       f"diffmine, whose pickled optimizer.pt is not loaded); delete {checkpoint.parent} to train from "
                       "scratch")
    from safetensors import SafetensorError

    try:
        return _decode_state(json.loads(structure.read_text()), load_file(str(tensors), device=str(device)))
    except (ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise RunError(f"{checkpoint}: damaged optimizer state ({type(exc).__name__}: {exc})") from None
