"""Command-line flags from config dataclasses: one option per field, so a flag and its default
live in one place (the step's config). Used by the CLI and by the baselines' sub-commands."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .machine import PRECISIONS
from .mining import TESTS
from .rerun import field_kind
from .rerun import flag as _flag  # one option per field: the re-run hints name the same options
from .train import LR_SCHEDULES, MIXED_PRECISIONS
from .translate import METHODS
from .typicality import ESTIMATORS

HELP = {
    "steps": "optimizer steps (training resumes from the last checkpoint up to this many)",
    # one field name, a meaning per step: a dict gives each config's own text (by class name)
    "batch_size": {"TrainConfig": "images per optimizer step and process (>= 1; N GPUs under accelerate: N times "
                                  "as many per step)",
                   "TypicalityConfig": "UNet inputs per forward pass, all conditions counted (0: the backend's "
                                       "choice, 64 on CPU, 256 on GPU)",
                   "FeatureConfig": "images per forward pass of the DIFT features (>= 1; times the ensemble)"},
    "learning_rate": "AdamW learning rate (default: the backend's)",
    "p_uncond": "probability of replacing the label prompt with the null prompt in training",
    "mixed_precision": "accelerate's mixed precision of training",
    "ema_decay": "keep an EMA of the weights (e.g. 0.999; 0 = off)",
    "checkpoint_every": "save a resumable checkpoint every N steps",
    "keep_checkpoints": "how many checkpoints to keep",
    "samples": "K, the number of (t, eps) draws per image",
    "typicality_samples": "K, the number of (t, eps) draws per image; with --estimator adaptive the per-image cap "
                          "(not given: 16, and 64 with --estimator adaptive)",
    "t_min": "lower end of the diffusion time range (fraction of T)",
    "t_max": "upper end of the diffusion time range (fraction of T)",
    "estimator": f"{' | '.join(ESTIMATORS)}: 'paper' draws t and eps i.i.d.; 'stratified' one t per stratum; "
                 "'stratified-antithetic' also pairs eps with -eps; 'adaptive' (typicality): --adaptive-first-draws for "
                 "every image, then up to --samples only for images whose patches can still enter the mined top",
    "first_draws": "adaptive estimator: draws every image gets in the first round (even, >= 4); doubled per round "
                   "for the images still undecided",
    "bound": "adaptive estimator: half-width, in standard errors, of the confidence bound of a candidate in the "
             "label's top: its image gets more draws while score - bound x se is below the best candidate left out",
    "bound_out": "adaptive estimator: the same for a candidate out of the top: its image gets more draws while "
                 "score + bound_out x se reaches the worst candidate in",
    "budget": "adaptive estimator: mean draws per image the rounds may spend at most (0: no limit; 16 = the "
              "default estimator's cost)",
    "tight_bound": "adaptive estimator: the bound in of a round whose undecided images would take more than half "
                   "the budget left: it refines those undecided at the tight bounds, most uncertain first, while they fit",
    "tight_bound_out": "adaptive estimator: the bound out of such a round",
    "shard_size": "images per stored shard (unit of work and resume)",
    "map_dtype": "storage precision of typicality maps (float16 | float32)",
    "precision": "auto | fp32 | bf16 | fp16 autocast of the UNet forward (auto: bf16 where the CPU/GPU computes it natively, else fp32)",
    "workers": "image-decoding processes prefetching ahead of the model",
    "compile": "torch.compile the UNet (~1.1-1.25x per pass on CPU after 1-1.5 minutes of compiling)",
    "patch": "patch side in pixels (default: about 1/5 of the image side)",
    "per_image": "non-overlapping patches kept per image",
    "top": "most typical patches kept per label",
    "least": "least typical patches kept per label (comparison)",
    "random": "random patches kept per label (comparison)",
    "k": "k-means clusters per label (0: ceil(patches / --members), at most --k-max)",
    "members": "patches per cluster of the automatic k (before near-duplicates merge)",
    "k_max": "most clusters per label of the automatic k",
    "merge": "join clusters whose centroids' cosine similarity is at least this (above 1: never)",
    "rank": "cluster ranking: median | median-coverage | discriminative (median x (coverage - coverage of other labels))",
    "min_size": "clusters with fewer members rank after all others",
    "match_quantile": "a patch matches a cluster (coverage) above this quantile of the members' similarity to the centroid",
    "significance": "keep a mined patch only if its typicality is --z-min standard errors above zero",
    "z_min": "z threshold of the significance filter (typicality / its standard error over the draws)",
    "errors": "standard error of a patch: stratified (noise from successive differences of the t-ordered units, "
              "blind to typicality's trend in t; the stratified estimators) | iid (spread of the unit scores: "
              "counts the trend as noise, the 0.1 behaviour)",
    "significance_test": "which test keeps a mined patch: z (its own z >= --z-min) | flip (its image's sign-flip "
                         "test of the best box, selection included: p <= --alpha; see mining's doc)",
    "alpha": "level of the flip test (--significance-test flip): the chance that an image without typicality "
             "keeps a patch",
    "flips": "flip test: sign patterns of the units, all 2^U where there are at most this many, else this many at random",
    "unit_maps": "also store per-pair maps, for the standard error of patch typicality (mining's significance filter)",
    "t": "diffusion time of the DIFT features (fraction of T)",
    "block": "UNet up-block whose output gives the features (default: the backend's)",
    "ensemble": "noise draws averaged per DIFT feature",
    "per_label": "images per label (0: all), a seeded random choice",
    "guest": "index of a label whose element is also planted into the other labels' images (-1: none)",
    "guest_share": "share of every other label's images that carry the guest element",
    "labels": "number of labels (each with its planted element)",
    "size": "image side in pixels",
    "distractors": "shapes shared by every label, drawn in each image",
    "element_scale": "size of the planted element relative to the default (about 1/5 of the side)",
    "seed": "seed of every random choice",
    "weight_decay": "AdamW weight decay",
    "warmup_steps": "linear learning-rate warm-up steps",
    "lr_schedule": "learning rate after the warm-up: constant | cosine | linear (cosine, linear: decay to 0 at "
                   "--steps; more --steps later stretch the decay from the step reached)",
    "snr_gamma": "min-SNR-gamma loss weighting (Hang et al. 2023): each sample's loss times min(SNR, gamma) / SNR "
                 "(e.g. 5; 0: off)",
    "grad_clip": "clip the gradient norm to this (inf: no clipping)",
    "grad_accumulation": "micro-batches accumulated per optimizer step",
    "gradient_checkpointing": "recompute activations in the backward pass (SD: less memory, slower)",
    "hflip": "random horizontal flips (seeded per step)",
    "random_crop": "crop up to this fraction of each side away, resized back (seeded per step; 0: off)",
    "cache_latents": "encode each image once (SD's VAE is costly); no augmentation then",
    "minibatch_above": "use mini-batch k-means above this many patches",
    "feature_block": "Plug-and-Play: up-block whose residual features are injected",
    "feature_resnet": "Plug-and-Play: resnet of that up-block",
    "attention_blocks": "Plug-and-Play: up-blocks whose self-attention q/k are injected (comma-separated)",
}


# classify and contrast draw the same K for every image: every estimator but the adaptive one
FIXED_ESTIMATORS = tuple(e for e in ESTIMATORS if e != "adaptive")
FIXED_ESTIMATOR_HELP = (f"{' | '.join(FIXED_ESTIMATORS)}: 'paper' draws t and eps i.i.d.; "
                        "'stratified' one t per stratum; 'stratified-antithetic' also pairs eps with -eps (no adaptive "
                        "estimator here)")


# the adaptive estimator's targets on `diffmine typicality` (`run` and `demo` take mining's flags)
ADAPTIVE_HELP = {
    "patch": "adaptive estimator: the mining patch side its draws target (None: mining's automatic side)",
    "per_image": "adaptive estimator: the mining --per-image its draws target",
    "top": "adaptive estimator: the mining --top (per label) its draws target",
    "z_min": "adaptive estimator: the mining --z-min its draws target",
    "significance": "adaptive estimator: whether mining's significance filter is targeted",
}


def seed_int(text: str) -> int:
    """argparse type of ``--seed``: numpy's generators take no negative seed (it failed deep in a
    step, after the step had dropped its record)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# the values a string field may take, checked by argparse before any config is built (the configs
