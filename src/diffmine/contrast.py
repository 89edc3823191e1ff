"""Contrast: which pixels make an image look like label A rather than label B.

    C(x | A, B) = E_{t, eps} [ L_t(x, eps, B) - L_t(x, eps, A) ]

per latent pixel, with the SAME (t, eps) draws in both terms, drawn as typicality draws them from
the contrast's own seed, K, time range and estimator (typicality's defaults, not the run's
typicality settings), upsampled to the image. Positive where A's prompt explains the pixel better
than B's. Against every other label at once (``b = None``, ``--vs all``) the map is the smallest
margin, min over B != A of C(x | A, B): positive only where A beats every other label. Typicality
is the special case B = null; both are :func:`typicality.prompt_errors` with other prompts (one
forward pass holds all M conditions of a draw, M = 2 or the number of labels).

The maps are stored, resumed and served like typicality's (RUN/contrast/<digest of the pair>/,
``run.contrast_map(image_id, A, B)``), then mined and clustered by the same code into
RUN/contrast/<digest>/{patches,clusters}.parquet: the elements that make A look unlike B.

Cost per image: K * M UNet inputs, the same as typicality's (K * 2) for a pair; K * |labels| for
``--vs all``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from .models import Backend
from .rundir import current_rows
from .shards import read_index
from .typicality import DEFAULT_SAMPLES, TypicalityConfig, prompt_errors, run_maps

IMAGES = ("A", "all")


@dataclass
class ContrastConfig(TypicalityConfig):
    """How typicality draws (its fields, with its defaults: not the run's typicality settings) plus
    which images to score."""

    samples: int = DEFAULT_SAMPLES  # no adaptive estimator here: K is the draws of every image
    images: str = "A"  # A: the first label's images; all: every listed image

    def __post_init__(self):
        super().__post_init__()
        if self.estimator == "adaptive":
            raise ValueError("contrast maps have no adaptive estimator (it targets typicality's mining); "
                             "use stratified-antithetic")
        if self.images not in IMAGES:
            raise ValueError(f"images must be one of {IMAGES}, got {self.images!r}")


def contrast_from_errors(errors: torch.Tensor) -> torch.Tensor:
    """(B, M, h, w) errors under [A, B1, ..., B_{M-1}] -> (B, h, w) min over j of L(Bj) - L(A)."""
    return (errors[:, 1:] - errors[:, :1]).amin(1)


def contrast_latent_maps(backend: Backend, pixels: torch.Tensor, prompt_a: str, others: list[str],
                         config: TypicalityConfig) -> torch.Tensor:
    """Contrast of a batch of same-size images, A's prompt against each of ``others``.

    Args:
        pixels: (B, 3, H, W) in [-1, 1]
    Returns:
        (B, h, w) float32 on the latent grid
    """
    errors = prompt_errors(backend, pixels, [[prompt_a, *others]] * len(pixels), config)
    return contrast_from_errors(errors)


def other_labels(labels: list[str], a: str, b: str | None) -> list[str]:
    """The labels A is contrasted with: [b], or every other label (b None)."""
    if a not in labels:
        raise ValueError(f"unknown label {a!r} (the run's labels: {', '.join(labels)})")
    if b is not None and b not in labels:
        raise ValueError(f"unknown label {b!r} (the run's labels: {', '.join(labels)})")
    if b == a:
        raise ValueError(f"cannot contrast label {a!r} with itself")
    others = [label for label in labels if label != a] if b is None else [b]
    if not others:
        raise ValueError("--vs all needs at least two labels")
    return others


def contrast_images(run, a: str, images: str) -> pd.DataFrame:
    listing = run.images()
    return listing if images == "all" else listing[listing["label"] == a].reset_index(drop=True)


def contrast_index(run, a: str, b: str | None, images: str = "A") -> pd.DataFrame | None:
    """The stored rows of the chosen images that belong to the current listing (None: no shard)."""
    index = read_index(run.contrast_dir(a, b))
    return None if index is None else current_rows(index, contrast_images(run, a, images))


def missing_contrast(run, a: str, b: str | None, images: str, index: pd.DataFrame | None = None) -> bool:
    """Some chosen image has no map yet, nor a problem (one that may be fixed is retried by the next
    call: the record names it left out); ``index``: :func:`contrast_index` when the caller has read it."""
    index = contrast_index(run, a, b, images) if index is None else index
    return index is None or len(index) < len(contrast_images(run, a, images))


def run_contrast(run, backend: Backend, config: ContrastConfig, a: str, b: str | None, progress: bool = True) -> int:
    """Compute the contrast maps the chosen images lack; returns the shards written."""
    others = other_labels(run.labels, a, b)
    prompt_a, prompts = run.prompt(a), [run.prompt(label) for label in others]

    def maps_of(backend, pixels, labels):
        return contrast_latent_maps(backend, pixels, prompt_a, prompts, config)

    directory = run.contrast_dir(a, b)
    directory.mkdir(parents=True, exist_ok=True)
    return run_maps(run, backend, config, directory, contrast_index(run, a, b, config.images),
                    contrast_images(run, a, config.images), maps_of, 1 + len(others), "contrast", progress=progress)
