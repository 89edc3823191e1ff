"""Translation across labels (paper section 5.1): each image as it would look under every other label.

The translations make a parallel dataset x^{c0 -> c}: the same scene under each label, on which
co-typical elements are mined (``cotypicality.py``).

Plug-and-Play (Tumanyan et al., CVPR 2023), the default: the source latent is DDIM-inverted
under its own label's prompt; generation under the target prompt (classifier-free guidance
against the null prompt) starts from the inverted noise while a source branch replays the
inversion trajectory in the same batch, and forward hooks copy the source branch's activations
into the target branches: the residual features of ``up_blocks[1].resnets[1]`` for the first 80%
of the steps, the self-attention queries and keys of up-blocks 1-3 for the first 50%. The
structure of the scene comes from the source; what the label changes comes from the prompt.
``strength`` < 1 inverts only that fraction of the trajectory (keeps more of the source, changes
less; measured on the embedded model: 0.5-0.7 keep the scene but add no element).

SDEdit (Meng et al., ICLR 2022), the cheap option: noise the source to ``strength`` of the
trajectory and sample back under the target prompt; no inversion, no source branch.

Both are deterministic: DDIM with eta = 0, and SDEdit's noise is drawn from the seed and the
latent shape only. Results are stored in shards like typicality (resumable):

    RUN/translations/shard-00000.safetensors   one (H, W, 3) uint8 image per key PLACE/LABEL
    RUN/translations/shard-00000.parquet       image_id, source_label, target_label, key, status

Shard s holds source images s * shard_size onwards (``source_images`` order), PLACE an image's
place in it. A source that could not be read, or changed since listing, gets a bad row per target
label. Such a problem may be fixed while the listing stays (``data.problem_may_be_fixed``): the
result records those images as left out, so the next ``diffmine translate`` retries them
(``shards.retry_in_shard``, as co-typicality retries its scenes): each one now readable as listed
is translated under the key it would have had, and its shard rewritten with its rows in place of
the bad ones, every other row and array kept as stored. The shard then holds what a run on the
fixed files makes, up to rounding: the image is translated in a batch of its own, not its shard's,
and CPU kernels may round another batch shape otherwise (measured: one grey level at a few pixels,
or none; the other rows bit for bit). Unlike typicality, which retries
such images in new shards that readers prefer to the failed rows (``rundir.current_rows``),
translations keep one row per translation, in the shard its place names.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm import tqdm

from .data import BadImage, Problem, image_batches, listed_of, to_model_input
from .models import Backend
from .shards import images_to_retry, missing_shards, positional_shards, retry_in_shard, write_shard
from .typicality import autocast, draw_noise

METHODS = ("pnp", "sdedit")


@dataclass
class TranslateConfig:
    method: str = "pnp"
    images: int = 0  # source images per label (0: all); the most typical mined images first
    to: str = "all"  # target labels: all, or a comma-separated list
    steps: int = 50
    guidance: float = 7.5
    feature_injection: float = 0.8  # fraction of sampling steps with the source's residual features
    attention_injection: float = 0.5  # fraction with the source's self-attention queries and keys
    feature_block: int = 1  # the residual features of up_blocks[feature_block].resnets[feature_resnet]
    feature_resnet: int = 1
    attention_blocks: str = "1,2,3"  # up-blocks whose self-attention q/k are injected (absent ones skipped)
    # fraction of the trajectory inverted (pnp) or noised (sdedit) and regenerated; None: the
    # method's own default, 1.0 for pnp (full inversion, as the authors) and 0.6 for sdedit
    strength: float | None = None
    batch_size: int = 8  # translations per forward pass (times 3 branches for pnp)
    shard_size: int = 64  # source images per stored shard
    # fp32 by default: DDIM inversion compounds its rounding over every step (not measured in
    # bf16 yet); auto / bf16 / fp16 are accepted
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.strength is None:
            self.strength = 1.0 if self.method == "pnp" else 0.6
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        for name in ("feature_injection", "attention_injection"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.images < 0 or self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("images must be >= 0 (0: all), batch_size and shard_size >= 1")
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be a number, got {self.guidance}")
        if not all(b.strip().isdigit() for b in self.attention_blocks.split(",") if b.strip()):
            raise ValueError(f"attention_blocks must be up-block numbers separated by commas, got {self.attention_blocks!r}")


# ----------------------------------------------------------------------------------------------
# pure functions on tensors


def ddim_timesteps(num_train_timesteps: int, steps: int, strength: float = 1.0) -> torch.Tensor:
    """Ascending timesteps of a ``steps``-step DDIM grid ending at the last training timestep,
    cut to its first ``strength`` fraction (at least one step): (ceil(strength * steps),) int64."""
    grid = torch.linspace(0, num_train_timesteps - 1, steps + 1)[1:].round().long()
    return grid[:max(1, math.ceil(strength * steps))]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM update (eta = 0) between two noise levels, either direction.

    ``alpha_*`` are cumulative alphas (scalars or (B, 1, 1, 1)); from the predicted clean latent
    x0 = (x - sqrt(1 - a_from) eps) / sqrt(a_from), returns sqrt(a_to) x0 + sqrt(1 - a_to) eps.
    """
    x0 = (x - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
    return alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps


def _alpha(backend: Backend, timestep: int | None) -> torch.Tensor:
    """Cumulative alpha at ``timestep``; None is the clean end of the trajectory (alpha = 1)."""
    if timestep is None:
        return torch.tensor(1.0, device=backend.device)
    return backend.scheduler.alphas_cumprod[int(timestep)].to(device=backend.device, dtype=torch.float32)


def _eps(backend: Backend, x: torch.Tensor, timestep: int, states: torch.Tensor, precision: str) -> torch.Tensor:
    with autocast(x.device, precision):
        out = backend.denoiser(x, torch.full((len(x),), int(timestep), device=x.device), states)
    return out.float()


@torch.inference_mode()
def ddim_invert(backend: Backend, latents: torch.Tensor, states: torch.Tensor, timesteps: torch.Tensor,
                precision: str = "fp32") -> list[torch.Tensor]:
    """DDIM inversion: the trajectory from clean latents up to the last timestep.

    Args:
        latents: (B, C, h, w) clean latents; states: (B, L, D) the prompt they are inverted under
        timesteps: (N,) ascending, from :func:`ddim_timesteps`
    Returns:
        N tensors (B, C, h, w): the latent at each timestep
    """
    x, trajectory, previous = latents, [], None
    for t in timesteps.tolist():
        eps = _eps(backend, x, t, states, precision)
        x = ddim_step(x, eps, _alpha(backend, previous), _alpha(backend, t))
        trajectory.append(x)
        previous = t
    return trajectory


class SourceInjection:
    """Forward hooks that overwrite the target branches' activations with the source branch's.

    The batch is laid out as [source, unconditional target, conditional target], B rows each;
    while a flag is on, the hooked module's output is replaced by its first B rows, repeated.
    ``features`` drives the residual block's output, ``attention`` the ``to_q`` / ``to_k``
    projections of the self-attention layers (their values stay the target's own).
    """

    def __init__(self, unet: torch.nn.Module, feature_block: int, feature_resnet: int, attention_blocks: list[int]):
        self.features = False
        self.attention = False
        self.handles = []
        self.attention_layers = 0
        ups = unet.up_blocks
        self.features_hooked = 0 <= feature_block < len(ups) and 0 <= feature_resnet < len(ups[feature_block].resnets)
        if self.features_hooked:
            module = ups[feature_block].resnets[feature_resnet]
            self.handles.append(module.register_forward_hook(self._hook("features")))
        for b in attention_blocks:
            if not 0 <= b < len(ups):
                continue
            for module in ups[b].modules():
                # diffusers' Attention; self-attention is the one without a cross-attention input
                if hasattr(module, "to_q") and not getattr(module, "is_cross_attention", True):
                    self.handles.append(module.to_q.register_forward_hook(self._hook("attention")))
                    self.handles.append(module.to_k.register_forward_hook(self._hook("attention")))
                    self.attention_layers += 1

    def _hook(self, flag: str):
        def hook(_module, _inputs, output):
            if not getattr(self, flag):
                return None
            rows = output.shape[0] // 3
            return output[:rows].repeat(3, *([1] * (output.dim() - 1)))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def check_injection(unet, config: TranslateConfig) -> None:
    """ValueError where Plug-and-Play would inject nothing it was asked to: ``--feature-block`` /
    ``--feature-resnet`` not a residual block of the model, or no self-attention layer in
    ``--attention-blocks`` (each absent block alone is skipped: SD has 4 up-blocks, the embedded
    model 3). Before the step's record: a refused flag leaves the translations as they are."""
    if config.method != "pnp":
        return
    injection = SourceInjection(unet, config.feature_block, config.feature_resnet, _attention_blocks(config))
    injection.remove()
    ups = unet.up_blocks
    if config.feature_injection > 0 and not injection.features_hooked:
        sizes = ", ".join(f"{b}: 0..{len(block.resnets) - 1}" for b, block in enumerate(ups))
        raise ValueError(f"--feature-block {config.feature_block} --feature-resnet {config.feature_resnet}: no such "
                         f"residual block in the model (up-block: resnets {sizes})")
    if config.attention_injection > 0 and not injection.attention_layers:
        raise ValueError(f"--attention-blocks {config.attention_blocks}: no self-attention layer there (the model "
                         f"has up-blocks 0..{len(ups) - 1})")


def _attention_blocks(config: TranslateConfig) -> list[int]:
    return [int(b) for b in config.attention_blocks.split(",") if b.strip()]


@contextmanager
def source_injection(unet, config: TranslateConfig):
    injection = SourceInjection(unet, config.feature_block, config.feature_resnet, _attention_blocks(config))
    try:
        yield injection
    finally:
        injection.remove()


@torch.inference_mode()
def pnp_translate(backend: Backend, latents: torch.Tensor, source_states: torch.Tensor, target_states: torch.Tensor,
                  null_states: torch.Tensor, config: TranslateConfig) -> torch.Tensor:
    """Plug-and-Play translation of each latent to its target prompt.

    Args:
        latents: (B, C, h, w) clean source latents
        source_states, target_states, null_states: (B, L, D) prompt states
    Returns:
        (B, C, h, w) translated clean latents
    """
    timesteps = ddim_timesteps(backend.scheduler.config.num_train_timesteps, config.steps, config.strength)
    trajectory = ddim_invert(backend, latents, source_states, timesteps, config.precision)
    x = trajectory[-1]
    states = torch.cat([source_states, null_states, target_states])
    with source_injection(backend.unet, config) as injection:
        for step, i in enumerate(range(len(timesteps) - 1, -1, -1)):
            t = int(timesteps[i])
            injection.features = step < config.feature_injection * len(timesteps)
            injection.attention = step < config.attention_injection * len(timesteps)
            # the source branch replays the inversion at this timestep
            eps = _eps(backend, torch.cat([trajectory[i], x, x]), t, states, config.precision)
            _, eps_null, eps_target = eps.chunk(3)
            guided = eps_null + config.guidance * (eps_target - eps_null)
            previous = int(timesteps[i - 1]) if i > 0 else None
            x = ddim_step(x, guided, _alpha(backend, t), _alpha(backend, previous))
    return x


@torch.inference_mode()
def sdedit_translate(backend: Backend, latents: torch.Tensor, target_states: torch.Tensor, null_states: torch.Tensor,
                     config: TranslateConfig) -> torch.Tensor:
    """SDEdit: noise to ``strength`` of the trajectory, then guided DDIM back under the target prompt.

    Shapes as in :func:`pnp_translate`.
    """
    T = backend.scheduler.config.num_train_timesteps
    timesteps = ddim_timesteps(T, config.steps, config.strength)
    _, noise = draw_noise(config.seed, 1, tuple(latents.shape[1:]), T, estimator="paper")
    a = _alpha(backend, int(timesteps[-1]))
    x = a.sqrt() * latents + (1 - a).sqrt() * noise.to(latents.device)
    states = torch.cat([null_states, target_states])
    for i in range(len(timesteps) - 1, -1, -1):
        t = int(timesteps[i])
        eps_null, eps_target = _eps(backend, torch.cat([x, x]), t, states, config.precision).chunk(2)
        guided = eps_null + config.guidance * (eps_target - eps_null)
        previous = int(timesteps[i - 1]) if i > 0 else None
        x = ddim_step(x, guided, _alpha(backend, t), _alpha(backend, previous))
    return x


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    scaled = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def translate_pixels(backend: Backend, pixels: torch.Tensor, source_prompts: list[str], target_prompts: list[str],
                     null_prompt: str, config: TranslateConfig) -> np.ndarray:
    """Translate each image from its source prompt to its target prompt.

    Args:
        pixels: (B, 3, H, W) in [-1, 1]
    Returns:
        (B, H, W, 3) uint8
    """
    with torch.inference_mode():
        latents = backend.encode_images(pixels.to(backend.device)).float()
        target = backend.encode_prompts(target_prompts)
        null = backend.encode_prompts([null_prompt]).expand_as(target)
        if config.method == "pnp":
            out = pnp_translate(backend, latents, backend.encode_prompts(source_prompts), target, null, config)
        else:
            out = sdedit_translate(backend, latents, target, null, config)
        return to_uint8(backend.decode_latents(out))


# ----------------------------------------------------------------------------------------------
# the step: sharded and resumable


SHARD_SCHEMA = pa.schema([
    ("index", pa.int64()), ("image_id", pa.string()), ("path", pa.string()), ("source_label", pa.string()),
    ("target_label", pa.string()), ("height", pa.int32()), ("width", pa.int32()), ("key", pa.string()),
    ("status", pa.string()), ("problem", pa.string()),
])


def target_labels(labels: list[str], to: str) -> list[str]:
    if to == "all":
        return list(labels)
    wanted = [label.strip() for label in to.split(",") if label.strip()]
    unknown = [label for label in wanted if label not in labels]
    if unknown:
        raise ValueError(f"unknown target label(s) {unknown}; the run's labels are {labels}")
    if not wanted or len(set(wanted)) != len(wanted):
        raise ValueError(f"--to needs all or distinct labels of the run, comma-separated; got {to!r}")
    return wanted


def source_images(run, per_label: int) -> pd.DataFrame:
    """The images to translate: mined images (most typical first) when the run has mined, else all."""
    images = run.images()
    if run.patches_path.is_file():
        order = list(dict.fromkeys(run.mined_patches("top")["image_id"]))
        images = images.set_index("image_id").loc[order].reset_index()
    if per_label > 0:
        images = images.groupby("label", sort=True).head(per_label)
    return images.reset_index(drop=True)


def compute_shard(backend: Backend, images: pd.DataFrame, targets: list[str], prompt_of: dict[str, str],
                  null_prompt: str, config: TranslateConfig, resolution: int, resize: str, progress=None):
    """Translations of one shard's images to every target label but their own. Returns (arrays, rows).

    ``images``: rows of the listing, indexed by their place in the shard, which names their
    arrays (``PLACE/LABEL``): a shard's image translated on its own gets the key it gets with the others."""
    arrays, rows = {}, []
    records = images.to_dict("records")
    places = images.index.tolist()
    per_batch = max(1, config.batch_size // max(1, len(targets) - 1))
    for positions, batch in image_batches([r["path"] for r in records], resolution, resize, backend.latent_factor, per_batch,
                                          listed=listed_of(images)):
        if isinstance(batch, BadImage):
            r = records[positions[0]]
            rows += [dict(index=r["index"], image_id=r["image_id"], path=r["path"], source_label=r["label"],
                          target_label=c, height=0, width=0, key="", status="bad", problem=batch.problem)
                     for c in targets if c != r["label"]]
        else:
            pairs = [(n, c) for n, i in enumerate(positions) for c in targets if c != records[i]["label"]]
            if pairs:
                pixels = to_model_input(batch)[[n for n, _ in pairs]]
                sources = [prompt_of[records[positions[n]]["label"]] for n, _ in pairs]
                out = translate_pixels(backend, pixels, sources, [prompt_of[c] for _, c in pairs], null_prompt, config)
                for (n, c), image in zip(pairs, out):
                    r = records[positions[n]]
                    key = f"{places[positions[n]]}/{c}"
                    arrays[key] = image
                    rows.append(dict(index=r["index"], image_id=r["image_id"], path=r["path"], source_label=r["label"],
                                     target_label=c, height=image.shape[0], width=image.shape[1], key=key,
                                     status="ok", problem=None))
        if progress is not None:
            progress.update(len(positions))
    rows.sort(key=row_order)
    return arrays, rows


def row_order(row: dict) -> tuple:
    """The order of a shard's index rows: by source image (listing order), then target label."""
    return row["index"], row["target_label"]


def missing_translations(run, config: TranslateConfig) -> list[tuple[str, slice]]:
    """The shards of RUN/translations still to compute for ``config``."""
    return missing_shards(run.translations_dir, len(source_images(run, config.images)), config.shard_size)


def run_translate(run, backend: Backend, config: TranslateConfig, progress: bool = True) -> int:
    """Translate the run's (mined) images to the target labels; returns the number of shards written.

    Resumable: the shards already in RUN/translations belong to these settings (the pipeline's
    lineage record clears them when settings, model or mining change). The images a shard left out
    with a problem that may be fixed since are retried first (``shards.retry_in_shard``): those now
    readable as listed are translated and their rows replace the bad ones; no other image is
    translated again."""
    dataset = run.step_config("dataset")
    targets = target_labels(dataset["labels"], config.to)
    directory = run.translations_dir
    images = source_images(run, config.images)
    prompt_of = {label: run.prompt(label) for label in dataset["labels"]}
    retry = images_to_retry(directory)
    todo = missing_translations(run, config)
    backend.denoiser.eval()
    bar = tqdm(total=sum(map(len, retry.values())) + sum(rows.stop - rows.start for _, rows in todo),
               desc=f"translate ({config.method})", unit="img", disable=not progress)

    def translate(shard_images: pd.DataFrame):
        return compute_shard(backend, shard_images, targets, prompt_of, run.prompt(None), config,
                             dataset["resolution"], dataset["resize"], bar)

    def shard_images(chunk: slice) -> pd.DataFrame:
        return images.iloc[chunk].reset_index(drop=True)  # indexed by place in the shard

    shards = dict(positional_shards(len(images), config.shard_size))
    rewritten = sum(retry_in_shard(directory, name, shard_images(shards[name]), retried, translate, SHARD_SCHEMA,
                                   row_order) for name, retried in retry.items())
    for name, chunk in todo:
        arrays, rows = translate(shard_images(chunk))
        write_shard(directory, name, arrays, rows, SHARD_SCHEMA)
    bar.close()
    run.forget_translations()
    # the images left out (unreadable, or changed since listing: a bad row per target label), this
    # call's shards and those of a run it resumed: one line each, recorded as problems of step translate
    index = run.translations_index()
    bad = index[index["status"] == "bad"].drop_duplicates("image_id")
    run.report_skipped("translate", [Problem(r.image_id, r.path, r.problem) for r in bad.itertuples()])
    return rewritten + len(todo)
