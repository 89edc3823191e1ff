"""Backends behind one interface (:class:`~diffmine.models.base.Backend`), chosen by ``--model``:

- ``tiny`` (default): the embedded model, trained from scratch (``models/tiny.py``);
- ``sd:PATH_OR_ID``: Stable Diffusion through diffusers (``models/sd.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..terminal import shell_word
from .base import BACKEND_FILE, WEIGHTS_FILE, Backend, Denoiser, read_weights

__all__ = ["Backend", "Denoiser", "create_backend", "load_backend", "ModelError"]

# in RUN/model: where this machine keeps the base model (and text encoder) the model was trained on,
# written by `diffmine relocate`; no part of the model's identity (backend.json keeps the recorded paths)
LOCATION_FILE = "base-location.json"
# what each relocatable source is called: in backend.json and base-location.json, on the command line
SOURCES = {"base": "--sd-base", "text_encoder": "--text-encoder"}


class ModelError(ValueError):
    """A model cannot be built or loaded; the message says which and why."""


def relocations(directory: str | Path) -> dict:
    """``RUN/model/base-location.json``: {"base": folder, "text_encoder": folder, "unverified": [keys]},
    each source only when relocated (unverified: relocated with --force, no fingerprint to compare);
    {} when there is no such file.

    A received run's file is only paths, checked to be absolute folder paths (never a hub id, which
    could download): loading from one is what loading from backend.json's recorded path would be.
    """
    path = Path(directory) / LOCATION_FILE
    if not path.is_file():
        return {}
    try:
        location = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable ({exc}); run `diffmine relocate` again") from None
    folders = [location.get(key, "/") for key in SOURCES] if isinstance(location, dict) else [None]
    unverified = location.get("unverified", []) if isinstance(location, dict) else None
    if not all(isinstance(f, str) and Path(f).is_absolute() for f in folders) or not (
            isinstance(unverified, list) and all(isinstance(key, str) and key in SOURCES for key in unverified)):
        raise ModelError(f"{path}: not a base location (absolute folder paths under \"base\" and \"text_encoder\", "
                         "a list \"unverified\"); run `diffmine relocate` again")
    return location


def recorded_source(name, record: str | Path, run_path: str | Path):
    """A model folder or hub id that ``record`` (a file of the run at ``run_path``) names, checked
    never to be a folder that came with a received run, whose weights would be loaded (a .bin
    unpickled): a local folder is recorded by its absolute path, so a name that is not one is a hub
    id, which a folder of that name under the current directory (``runs/x/base``) must not stand
    in for; and a folder the run holds is no model's source (the base stays outside the run)."""
    if not isinstance(name, str):
        return name
    path = Path(name).expanduser()
    if not path.is_absolute() and path.exists():
        raise ModelError(f"{record}: names the model {name!r}, a hub id, but a folder of that name is here "
                         f"({path.resolve()}); diffmine loads only the folders a run names by absolute path: run "
                         "it from another directory")
    if path.is_absolute() and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(run_path)):
        raise ModelError(f"{record}: names the model folder {name}, inside the run: a run never holds the model "
                         "it was made with (a received run could bring its own); keep that folder outside the run")
    return name


def model_sources(directory: str | Path, spec: dict) -> dict[str, str]:
    """Where an sd model's base and text encoder load from on this machine: the relocated folders
    (:func:`relocations`), else the paths ``backend.json`` records. A local folder that is gone is
    one line naming the file that names it, the folder and the command that mends it."""
    directory = Path(directory)
    moved = relocations(directory)
    sources = {}
    for key, flag in SOURCES.items():
        folder, named_in = (moved[key], LOCATION_FILE) if key in moved else (spec.get(key), BACKEND_FILE)
        if isinstance(folder, str) and Path(folder).is_absolute() and not Path(folder).exists():
            raise ModelError(f"{directory / named_in}: its {key.replace('_', ' ')} folder {folder} is missing; "
                             f"where it is elsewhere on this machine, run `diffmine relocate --run {shell_word(directory.parent)} "
                             f"{flag} FOLDER`")
        if folder is not None:
            sources[key] = recorded_source(folder, directory / named_in, directory.parent)
    return sources


def _tiny(model: str) -> bool:
    return model == "tiny" or model.startswith("tiny:")


def latent_factor(model: str) -> int:
    """Image pixels per latent pixel along a side, from the model's name (before it is loaded):
    the image side must be a multiple of it. 1 (unchecked) for a Stable Diffusion model, whose
    factor its VAE's config gives (8 for SD's own)."""
    if _tiny(model):
        from .tiny import TinyConfig

        return TinyConfig.latent_factor
    return 1


def check_options(model: str, options: dict) -> None:
    """ModelError for an option the model does not take (``--lora-rank`` with the embedded model)."""
    if _tiny(model) and options:
        import dataclasses

        from .tiny import TinyConfig

        unknown = [key for key in options if key not in {f.name for f in dataclasses.fields(TinyConfig)}]
        if unknown:
            raise ModelError(f"--{unknown[0].replace('_', '-')} is for Stable Diffusion models (--model sd:...), "
                             f"not the embedded model {model!r}")


def create_backend(model: str, prompts: list[str], seed: int = 0, **options) -> Backend:
    """A fresh backend: ``tiny`` (random init) or ``sd:PATH_OR_ID`` (pretrained weights).

    ``prompts`` are every prompt string the model will see (label prompts and the null prompt);
    the embedded model learns one embedding per string.
    """
    if _tiny(model):
        from .tiny import TinyBackend, TinyConfig

        check_options(model, options)
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

            backend = StableDiffusionBackend.from_spec(spec, model_sources(directory, spec))
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
