"""Typicality: how much better a label explains each latent pixel than the null prompt does.

    T(x | c) = E_{t, eps} [ L_t(x, eps, null) - L_t(x, eps, c) ],   L = || eps_theta(x_t, t, .) - eps ||^2

per latent pixel (mean over latent channels), t in [t_min, t_max] of the diffusion time, the
SAME (t, eps) in both terms, averaged over K draws and upsampled to the image (Siglidis et al.
2024, section 3.2).

The draws depend only on the seed and the latent shape, never on the process, the batch or the
position of an image in the dataset; so every image of a given shape sees the same draws (as in
the authors' code), comparisons across images share their noise, and a data-parallel run gives
exactly the single-process result.

The core is :func:`condition_errors`: the denoising error of a batch of images under M
conditions with shared noise, all conditions of a draw in one forward pass. Typicality is its
M = 2 case [label, null]; the classifier (argmin over labels) uses M = |labels|.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import BadImage, image_batches, listed_of, problem_may_be_fixed, to_model_input
from .machine import resolve_precision
from .models import Backend
from .shards import plan_new_shards, write_shard

ESTIMATORS = ("paper", "stratified", "stratified-antithetic", "adaptive")
# (backend, pixels (B, 3, H, W), labels of the B images) -> (B, h, w) latent maps
MapsOf = Callable[[Backend, torch.Tensor, list[str]], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


DEFAULT_SAMPLES = 16  # the fixed-draw estimators' K
ADAPTIVE_CAP = 64  # the adaptive estimator's K (its per-image cap; its budget keeps the mean at 16)


@dataclass
class TypicalityConfig:
    # K, the (t, eps) draws per image; for the adaptive estimator the per-image cap. None:
    # DEFAULT_SAMPLES, or ADAPTIVE_CAP for the adaptive estimator (the setting its benchmarks use)
    samples: int | None = None
    t_min: float = 0.1
    t_max: float = 0.7
    # paper: t i.i.d. uniform, eps i.i.d.; stratified: one t per equal-width stratum;
    # stratified-antithetic: also eps, -eps in pairs. The default needs about half the draws of
    # the paper's for the same patch ranking (benchmarks/estimator.py, benchmarks/README.md).
    # adaptive: a nested stratified-antithetic sequence (:func:`nested_draws`), few draws for every
    # image and up to ``samples`` only where the mined set can still change (adaptive.py)
    estimator: str = "stratified-antithetic"
    seed: int = 0
    batch_size: int = 0  # UNet inputs per forward pass, all conditions counted; 0: the backend's choice
    shard_size: int = 512  # images per stored shard (the unit of work and of resume)
    map_dtype: str = "float16"  # storage precision of the latent maps
    # autocast of the UNet forward: fp32 | bf16 | fp16, or auto = bf16 where the device computes it
    # natively, else fp32 (machine.py); the pipeline records the resolved value
    precision: str = "auto"
    workers: int = 0  # image-decoding processes prefetching ahead of the model
    # torch.compile the UNet (inductor, weights frozen): ~1.25x per pass on a 2-core CPU after
    # ~1.5 min of compiling, so worth it from a few thousand images (benchmarks/README.md)
    compile: bool = False
    # also store each image's per-unit maps "KEY/units" (U, h, w) (a unit: an antithetic pair's
    # mean, or one draw of the other estimators): the standard error of any patch's typicality,
    # which mining's significance filter needs. (K/2) x h x w at map_dtype: 4 KB per 64 px image
    # of the tiny model, 64 KB per 512 px SD 1.5 image at K = 16
    unit_maps: bool = True

    @classmethod
    def from_settings(cls, settings: dict, **overrides) -> "TypicalityConfig":
        """The config a run recorded (``run.config["typicality"]``, extra keys ignored), with
        ``overrides``: later steps reuse its draws and precision."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in settings.items() if k in names}, **overrides})

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.samples is None:
            self.samples = ADAPTIVE_CAP if self.estimator == "adaptive" else DEFAULT_SAMPLES
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.estimator == "adaptive" and (self.samples < 4 or self.samples % 2):
            raise ValueError(f"the adaptive estimator needs an even samples >= 4 (antithetic pairs), got {self.samples}")
        if self.map_dtype not in ("float16", "float32"):
            raise ValueError(f"map_dtype must be float16 or float32, got {self.map_dtype!r}")
        resolve_precision(self.precision)  # validates
        if self.shard_size < 1 or self.batch_size < 0 or self.workers < 0:
            raise ValueError("shard_size must be >= 1, batch_size and workers >= 0")


