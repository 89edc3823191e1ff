"""``diffmine relocate``: use a copied Stable Diffusion run with its base model at another path.

A run's SD model is its trained weights on top of a base model that ``RUN/model/backend.json``
names by path (``/home/alice/models/sd15``). A run copied to a machine that keeps the base at
``/data/sd15`` would need that file edited, but backend.json is part of the model's identity: every
later result would turn stale. Instead the new folder goes into ``RUN/model/base-location.json``,
which is no part of the identity, once its files are shown to be the same as the ones the model
was trained on: training records a fingerprint of them (``base_fingerprint``), and the new folder
must give the same. A received run is untrusted: its base-location.json is only a path, read like
backend.json's (``models.relocations``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_json
from .lineage import step_lock
from .models import LOCATION_FILE, SOURCES, ModelError, model_sources, recorded_source, relocations
from .models.base import BACKEND_FILE

WHAT = {"base": "base model", "text_encoder": "text encoder"}


def _spec(model_dir: Path) -> dict:
    path = model_dir / BACKEND_FILE
    if not path.is_file():
        raise ModelError(f"{model_dir}: no trained model here ({BACKEND_FILE} missing); run `diffmine train` first")
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a model description ({exc})") from None
    if not isinstance(spec, dict) or spec.get("kind") != "sd":
        raise ModelError(f"{path}: not a Stable Diffusion model (the embedded tiny model lives inside the run): "
                         "there is no base model to relocate")
    return spec


def _check_same(spec_path: Path, spec: dict, key: str, folder: Path, force: bool) -> bool:
    """Raise ModelError unless ``folder`` holds the files the model's ``key`` source was trained on
    (or, with ``force``, the run recorded no fingerprint to compare). Returns whether it was verified."""
    from .models.sd import checked_subfolders, fingerprint

    recorded = spec.get(key)
    if recorded is None and key == "text_encoder":
        raise ModelError(f"{spec_path}: the model has no separate text encoder (it uses the base model's own): "
                         "relocate the base with --sd-base")
    if not isinstance(recorded, str) or not Path(recorded).is_absolute():
        raise ModelError(f"{spec_path}: the {WHAT[key]} is {recorded!r}, not a local folder: nothing to relocate")
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such folder")
    subfolders = checked_subfolders(key, folder, spec.get("text_encoder") is not None)
    expected = spec.get(f"{key}_fingerprint")
    if expected is None:
        if force:
            return False
        raise ModelError(f"{spec_path}: records no fingerprint of its {WHAT[key]} {recorded} (trained before "
                         f"diffmine recorded one), so {folder} cannot be verified to hold the same; pass --force to "
                         "use it unverified")
    actual = fingerprint(folder, subfolders)
    if actual != expected:
        raise ModelError(f"{folder}: not the {WHAT[key]} this run was trained on ({recorded}): the files loaded from "
                         f"it differ (fingerprint {actual}, recorded {expected}); refused, even with --force")
    return True


def relocate(run_path: str | Path, base: str | Path | None = None, text_encoder: str | Path | None = None,
             force: bool = False) -> list[str]:
    """Record where this machine keeps the run's base model (and separate text encoder), after
    checking their fingerprints against backend.json's; returns the lines to print.

    ``force`` accepts a folder of a run trained before fingerprints were recorded (it cannot be
    verified), never one whose fingerprint differs: the trained weights would be loaded on top of
    another model under the same identity.
    """
    model_dir = Path(run_path) / "model"
    spec = _spec(model_dir)
    given = {key: Path(folder).expanduser().resolve() for key, folder in (("base", base), ("text_encoder", text_encoder))
             if folder is not None}
    if not given:
        raise ModelError("give --sd-base FOLDER, --text-encoder FOLDER or both")
    for key, folder in given.items():  # refused up front, as every later step would refuse to load it from there
        recorded_source(str(folder), SOURCES[key], run_path)
    # read, checked and written under one lock: a second relocate at once is refused, not lost, and
    # `diffmine clean` sees the write
    with step_lock(run_path, "relocate"):
        return _relocated(model_dir, spec, given, force)


def _relocated(model_dir: Path, spec: dict, given: dict[str, Path], force: bool) -> list[str]:
    try:
        location = relocations(model_dir)
    except ModelError:  # damaged: replaced by this one
        location = {}
    unverified = set(location.get("unverified", ())) - set(given)
    lines = []
    for key, folder in given.items():
        verified = _check_same(model_dir / BACKEND_FILE, spec, key, folder, force)
        location[key] = str(folder)
        if not verified:
            unverified.add(key)
        lines.append(f"{WHAT[key]}: {folder} ({'same files as' if verified else 'unverified, in place of'} "
                     f"{spec[key]})")
    location["unverified"] = sorted(unverified)
    write_json(model_dir / LOCATION_FILE, location)
    return lines + [f"recorded in {model_dir / LOCATION_FILE}; the model and its results are unchanged"]


def location_lines(model_dir: Path) -> list[str]:
    """What ``diffmine status`` says of an sd model's base: where it is loaded from when relocated,
    or the one line of a recorded folder that is gone. Nothing for a model loaded as recorded."""
    try:
        spec = json.loads((model_dir / BACKEND_FILE).read_text())
        if not isinstance(spec, dict) or spec.get("kind") != "sd":
            return []
        location = relocations(model_dir)
        model_sources(model_dir, spec)
    except (OSError, ValueError) as exc:  # ModelError is a ValueError
        return [f"  base: {exc}"]
    unverified = set(location.get("unverified", ()))
    return [f"  {WHAT[key]}: loaded from {location[key]} (relocated from {spec.get(key)}"
            f"{'; unverified' if key in unverified else ''})" for key in SOURCES
            if key in location and location[key] != spec.get(key)]  # trained on since: recorded there