# check them too, for the Python API); ``add_config(choices=...)`` narrows them for one parser
CHOICES = {"estimator": ESTIMATORS, "precision": PRECISIONS, "method": METHODS, "mixed_precision": MIXED_PRECISIONS,
           "lr_schedule": LR_SCHEDULES, "significance_test": TESTS}


def add_config(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple[str, ...] = ("seed",),
               help: dict[str, str] | None = None, defaults: dict | None = None,
               choices: dict[str, tuple] | None = None) -> None:
    """One option per dataclass field, e.g. ``TypicalityConfig.t_min`` -> ``--t-min``; ``help``
    overrides the shared help text of a field for this parser, ``defaults`` its default (shown as such),
    ``choices`` the values it accepts (else :data:`CHOICES`')."""
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = (defaults or {}).get(field.name, field.default)
        kind = field_kind(field)
        shared = HELP.get(field.name, "")
        if isinstance(shared, dict):  # the text of the config's class, or of the class it extends
            shared = next((shared[k.__name__] for k in cls.__mro__ if k.__name__ in shared), "")
        help_text = (help or {}).get(field.name, shared)
        dest = prefix.replace("-", "_") + field.name
        if kind is bool:
            parser.add_argument(_flag(field.name, prefix), dest=dest, action=argparse.BooleanOptionalAction,
                                default=default, help=f"{help_text} (default: {'on' if default else 'off'})".strip())
        elif isinstance(default, tuple):  # e.g. scales: (1.0, 0.75) <- --scales 1.0 0.75
            parser.add_argument(_flag(field.name, prefix), dest=dest, type=type(default[0]), nargs="+",
                                default=list(default), help=f"{help_text} (default: {' '.join(map(str, default))})")
        else:
            # a help text may say the default in words (a None resolved later)
            said = any(words in help_text for words in ("(default:", "(not given:", "(None:"))
            shown = "" if said else f" (default: {default})"
            parser.add_argument(_flag(field.name, prefix), dest=dest,
                                type=seed_int if field.name == "seed" else kind or str, default=default,
                                choices=(choices or {}).get(field.name, CHOICES.get(field.name)),
                                help=f"{help_text}{shown}".strip())


def build_config(cls, args: argparse.Namespace, prefix: str = ""):
    values = {}
    for field in dataclasses.fields(cls):
        dest = prefix.replace("-", "_") + field.name
        if field.name == "seed":
            values["seed"] = args.seed
        elif hasattr(args, dest):
            values[field.name] = getattr(args, dest)
        elif prefix and field.name in HELP and hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)  # shared flag, e.g. --samples in `run`
    return cls(**values)


def add_run_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    """``--run`` (required), ``--force`` and, with ``seed``, ``--seed``: the flags of every step."""
    p.add_argument("--run", required=True, type=Path, help="the run directory")
    if seed:
        p.add_argument("--seed", type=seed_int, default=0, help="seed of every random choice of this step (default: 0)")
    p.add_argument("--force", action="store_true",
                   help="replace stored results made with other settings or inputs (a trained model too)")