# ----------------------------------------------------------------------------------------------
# pure functions on tensors


def draw_noise(seed: int, samples: int, latent_shape: tuple[int, int, int], num_train_timesteps: int,
               t_min: float = 0.1, t_max: float = 0.7, estimator: str = "stratified-antithetic") -> tuple[torch.Tensor, torch.Tensor]:
    """The K (t, eps) draws shared by every image of one latent shape.

    Returns:
        timesteps: (K,) int64 in [t_min * T, t_max * T)
        noise: (K, C, h, w) float32
    """
    if estimator == "adaptive":
        return nested_draws(seed, samples, latent_shape, num_train_timesteps, t_min, t_max)
    key = hashlib.sha256(json.dumps([seed, list(latent_shape)]).encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    u = torch.rand(samples, generator=generator, dtype=torch.float64)
    if estimator != "paper":
        u = (torch.arange(samples, dtype=torch.float64) + u) / samples  # one draw per stratum
    t = t_min + (t_max - t_min) * u
    timesteps = (t * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    noise = torch.randn(samples, *latent_shape, generator=generator)
    if estimator == "stratified-antithetic":
        noise[1::2] = -noise[0::2][: samples // 2]
    return timesteps, noise


def nested_draws(seed: int, samples: int, latent_shape: tuple[int, int, int], num_train_timesteps: int,
                 t_min: float = 0.1, t_max: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """The adaptive estimator's draws: one fixed sequence whose every prefix of 2^m draws is a
    stratified-antithetic set, so an image refined to n draws used exactly the first n.

    t: an Owen-scrambled van der Corput sequence: draw 0 uniform; draw 2^m + i uniform in the half
    of draw i's stratum of width 2^-m that draw i left empty. The first 2^m draws then hold one
    draw in each stratum of width 2^-m, each uniform within it, and every draw is uniform on its
    own. eps: draws 2p and 2p + 1 are eps and -eps. A prefix does not depend on ``samples``.

    Returns:
        timesteps: (K,) int64 in [t_min * T, t_max * T); noise: (K, C, h, w) float32
    """
    key = hashlib.sha256(json.dumps(["nested", seed, list(latent_shape)]).encode()).digest()
    t_gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    eps_gen = torch.Generator().manual_seed(int.from_bytes(key[8:16], "little") & (2**63 - 1))
    u: list[float] = []
    for j in range(samples):
        r = float(torch.rand(1, generator=t_gen, dtype=torch.float64))
        if j == 0:
            u.append(r)
            continue
        level = j.bit_length() - 1
        width = 0.5 ** level
        start = np.floor(u[j - 2**level] / width) * width  # draw i's stratum [start, start + width)
        empty = start if u[j - 2**level] >= start + width / 2 else start + width / 2
        u.append(empty + r * width / 2)
    t = t_min + (t_max - t_min) * torch.tensor(u, dtype=torch.float64)
    timesteps = (t * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    noise = torch.empty(samples, *latent_shape)
    for p in range(0, samples, 2):  # one call per pair: a prefix does not depend on the length
        eps = torch.randn(*latent_shape, generator=eps_gen)
        noise[p] = eps
        if p + 1 < samples:
            noise[p + 1] = -eps
    return timesteps, noise


@contextmanager
def compiled(backend: Backend, enabled: bool = True):
    """Within the block, ``backend``'s UNet is ``torch.compile``d for inference (inductor with the
    weights frozen as constants); the eager UNet is back afterwards, for training or hooks."""
    if not enabled:
        yield backend
        return
    import torch._inductor.config as inductor

    eager, freezing = backend.denoiser.unet, inductor.freezing
    inductor.freezing = True
    backend.denoiser.unet = torch.compile(eager, dynamic=False)
    try:
        yield backend
    finally:
        backend.denoiser.unet, inductor.freezing = eager, freezing


def autocast(device: torch.device, precision: str):
    """Autocast for ``precision`` on ``device`` (``auto`` resolved there)."""
    precision = resolve_precision(precision, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.inference_mode()
def condition_errors(backend: Backend, latents: torch.Tensor, states: torch.Tensor, timesteps: torch.Tensor,
                     noise: torch.Tensor, batch_size: int = 0, precision: str = "fp32",
                     fixed_shape: bool = False, per_draw: bool = False) -> torch.Tensor:
    """Per-pixel denoising error under M conditions, averaged over K shared draws.

    Args:
        latents: (B, C, h, w) clean latents
        states: (B, M, L, D) prompt states, M conditions per image
        timesteps: (K,) int64; noise: (K, C, h, w): the draws, shared by the M conditions
        batch_size: UNet inputs per forward pass (0: ``backend.inputs_per_pass``)
        fixed_shape: pad a short last pass to the full pass size, so that a compiled UNet sees
            one input shape and never recompiles
        per_draw: return every draw's error instead of the mean
    Returns:
        (B, M, h, w) float32: mean over draws of || eps_theta - eps ||^2 averaged over channels;
        with ``per_draw``, (B, M, K, h, w): each draw's
    """
    device = backend.device
    B, M = states.shape[:2]
    K = timesteps.shape[0]
    scheduler = backend.scheduler
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    totals = torch.zeros(B * M, *((K,) if per_draw else ()), *latents.shape[2:], device=device)
    # every (image, draw) pair, all M conditions of a pair in the same forward pass
    pairs = torch.stack(torch.meshgrid(torch.arange(B), torch.arange(K), indexing="ij"), -1).reshape(-1, 2)
    per_pass = max(1, (batch_size or backend.inputs_per_pass) // M)
    latents, states = latents.to(device), states.to(device)
    timesteps, noise = timesteps.to(device), noise.to(device)
    for chunk in pairs.split(per_pass):
        n = len(chunk)
        if fixed_shape and n < per_pass:
            chunk = torch.cat([chunk, chunk[-1:].expand(per_pass - n, 2)])  # the padding is discarded
        b, k = chunk[:, 0].to(device), chunk[:, 1].to(device)
        a = alphas[timesteps[k]].view(-1, 1, 1, 1)
        eps = noise[k]
        noisy = a.sqrt() * latents[b] + (1 - a).sqrt() * eps  # q(x_t | x_0), the DDPM forward
        with autocast(device, precision):
            pred = backend.denoiser(noisy.repeat_interleave(M, 0), timesteps[k].repeat_interleave(M, 0),
                                    states[b].flatten(0, 1))
        err = (pred.float() - eps.repeat_interleave(M, 0)).pow(2).mean(1)[: n * M]  # (n * M, h, w)
        rows = (b[:n].view(-1, 1) * M + torch.arange(M, device=device)).flatten()
        if per_draw:  # each (image, condition, draw) is computed once: a plain write
            totals[rows, k[:n].repeat_interleave(M)] = err
        else:
            totals.index_add_(0, rows, err)
    if per_draw:
        return totals.view(B, M, K, *latents.shape[2:])
    return (totals / K).view(B, M, *latents.shape[2:])


def typicality_from_errors(errors: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) errors under [label, null] -> (B, ...) typicality = null - label."""
    return errors[:, 1] - errors[:, 0]


def draw_units(per_draw: torch.Tensor, estimator: str) -> torch.Tensor:
    """(B, K, h, w) per-draw maps -> (B, U, h, w) the independent units of the standard error.

    Antithetic draws (eps, -eps) are correlated, so a unit is a pair's mean (U = K // 2; an odd
    last draw enters the mean map but not the error estimate); the other estimators' draws are
    units themselves. The units keep the draws' order: for the stratified estimators that is t
    order, which mining's error needs (``mining.patch_errors``: the spread of the units also holds
    typicality's trend in t, which stratification keeps out of the mean; successive differences
    do not).
    """
    if estimator in ("stratified-antithetic", "adaptive") and per_draw.shape[1] >= 2:
        pairs = per_draw.shape[1] // 2
        return (per_draw[:, 0:2 * pairs:2] + per_draw[:, 1:2 * pairs:2]) / 2
    return per_draw


def upsample(latent_map: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of (h, w) or (B, h, w) maps to (H, W) / (B, H, W) float32."""
    t = torch.as_tensor(np.asarray(latent_map, dtype=np.float32))
    squeeze = t.dim() == 2
    t = t.view(-1, 1, *t.shape[-2:])
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return (out[0] if squeeze else out).numpy()


def prompt_errors(backend: Backend, pixels: torch.Tensor, prompts: list[list[str]], config: TypicalityConfig,
                  per_draw: bool = False, first: int = 0) -> torch.Tensor:
    """Denoising error of each image under each of its M prompts, with the run's shared draws.

    Args:
        pixels: (B, 3, H, W) in [-1, 1], one size
        prompts: B lists of M prompt strings
        first: use the draws ``first`` .. ``config.samples - 1`` only (the adaptive estimator's rounds)
    Returns:
        (B, M, h, w) float32 on the latent grid ((B, M, K, h, w) with ``per_draw``)
    """
    with torch.inference_mode():
        latents = backend.encode_images(pixels.to(backend.device)).float()
        M = len(prompts[0])
        states = backend.encode_prompts([p for row in prompts for p in row])
        states = states.view(len(prompts), M, *states.shape[1:])
    timesteps, noise = draw_noise(config.seed, config.samples, tuple(latents.shape[1:]),
                                  backend.scheduler.config.num_train_timesteps, config.t_min, config.t_max, config.estimator)
    timesteps, noise = timesteps[first:], noise[first:]
    return condition_errors(backend, latents, states, timesteps, noise, config.batch_size, config.precision,
                            fixed_shape=config.compile, per_draw=per_draw)


def typicality_latent_maps(backend: Backend, pixels: torch.Tensor, label_prompts: list[str], null_prompt: str,
                           config: TypicalityConfig, units: bool = False, first: int = 0):
    """Typicality of a batch of same-size images, each under its own label.

    Args:
        pixels: (B, 3, H, W) in [-1, 1]
        label_prompts: B prompt strings
        first: the first of the draws used (see :func:`prompt_errors`)
    Returns:
        (B, h, w) float32 on the latent grid; with ``units``, also (B, U, h, w): the maps of the
        independent units of the draws (:func:`draw_units`), whose mean is the map for even K
    """
    errors = prompt_errors(backend, pixels, [[p, null_prompt] for p in label_prompts], config, per_draw=units, first=first)
    if not units:
        return typicality_from_errors(errors)
    per_draw = typicality_from_errors(errors)  # (B, K, h, w)
    return per_draw.mean(1), draw_units(per_draw, config.estimator)


# ----------------------------------------------------------------------------------------------
# the step: sharded, resumable, data-parallel


SHARD_SCHEMA = pa.schema([
    ("index", pa.int64()), ("image_id", pa.string()), ("path", pa.string()), ("label", pa.string()),
    ("fingerprint", pa.string()), ("height", pa.int32()), ("width", pa.int32()), ("key", pa.string()),
    ("mean", pa.float32()), ("max", pa.float32()), ("status", pa.string()), ("problem", pa.string()),
    ("draws", pa.int32()),  # the (t, eps) draws the image's map averages (0: no map)
])


def compute_shard(backend: Backend, images: pd.DataFrame, maps_of: MapsOf, conditions: int,
                  config: TypicalityConfig, resolution: int, resize: str, progress=None) -> tuple[dict, list[dict]]:
    """Per-pixel maps of one shard's images. Returns (maps by key, index rows).

    ``maps_of(backend, pixels, labels)`` -> (B, h, w): the maps of a batch of same-size images
    of the given labels (typicality, or a contrast), or (maps, (B, U, h, w) unit maps) stored
    beside them under :func:`unit_key`; ``conditions``: the prompts it scores per
    image, so that a batch holds about ``batch_size`` UNet inputs.
    """
    maps, rows = {}, []
    records = images.to_dict("records")
    per_batch = max(1, (config.batch_size or backend.inputs_per_pass) // (conditions * config.samples))
    # an image edited since it was listed is refused: its map would be stored under the listed fingerprint
    for positions, batch in image_batches([r["path"] for r in records], resolution, resize, backend.latent_factor,
                                          per_batch, config.workers, listed_of(images)):
        if isinstance(batch, BadImage):
            r = records[positions[0]]
            rows.append(dict(index=r["index"], image_id=r["image_id"], path=r["path"], label=r["label"],
                             fingerprint=r["fingerprint"], height=0, width=0, key="", mean=float("nan"),
                             max=float("nan"), status=bad_status(batch), problem=batch.problem, draws=0))
        else:
            out = maps_of(backend, to_model_input(batch), [records[i]["label"] for i in positions])
            # a map function may also give each image's unit maps (typicality's standard errors)
            out, units = (out[0].cpu().numpy(), out[1].cpu().numpy()) if isinstance(out, tuple) else (out.cpu().numpy(), None)
            for n, (i, latent_map) in enumerate(zip(positions, out)):
                r = records[i]
                key = str(i)
                maps[key] = latent_map.astype(config.map_dtype)
                if units is not None:
                    maps[unit_key(key)] = units[n].astype(config.map_dtype)
                rows.append(dict(index=r["index"], image_id=r["image_id"], path=r["path"], label=r["label"],
                                 fingerprint=r["fingerprint"], height=batch.shape[1], width=batch.shape[2], key=key, mean=float(latent_map.mean()),
                                 max=float(latent_map.max()), status="ok", problem=None, draws=config.samples))
        if progress is not None:
            progress.update(len(positions))
    rows.sort(key=lambda r: r["index"])
    return maps, rows


def unit_key(key: str) -> str:
    """The shard key of an image's unit maps (U, h, w), beside its map's ``key``."""
    return f"{key}/units"


def bad_status(problem: BadImage) -> str:
    """"unreachable" for an image whose problem may be fixed while the listing stays (could not be
    read: missing, unmounted, no permission; or changed since listing: put back): it is retried by
    the next run; "bad" for one that was read as listed and cannot be used (corrupt, too large)."""
    return "unreachable" if problem_may_be_fixed(problem.problem) else "bad"


def run_typicality(run, backend: Backend, config: TypicalityConfig, process_index: int = 0, num_processes: int = 1,
                   progress: bool = True, adaptive=None) -> int:
    """Compute the typicality maps the run's listing still lacks; returns how many shards this
    process wrote (see :func:`run_maps`; the adaptive estimator: ``adaptive.run_adaptive``, with
    ``adaptive`` its ``AdaptiveConfig``)."""
    if config.estimator == "adaptive":
        from .adaptive import AdaptiveConfig, run_adaptive

        return run_adaptive(run, backend, config, adaptive or AdaptiveConfig(), process_index, num_processes, progress)
    maps_of = typicality_maps_of(run, config)
    return run_maps(run, backend, config, run.typicality_dir, run.typicality_index(missing_ok=True), run.images(),
                    maps_of, 2, "typicality", process_index, num_processes, progress)


def typicality_maps_of(run, config: TypicalityConfig, first: int = 0) -> MapsOf:
    """The :data:`MapsOf` of the run's typicality: each image under its label's prompt and the null
    prompt, with the unit maps when ``config.unit_maps``; draws ``first`` .. ``config.samples - 1``."""
    prompt_of = {label: run.prompt(label) for label in run.labels}
    null_prompt = run.prompt(None)

    def maps_of(backend, pixels, labels):
        return typicality_latent_maps(backend, pixels, [prompt_of[label] for label in labels], null_prompt, config,
                                      config.unit_maps, first)

    return maps_of


def run_maps(run, backend: Backend, config: TypicalityConfig, directory, index: pd.DataFrame | None,
             images: pd.DataFrame, maps_of: MapsOf, conditions: int, desc: str, process_index: int = 0,
             num_processes: int = 1, progress: bool = True) -> int:
    """Compute the maps of ``images`` that ``directory``'s ``index`` still lacks (typicality, a
    contrast); returns how many shards this process wrote.

    The images without a result (new, or unreachable last time) are cut into shards in listing
    order, dealt round-robin to processes; each shard is computed whole by one process and written
    atomically, so a killed run resumes with the shards it lacks (the same images in the same
    shards) and a multi-process run equals a single-process one bit for bit.
    """
    dataset = run.step_config("dataset")
    done = set() if index is None else set(index.loc[index["status"] != "unreachable", "image_id"])
    todo = images[~images["image_id"].isin(done)].reset_index(drop=True)
    shards = plan_new_shards(directory, len(todo), config.shard_size)
    _barrier(num_processes)  # every process planned before any writes
    mine = shards[process_index::num_processes]
    backend.denoiser.eval()
    bar = tqdm(total=sum(rows.stop - rows.start for _, rows in mine),
               desc=f"{desc} [{process_index}]" if num_processes > 1 else desc,
               unit="img", position=process_index, disable=not progress)
    planned = [name for name, _ in shards]

    def show_overall():
        # process 0 shows the whole run's progress without communicating: every finished shard's
        # index is on disk (written last, by rename, so a half-written shard is not counted)
        if process_index == 0 and num_processes > 1:
            finished = sum((directory / f"{name}.parquet").is_file() for name in planned)
            bar.set_postfix_str(f"all processes: {finished}/{len(planned)} shards")

    show_overall()
    with compiled(backend, config.compile and bool(mine)):
        for name, chunk in mine:
            maps, rows = compute_shard(backend, todo.iloc[chunk], maps_of, conditions, config,
                                       dataset["resolution"], dataset["resize"], bar)
            write_shard(directory, name, maps, rows, SHARD_SCHEMA)
            show_overall()
    bar.close()
    _barrier(num_processes)
    return len(mine)


def _barrier(num_processes: int) -> None:
    if num_processes > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
