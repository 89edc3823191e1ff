"""Backends behind one interface (:class:`~diffmine.models.base.Backend`), chosen by ``--model``:

- ``tiny`` (default): the embedded model, trained from scratch (``models/tiny.py``);
- ``sd:PATH_OR_ID``: Stable Diffusion through diffusers (``models/sd.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .base import BACKEND_FILE, WEIGHTS_FILE, Backend, Denoiser, read_weights

__all__ = ["Backend", "Denoiser", "create_backend", "load_backend", "ModelError"]


class ModelError(ValueError):
    """A model cannot be built or loaded; the message says which and why."""


def create_backend(model: str, prompts: list[str], seed: int = 0, **options) -> Backend:
    """A fresh backend: ``tiny`` (random init) or ``sd:PATH_OR_ID`` (pretrained weights).

    ``prompts`` are every prompt string the model will see (label prompts and the null prompt);
    the embedded model learns one embedding per string.
    """
    if model == "tiny" or model.startswith("tiny:"):
        from .tiny import TinyBackend, TinyConfig

        return TinyBackend(prompts, TinyConfig(**options), seed=seed)
    if model.startswith("sd:"):
        from .sd import StableDiffusionBackend

        return StableDiffusionBackend.from_pretrained(model[3:], **options)
    raise ModelError(f"unknown model {model!r}: use 'tiny' or 'sd:PATH_OR_HUB_ID'")


def load_backend(directory: str | Path) -> Backend:
    """Rebuild a backend saved with :meth:`Backend.save` (``backend.json`` + weights)."""
    directory = Path(directory)
    spec_path = directory / BACKEND_FILE
    if not spec_path.is_file():
        raise ModelError(f"{directory}: no trained model here ({BACKEND_FILE} missing); run `diffmine train` first")
    try:
        spec = json.loads(spec_path.read_text())
        if spec["kind"] == "tiny":
            from .tiny import TinyBackend

            backend = TinyBackend.from_spec(spec)
        elif spec["kind"] == "sd":
            from .sd import StableDiffusionBackend

            backend = StableDiffusionBackend.from_spec(spec)
        else:
            raise ModelError(f"{spec_path}: unknown backend kind {spec['kind']!r}")
    except (KeyError, TypeError, json.JSONDecodeError) as exc:  # edited or damaged by hand
        raise ModelError(f"{spec_path}: not a model description ({type(exc).__name__}: {exc})") from None
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        try:
            state = read_weights(weights)
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise ModelError(f"{weights}: unreadable weights ({type(exc).__name__}: {exc})") from None
        backend.load_trainable_state(state)
    return backend
