"""The map of a run: every step, reading and writing the run directory; the CLI is a thin layer on this.

    prepare (listing) -> train (model) -> typicality -> mine -> cluster (features + k-means) -> report
                                     \\-> classify      \\-> localize, translate -> cotypicality
                                     \\-> contrast A B (maps -> mine -> cluster, its page)  cluster -> trends
    prepare (listing) -> baseline (Doersch et al.)
    cluster -> export (COCO, Hugging Face datasets, CSV; outside the run, not in its lineage)

Every step follows the lineage rules (``lineage.py``): it records its settings and the identities
of its inputs; it does nothing when they match its record, recomputes what an input change made
stale, and refuses to discard a trained model or other expensive result without ``force``. Each
step holds a lock on its result, so a second process on the same step exits with a clear message.

None of the steps asks which backend it has.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .atomic import write_table
from .clustering import ClusterConfig, run_clustering
from .cotypicality import CotypicalityConfig, missing_cotypicality, run_cotypicality
from .data import DatasetError, Problem, fingerprint_images, scan_dataset
from .features import FEATURE_KINDS, FeatureConfig, check_block, run_features
from .lineage import (MODEL_SETTINGS, LineageError, canonical, digest, file_digest, given_digest, plan,
                      prompts_digest_of, rerun_command, step_lock)
from .machine import resolve_precision
from .mining import MineConfig, check_patch, check_test, mine_settings, run_mining
from .models import Backend, create_backend, latent_factor, load_backend, recorded_source, relocations
from .models.base import BACKEND_FILE, model_files
from .rundir import LISTING_KINDS, Run, RunError, prompt_problem
from .shards import result_settings
from .terminal import counted, print_problems, printable, shell_word
from .train import TrainConfig, latest_checkpoint, train
from .translate import TranslateConfig, missing_translations, run_translate
from .adaptive import AdaptiveConfig
from .typicality import TypicalityConfig, run_typicality


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _planned(run: Run, name: str, settings: dict, inputs: dict, force: bool, outputs: tuple[Path, ...] = (),
             **rules) -> str:
    """:func:`lineage.plan` for result ``name``. A result recorded as done whose files
    (``Run.result_files``, and ``outputs``) are gone, deleted by hand to redo it or left out of a
    copy, is made again ("replace") instead of read. Replacing an expensive result prints why."""
    try:
        action = plan(run.lineage, name, settings, inputs, force, **rules)
    except LineageError as exc:
        raise RunError(str(exc)) from None
    files = (*run.result_files(name), *outputs)
    if action == "done" and not all(path.is_file() for path in files):
        return "replace"
    if action == "done" and force and int(os.environ.get("RANK", "0")) == 0:
        # every step is deterministic for its settings: making an up-to-date result again would
        # write the same bytes, so --force keeps it rather than spend the compute
        print(f"{name}: up to date with these settings and inputs; --force replaces only a result made differently")
    left_out = (run.lineage.get(name) or {}).get("left_out")
    if action == "resume" and isinstance(left_out, int) and left_out > 0 and int(os.environ.get("RANK", "0")) == 0:
        print(f"{name}: made again, for the {left_out} image(s) it left out last time")
    if action == "replace" and rules.get("expensive") and int(os.environ.get("RANK", "0")) == 0:
        # an expensive result is replaced only on --force or because what it was made from changed
        # (then it is stale, never served again): either way, say so rather than delete in silence
        reasons = [reason for reason, _ in run.stale(name)] or ["its inputs changed"]
        print(f"{name}: replacing the stored result ({'--force' if force else '; '.join(reasons)})")
    return action


def _locked(run: Run, name: str, rank: int = 0):
    """The step's lock on process 0; data-parallel workers share their step (and a lock that tells
    `diffmine clean` they are still writing, should process 0 die first)."""
    return step_lock(run.path, name, worker=rank != 0)


def _resolved(run: Run, name: str, config, device: torch.device, stored: str | None = None):
    """``config`` with ``precision="auto"`` made concrete, so that result ``name``'s record says how
    it was computed: the precision of its stored result if it has one (a resume or an incremental
    run on another machine must not mix bf16 and fp32 maps), else bf16 where ``device`` computes
    it natively, else fp32. An explicit precision is left to the plan (changed -> recompute/refuse).
    ``stored``: the stored precision where it is not the record's own ``precision`` setting."""
    if config.precision != "auto":
        return config
    native = resolve_precision("auto", device)
    stored = stored or ((run.lineage.get(name) or {}).get("settings") or {}).get("precision")
    if stored == "auto":  # recorded unresolved (contrast maps did): kept so, as the result was made
        return config
    if stored in ("fp32", "bf16", "fp16") and stored != native:
        print(f"{name}: keeping the stored result's precision {stored} (auto would pick {native} on this machine; "
              f"pass --precision {native} --force to recompute)")
        native = stored
    return replace(config, precision=native)


def _execution_left_out(config, execution: tuple[str, ...], stored: dict) -> dict:
    """``result_settings(config, execution)``, except that a stored record which still names some of
    the ``execution`` settings (made before they were left out) keeps its values: it stays up to
    date, whatever they are now."""
    return {**result_settings(config, execution), **{k: stored[k] for k in execution if k in stored}}


def _clear(*paths: Path) -> None:
    """Remove a stale result's files before its new record is written (never the other way round:
    a killed replacement must not leave old files under a new record)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ----------------------------------------------------------------------------------------------
# listing


def check_prompt(prompt: str) -> None:
    """The label prompt must contain ``{label}`` and no other replacement field (:func:`prompt_problem`)."""
    problem = prompt_problem(prompt)
    if problem:
        raise DatasetError(f"invalid --prompt {prompt!r}: {problem}")


def holdout_split(image_ids: list[str], labels: list[str], fraction: float, seed: int) -> list[str]:
    """"train" or "holdout" per image: per label, the ``round(fraction * n)`` images that come first
    in a seeded hash order are held out, never all of them (a label with no training image would
    be learned from none). Seeded, stratified, and stable: an image keeps its split when others
    are added or removed, unless the count of its label changes the cut."""
    split = ["train"] * len(image_ids)
    if fraction <= 0:
        return split
    order: dict[str, list[tuple[str, int]]] = {}
    for n, (image_id, label) in enumerate(zip(image_ids, labels)):
        order.setdefault(label, []).append((digest([seed, image_id]), n))
    for members in order.values():
        members.sort()
        for _, n in members[:min(round(fraction * len(members)), len(members) - 1)]:
            split[n] = "holdout"
    return split


def prepare(run: Run, data: str | Path, prompt: str, null_prompt: str, resolution: int, resize: str = "square",
            model: str = "tiny", holdout: float = 0.0, seed: int = 0, force: bool = False,
            model_options: dict | None = None, for_model: bool = True) -> dict:
    """List the dataset into the run; returns the listing's record.

    Each image is identified by its id (path under the dataset root), label and content
    fingerprint. Re-listing a changed dataset changes the listing; later steps keep the results of
    unchanged images. A changed prompt, label set, image size or model kind would need a new
    model: refused without ``force`` once the run has results. A model folder (``sd:FOLDER``, or
    the ``text_encoder`` of ``model_options``, training's) inside the run is refused before anything
    is written: training would refuse it only after the listing (``_given_folders_outside``).
    ``for_model`` False (the Doersch baseline, which loads no model): the image size is not held to
    the model's latent grid here; training checks it (:func:`check_latent_grid`).
    """
    _given_folders_outside(run, model, model_options or {})
    check_prompt(prompt)
    if resolution <= 0:
        raise DatasetError(f"--resolution must be > 0, got {resolution}")
    if for_model:
        check_latent_grid(resolution, model)
    if not 0.0 <= holdout < 1.0:
        raise DatasetError(f"--holdout must be in [0, 1), got {holdout}")
    dataset = scan_dataset(data)
    if null_prompt in {prompt.format(label=label) for label in dataset.label_names}:
        raise DatasetError(f"the null prompt {null_prompt!r} equals a label prompt")
    run.path.mkdir(parents=True, exist_ok=True)
    with step_lock(run.path, "listing"):
        return _write_listing(run, data, dataset, prompt, null_prompt, resolution, resize, model, holdout, seed, force)


def listed_source(run: Run) -> tuple[str, dict]:
    """What ``prepare --run RUN`` without ``--data`` lists again: the run's dataset, where its
    listing says it is (inside the run: under the copy's own folder), and the listing's settings
    as ``prepare`` takes them (:func:`listing_flags`). RunError where that cannot be found here."""
    settings = run.step_config("dataset")
    data, root, inside = settings.get("data"), settings.get("root"), settings.get("data_in_root")
    if not isinstance(data, str) or not isinstance(root, str):
        raise RunError(f"{run.path}: its listing names no dataset; pass --data")
    if not data.startswith("hf:") and not Path(root).is_absolute():  # inside the run
        if not isinstance(inside, str) or Path(inside).is_absolute() or ".." in Path(inside).parts:
            raise RunError(f"{run.path}: its listing does not say where in {root} the dataset was given "
                           "(listed before that was recorded); pass --data")
        data = str(run.dataset_root / inside)
    return data, listing_flags(run)


def listing_flags(run: Run) -> dict:
    """The run's listing settings as ``prepare`` takes them (``seed``: the held-out split's);
    RunError for a value diffmine does not record (a received run's edited lineage.json)."""
    settings = run.step_config("dataset")
    kinds = {key: LISTING_KINDS[key] for key in ("prompt", "null_prompt", "resolution", "resize", "model", "holdout",
                                                 "holdout_seed")}
    given = {key: settings.get(key, 0 if key == "holdout_seed" else None) for key in kinds}
    wrong = [key for key, kind in kinds.items() if not isinstance(given[key], kind) or isinstance(given[key], bool)]
    if wrong:  # a received run's lineage.json is text anyone could have edited
        raise RunError(f"{run.path}: its listing's {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not what "
                       "diffmine records; pass --data and the listing's flags")
    return {**{k: v for k, v in given.items() if k != "holdout_seed"}, "seed": given["holdout_seed"]}


def check_latent_grid(resolution: int, model: str, run: Run | None = None) -> None:
    """DatasetError unless images of ``resolution`` px fit the model's latent grid (a traceback deep
    in the embedded model's pixel_unshuffle otherwise); ``run``: a listing made for no model."""
    factor = latent_factor(model)
    if resolution % factor:
        where = f"{run.path}: the run lists its images at {resolution} px, which is" if run else f"--resolution {resolution} is"
        again = f"; train in another run, listed at a multiple (e.g. `diffmine train --data DIR --resolution " \
                f"{resolution // factor * factor} --run OTHER_RUN`)" if run else ""
        raise DatasetError(f"{where} not a multiple of {factor}, the pixels per latent pixel of the "
                           f"{model.split(':')[0]} model{again}")


def _write_listing(run, data, dataset, prompt, null_prompt, resolution, resize, model, holdout, seed, force) -> dict:
    old_record = run.lineage.get("listing")
    known = {}
    if old_record is not None and run.images_path.is_file():
        try:
            old = run.images()
        except RunError:  # a damaged listing (the error says to list again): every image is hashed anew
            old = pd.DataFrame(columns=["path", "size", "mtime_ns", "fingerprint"])
        known = {p: (s, m, f) for p, s, m, f in zip(old["path"], old["size"], old["mtime_ns"], old["fingerprint"])}
    sizes, mtimes, fingerprints = fingerprint_images(dataset.paths, known)
    root = Path(dataset.root).resolve()
    run_dir = run.path.resolve()
    stored_root = os.path.relpath(root, run_dir) if root.is_relative_to(run_dir) else str(root)
    relative = [os.path.relpath(p, root) if os.path.isabs(p) and Path(p).is_relative_to(root) else p
                for p in dataset.paths]
    split = holdout_split(dataset.image_ids, dataset.labels, holdout, seed)
    table = pa.table({
        "index": pa.array(range(len(dataset)), pa.int64()), "image_id": dataset.image_ids, "path": relative,
        "label": dataset.labels, "split": split, "size": pa.array(sizes, pa.int64()),
        "mtime_ns": pa.array(mtimes, pa.int64()), "fingerprint": fingerprints,
    })
    settings = {"labels": dataset.label_names, "prompt": prompt, "null_prompt": null_prompt, "resolution": resolution,
                "resize": resize, "model": model, "holdout": holdout, "holdout_seed": seed}
    # where the data lies is no part of the identity: a moved dataset is the same listing
    identity = digest([settings, [dataset.image_ids, dataset.labels, split, fingerprints]])
    where = {"data": str(data) if str(data).startswith("hf:") else str(Path(data).resolve()), "root": stored_root,
             "images": len(dataset)}
    if not where["data"].startswith("hf:") and Path(where["data"]).is_relative_to(root):
        # the dataset's own path from its root (".", "manifest.csv", "shards-{0000..0009}.tar"): a
        # copied run whose dataset lies inside it lists it again from the copy (:func:`listed_source`)
        where["data_in_root"] = os.path.relpath(where["data"], root)
    if old_record is not None and not force:
        changed = [f"{k}: {old_record['settings'].get(k)} -> {settings[k]}" for k in MODEL_SETTINGS
                   if old_record["settings"].get(k) != settings[k]]
        later = [n for n in run.lineage.records() if n != "listing"]
        if changed and later:
            raise RunError(f"{run.path}: the dataset's {'; '.join(changed)} would need a new model for this run "
                           f"(it has {', '.join(later)}); pass --force to list it anyway, or use another --run")
    unchanged = old_record is not None and old_record["identity"] == identity
    same_file = unchanged and run.images_path.is_file() and pq.read_table(run.images_path).equals(table)
    if not same_file:
        write_table(table, run.images_path)
    if not (unchanged and all(old_record["settings"].get(k) == v for k, v in where.items())):
        run.record_problems("listing", dataset.problems)
        record = run.lineage.put("listing", {**settings, **where}, {}, "prepare", identity=identity)
    else:
        record = old_record
    print_problems(dataset.problems, run.path)
    for label in dataset.label_names:  # listed as they are, but flags that take a list of labels cut and trim
        if "," in label or label != label.strip():
            print(printable(f"prepare: label {label!r} holds a comma or spaces around it: `trends --order` and "
                            "`translate --to` cannot name it (rename it to use those)"))
    return record


def prompts_digest(run: Run) -> str:
    """What a model's use depends on in the listing: prompts and image size."""
    return prompts_digest_of(run.step_config("listing"))


def all_prompts(run: Run) -> list[str]:
    return [run.prompt(label) for label in run.labels] + [run.prompt(None)]


def new_backend(run: Run, model: str, seed: int, **options) -> Backend:
    return create_backend(model, all_prompts(run), seed=seed, **options)


def _relocated(run: Run, model: str, options: dict) -> tuple[str, dict]:
    """``sd:BASE`` and its options as this machine loads them: a copied run whose base (or separate
    text encoder) was pointed to anew with ``diffmine relocate`` trains on from there. The recorded
    settings keep the listing's names; only where the files are read from changes."""
    moved = relocations(run.model_dir) if model.startswith("sd:") else {}
    if "base" in moved:
        model = f"sd:{moved['base']}"
    if "text_encoder" in moved and options.get("text_encoder"):
        options = {**options, "text_encoder": moved["text_encoder"]}
    return model, options


def _sources(model: str | None, options: dict) -> tuple:
    """The base folder or hub id of an ``sd:`` model and its text encoder's (None where not named)."""
    return (model[3:] if isinstance(model, str) and model.startswith("sd:") else None), options.get("text_encoder")


def _given_folders_outside(run: Run, model: str | None, options: dict) -> None:
    """A local model folder given for the run (``sd:FOLDER``, ``text_encoder``) is refused where the
    later steps would refuse to load it from the record (``models.recorded_source``): inside the run."""
    for flag, name in zip(("--model", "--text-encoder"), _sources(model, options)):
        if isinstance(name, str) and Path(name).expanduser().is_dir():
            recorded_source(str(Path(name).expanduser().resolve()), flag, run.path)


# ----------------------------------------------------------------------------------------------
# model


# how often to checkpoint, and how many to keep, say nothing about the model; the number of
# steps may grow (training goes on from the last checkpoint)
TRAIN_EXECUTION = ("steps", "checkpoint_every", "keep_checkpoints")
# training options added after models were stored, at the value that trains as before: left out of
# the model's settings there, so that a model trained before the option existed stays up to date
TRAIN_ADDED = {"lr_schedule": "constant", "snr_gamma": 0.0}


def model_settings(config: TrainConfig) -> dict:
    """The training settings that say what model comes out (recorded in the lineage)."""
    return {k: v for k, v in asdict(config).items()
            if k not in TRAIN_EXECUTION and not (k in TRAIN_ADDED and v == TRAIN_ADDED[k])}


def model_digest(model_dir: Path) -> str:
    """The content identity of a saved model: its weights and how to rebuild it."""
    return file_digest(*model_files(model_dir))


def train_step(run: Run, config: TrainConfig, model_options: dict | None = None, progress: bool = True,
               force: bool = False) -> Path:
    """Train the run's model from scratch (embedded) or from pretrained weights (SD) on the
    training split; resumable, and continued when ``steps`` grows. Another listing, prompts or
    settings than the stored model's are refused without ``force`` (a new model)."""
    listing = run.fresh("listing")
    check_latent_grid(listing["settings"]["resolution"], listing["settings"]["model"], run)  # listed for the baseline
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.cuda.is_available():
        # accelerate distributes training over GPUs only: under torchrun on CPU each process trained
        # the whole model again, all of them writing the same model folder
        raise RunError(f"train: launched as {world} processes on CPU, where each would train the whole model again "
                       "into the same folder; run `diffmine train` as one process (it uses every core it may)")
    settings = {**model_settings(config), "model": listing["settings"]["model"], "model_options": model_options or {}}
    inputs = {"listing": listing["identity"]}
    rank = int(os.environ.get("RANK", "0"))
    with _locked(run, "model", rank):
        record = run.lineage.get("model")
        if record is None and run.model_dir.exists() and any(run.model_dir.iterdir()) and not force:
            raise RunError(f"{run.model_dir}: holds a model that this run's lineage record does not describe; "
                           "pass --force to replace it")
        if record is not None and not force and record["settings"] == canonical(settings) and record["inputs"] != inputs:
            raise RunError(f"{run.path}: the listing changed since the model was trained (now {len(run.images())} "
                           "images); training on it makes a new model: pass --force. To score the new images with "
                           f"the trained model, run `diffmine typicality --run {shell_word(run.path)}`")
        action = _planned(run, "model", settings, inputs, force, expensive=True, guard_inputs=True)
        if action == "done" and not all(path.is_file() for path in model_files(run.model_dir)):
            action = "resume"  # the weights were deleted or left out of a copy: rebuilt from the checkpoints
        trained = (record or {}).get("steps", 0) if action == "done" else 0
        if action == "resume":
            # an interrupted training: what it reached is its last checkpoint, not the steps it asked for
            checkpoint = latest_checkpoint(run.model_dir)
            trained = json.loads((checkpoint / "state.json").read_text())["step"] if checkpoint else 0
            if config.steps < trained and not force:
                raise RunError(f"{run.path}: an interrupted training reached step {trained} ({checkpoint}), "
                               f"--steps asks {config.steps}; pass --force to discard it and train anew")
        if action == "done" and config.steps == trained:
            print(f"train: up to date ({trained} steps; model {record['identity']})")
            return run.model_dir
        if action == "done" and config.steps < trained and not force:
            raise RunError(f"{run.path}: the stored model has trained {trained} steps, --steps asks {config.steps}; "
                           "pass --force to train a new one")
        anew = action in ("new", "replace") or config.steps < trained
        # the folders training reads: a kept model's where `relocate` pointed them (a received run's
        # location file may name one inside it), checked before anything is cleared or recorded: a
        # refused call leaves the stored model, and its complete record, as they were
        model, options = (listing["settings"]["model"], model_options or {}) if anew else \
            _relocated(run, listing["settings"]["model"], model_options or {})
        _given_folders_outside(run, model, options)
        if anew and rank == 0:
            _clear(run.model_dir)  # results made with the old model become stale by its identity
        if rank == 0:
            run.lineage.put("model", settings, inputs, "train", identity="(training)", complete=False, steps=config.steps)
        backend = new_backend(run, model, config.seed, **options)
        model_dir = train(run, backend, config, progress=progress)
        if rank == 0:
            run.lineage.put("model", settings, inputs, "train", identity=model_digest(model_dir), steps=config.steps)
        return model_dir


def adopt_model(run: Run, source: Run) -> None:
    """Use ``source``'s trained model in ``run`` (to score another collection with the same labels
    and prompts): its files (less checkpoints) and its lineage record are copied."""
    record = source.fresh("model")
    if prompts_digest(run) != prompts_digest(source):
        raise RunError(f"{run.path}: its labels, prompts or image size differ from {source.path}'s model")
    _clear(run.model_dir)
    # a received source's model/, or a file in it, may be a link to the user's own files: copied as
    # the link it is (read from nowhere), never as a copy of what it leads to
    shutil.copytree(source.own_path(source.model_dir), run.model_dir, symlinks=True,
                    ignore=shutil.ignore_patterns("checkpoints"))
    run.lineage.put("model", record["settings"], record["inputs"], "train", identity=record["identity"],
                    steps=record.get("steps"), adopted_from=str(source.path))


def load_model(run: Run, device: torch.device | None = None) -> tuple[Backend, dict]:
    """The run's trained model and the lineage inputs that name it, ``{"model": weights hash}``
    (checked against its record)."""
    record = run.lineage.get("model")
    if record is None or not record.get("complete"):
        records = run.lineage.records()
        command = rerun_command("model", record or {}, records) if "listing" in records else "train --data DIR"
        raise RunError(f"{run.path}: no trained model yet; run `diffmine {command} --run {shell_word(run.path)}` first")
    actual = model_digest(run.model_dir)  # before loading: a damaged file is named, not decoded
    if actual != record["identity"]:
        raise RunError(f"{run.model_dir}: the weights differ from the ones training recorded "
                       f"({actual} != {record['identity']}); retrain with `diffmine train --force`")
    return load_backend(run.model_dir).to(device or default_device()), {"model": actual}


# what the typicality record says in place of the path of a local folder given to `typicality --model`
LOCAL = "local folder"


def load_outside_model(run: Run, model: str, options: dict, device: torch.device | None = None,
                       by_path: bool = False) -> tuple[Backend, dict, dict, dict]:
    """A pretrained model given to ``typicality --model`` (``sd:FOLDER`` or ``sd:HUB_ID``) and what
    the typicality record says of it: ``(backend, settings, inputs, location)``.

    A local folder is named by a fingerprint of the files loaded from it, not by its path: the
    settings say ``sd:local folder`` and ``location`` (kept in the record, outside its identity)
    where it was read from. A copied run whose folder lies elsewhere on another machine is then
    the same model once given its new path, and a folder whose files changed is another model.
    A hub id is named by its id and options. ``by_path``: so is a local folder, as in runs scored
    before fingerprints were recorded (their results stay up to date).
    """
    backend = create_backend(model, all_prompts(run), seed=0, **options).to(device or default_device())
    local = {} if by_path else backend.local_sources()
    kind = model.split(":", 1)[0]
    settings = {"model": f"{kind}:{LOCAL}" if "base" in local else model,
                "model_options": {**options, **({"text_encoder": LOCAL} if "text_encoder" in local else {})}}
    named = {**settings, "fingerprints": {key: fingerprint for key, (_, fingerprint) in local.items()}} if local \
        else {"model": model, "options": options}
    return backend, settings, {"external_model": digest(named)}, {key: folder for key, (folder, _) in local.items()}


def distributed_context() -> tuple[int, int, torch.device]:
    """(process index, number of processes, device) under accelerate/torchrun, else (0, 1, default)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, default_device()
    # `accelerate launch` and `torchrun` both set RANK / WORLD_SIZE / LOCAL_RANK; the process
    # group is torch.distributed's own (gloo on CPU, NCCL on GPUs)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------------------
# typicality, mining, clustering


def typicality_step(run: Run, config: TypicalityConfig, model: str | None = None, model_options: dict | None = None,
                    progress: bool = True, force: bool = False, adaptive: AdaptiveConfig | None = None) -> int:
    """Typicality with the run's trained model, or with ``model`` (e.g. pretrained ``sd:PATH``).

    Incremental over the listing: maps of listed images with unchanged content are kept, new
    images are computed, images that could not be read are retried. Returns the shards written.
    ``adaptive``: the mining settings and rounds of ``--estimator adaptive`` (part of its result's
    settings; default ``AdaptiveConfig()``), unused by the other estimators.
    """
    rank, world, device = distributed_context()
    config = _resolved(run, "typicality", config, device)
    model, model_options, location = _located(model), model_options or {}, {}
    _given_folders_outside(run, model, model_options)
    if model is None:
        backend, model_inputs = load_model(run, device)
        named = {"model": "run", "model_options": {}}
    else:
        stored = (run.lineage.get("typicality") or {}).get("settings", {})
        by_path = stored.get("model") == model and stored.get("model_options") == model_options
        backend, named, model_inputs, location = load_outside_model(run, model, model_options, device, by_path)
    listing = run.fresh("listing")
    _check_labels(run, model)
    # shards are a unit of work, not of the result: new images may come in shards of another size
    settings = {**result_settings(config, ("batch_size", "workers", "compile", "shard_size")), **named}
    if config.estimator == "adaptive":  # where the draws go depends on what is mined
        adaptive = adaptive or AdaptiveConfig()
        check_patch(run, adaptive.patch, "--adaptive-patch")
        settings["adaptive"] = asdict(adaptive)
    inputs = {**model_inputs, "prompts": prompts_digest(run), "listing": listing["identity"]}
    with _locked(run, "typicality", rank):
        # a folder given to --model holding other files (a wrong path, a re-download) would replace hours
        # of maps: refused without --force, as another hub id is by the settings
        action = _planned(run, "typicality", settings, inputs, force, expensive=True, incremental=("listing",),
                          guard_inputs=model is not None)
        if action == "done" and not _typicality_covers_listing(run):
            action = "resume"  # shards lost since (deleted, or a copy that missed some)
        _barrier(world)  # every process has planned from the same state
        if action == "done":
            if rank == 0:
                if location and run.lineage.get("typicality").get("location") != location:
                    run.lineage.annotate("typicality", location=location)  # the same files, read from elsewhere
                    print(f"typicality: up to date; its model is now read from {', '.join(location.values())}")
                else:
                    print("typicality: up to date")
            return 0
        if rank == 0:
            if action == "replace":
                _clear(run.typicality_dir)
            run.lineage.put("typicality", settings, inputs, "typicality", complete=False, location=location)
        _barrier(world)
        written = run_typicality(run, backend, config, rank, world, progress, adaptive)
        if rank == 0:
            index = run.typicality_index(missing_ok=True)
            # the width keep-aspect images were resized to, for whoever shows them beside the maps
            run.lineage.put("typicality", settings, inputs, "typicality",
                            complete=_typicality_covers_listing(run, index), left_out=_left_out_maps(index),
                            width_multiple=backend.latent_factor, location=location)
            _say_left_out_maps(run, index, "typicality", "typicality")  # after its record: the flags it was made with
        return written


def _left_out_maps(index: pd.DataFrame | None) -> list[str]:
    """The images a map step (typicality, a contrast) left out with a problem that may be fixed
    (status "unreachable", ``typicality.bad_status``): its record names them (``Lineage.put``), so
    the steps after it go on without them, the next call of the step retries them, and once they
    have their maps what was made without them is stale."""
    return [] if index is None else sorted(index.loc[index["status"] == "unreachable", "image_id"])


def _say_left_out_maps(run: Run, index: pd.DataFrame | None, step: str, name: str, coming: dict | None = None) -> None:
    """Name the images a map step (typicality, a contrast: ``step`` on the terminal, result ``name``)
    computed no map for, one line each (``print_problems``), and where some of them may be fixed
    (:func:`_left_out_maps`) the call that retries them: the step with the flags it was made with,
    and those of the results of the same command still to be made (``coming``: {result: settings};
    a contrast's elements)."""
    if index is None:
        return
    records = {**run.lineage.records(), **{result: {"settings": s} for result, s in (coming or {}).items()}}
    command = rerun_command(name, records[name], records)
    print_problems([Problem(r.image_id, r.path, r.problem) for r in index[index["status"] != "ok"].itertuples()],
                   run.path)
    left_out = _left_out_maps(index)
    if left_out:
        print(printable(f"{step}: {counted(len(left_out), 'image')} left out for now (unreadable, or changed since "
                        f"listing); the later steps go on without them, and `diffmine {command} --run "
                        f"{shell_word(run.path)}` retries them once they are fixed (or list the data again without them)"))


def _typicality_covers_listing(run: Run, index: pd.DataFrame | None = None) -> bool:
    """Every listed image has a map, or a problem (retried by the next call where it may be fixed);
    ``index``: the run's typicality index when the caller has just read it."""
    index = run.typicality_index(missing_ok=True) if index is None else index
    return index is not None and len(index) == len(run.images())


def _check_labels(run: Run, model: str | None) -> None:
    """Every listed label must be one the model was trained with (a new label needs a new model)."""
    if model is not None:
        return
    trained = run.lineage.get("model")
    listing = run.lineage.get("listing")
    known = set(_trained_labels(run))
    new = [label for label in listing["settings"]["labels"] if label not in known]
    if new and trained is not None:
        why = "it knows " + (f"{sorted(known)}" if known else "none of the listing's prompts: were they changed since?")
        raise RunError(f"{run.path}: labels {new} are new to the trained model ({why}); "
                       f"train a new one with `diffmine train --run {shell_word(run.path)} --force`")


def _trained_labels(run: Run) -> list[str]:
    spec = json.loads((run.model_dir / BACKEND_FILE).read_text())
    prompts = set(spec.get("prompts", [])) or None
    if prompts is None:  # SD: any label can be prompted
        return run.labels
    return [label for label in run.labels if run.prompt(label) in prompts]


def mine_step(run: Run, config: MineConfig, progress: bool = True, force: bool = False) -> pd.DataFrame:
    """The most typical patches per label (with the least typical and random ones); returns the table."""
    typicality = run.fresh("typicality")
    settings, inputs = mine_settings(config), {"typicality": typicality["identity"]}
    _check_adaptive_targets(typicality["settings"].get("adaptive"), config)
    check_test(config, typicality["settings"].get("estimator"))
    check_patch(run, config.patch)  # before the record is dropped: a refused --patch leaves the mined patches
    with step_lock(run.path, "mine"):
        if _planned(run, "mine", settings, inputs, force) == "done":
            _say_up_to_date("mine", force)
            return pd.read_parquet(run.patches_path)
        run.lineage.drop("mine")
        patches, k = run_mining(run, config, progress)
        run.lineage.put("mine", settings, inputs, "mine", patch=k)
        return patches


def _check_adaptive_targets(targets: dict | None, config: MineConfig) -> None:
    """Adaptive typicality put its draws where its recorded mining settings needed them: say so when
    mining asks for others (still correct, less precise where the draws did not go)."""
    if not targets:
        return
    differ = [f"--{name.replace('_', '-')} {getattr(config, name)} (typicality targeted {targets[name]})"
              for name in ("top", "per_image", "patch", "z_min", "significance")
              if targets.get(name) is not None and getattr(config, name) != targets[name]]
    if differ:  # the record's values are untrusted text, and stderr is not escaped as stdout is (progress bars)
        print(printable("mine: the adaptive typicality refined the draws for other mining settings: " + "; ".join(differ)
                        + ". The patches beyond its targets are ranked with fewer draws; recompute typicality with "
                        "these settings (--force) for the same precision"), file=sys.stderr)


def scoring_inputs(run: Run) -> dict:
    """The lineage inputs naming the model that computed the run's typicality."""
    inputs = run.fresh("typicality")["inputs"]
    return {k: v for k, v in inputs.items() if k in ("model", "external_model")}


def _located(model: str | None) -> str | None:
    """``sd:PATH`` of a local folder made absolute: the later steps (features, classify, ...) reload
    the recorded model from wherever they are run, and must find the same folder."""
    if model is None or not model.startswith("sd:") or not Path(model[3:]).expanduser().is_dir():
        return model  # the run's own model, or a hub id
    return "sd:" + str(Path(model[3:]).expanduser().resolve())


def scoring_model(run: Run, device: torch.device | None = None) -> Backend:
    """The model that computed the run's typicality: features come from the same one. A local
    folder given to ``typicality --model`` (or ``--text-encoder``) is read from where the record
    says and must still hold the files typicality used."""
    record = run.lineage.get("typicality")
    if record is None:
        run.step_config("typicality")  # the one line saying to run it
    used = record["settings"]
    if used.get("model", "run") == "run":
        return load_model(run, device)[0]
    if not local_parts(used):  # hub ids, or folders recorded by their paths (older runs)
        options = used.get("model_options", {})
        for name in _sources(used["model"], options):
            recorded_source(name, run.lineage.path, run.path)
        return load_outside_model(run, used["model"], options, device, by_path=True)[0]
    model, options = _recorded_location(run, record)
    backend, _, inputs, _ = load_outside_model(run, model, options, device)
    if inputs["external_model"] != record["inputs"].get("external_model"):
        folders = ", ".join(record["location"][key] for key in local_parts(used))
        raise RunError(f"{folders}: not the files typicality used (the model loaded from it differs); recompute "
                       f"with `{pointing_command(run, used, {'base': model, **options})} --force`")
    return backend


def local_parts(settings: dict) -> list[str]:
    """The parts (``base``, ``text_encoder``) of the model given to ``typicality --model`` that its
    record names as a local folder, by its files (:data:`LOCAL`): read from the record's ``location``.
    A hub base may come with a local text encoder folder, and the other way round."""
    named = {"base": str(settings.get("model", "")).split(":", 1)[-1],
             "text_encoder": (settings.get("model_options") or {}).get("text_encoder")}
    return [key for key, name in named.items() if name == LOCAL]


def pointing_command(run: Run, settings: dict, folders: dict | None = None) -> str:
    """The ``diffmine typicality`` command that gives a copied run the new place of its local model
    folder(s) (``folders``: by part; placeholders where not given) and names the rest as recorded:
    the same settings, so nothing is recomputed."""
    folders, local = folders or {}, local_parts(settings)
    kind = str(settings["model"]).split(":", 1)[0]
    model = folders.get("base", f"{kind}:FOLDER") if "base" in local else settings["model"]
    encoder = (settings.get("model_options") or {}).get("text_encoder")
    if "text_encoder" in local:
        encoder = folders.get("text_encoder", "TEXT_ENCODER_FOLDER")
    return (f"diffmine typicality --run {shell_word(run.path)} --model {shell_word(model)}"
            + (f" --text-encoder {shell_word(encoder)}" if encoder else ""))


def _recorded_location(run: Run, record: dict) -> tuple[str, dict]:
    """``sd:BASE`` and options of the model typicality read, its local folder(s) where the record
    says it read them from. A received run's record is text anyone could have edited: only absolute
    folder paths are read from its ``location`` (never a hub id there, which would download)."""
    location, used = record.get("location"), record["settings"]
    local = local_parts(used)
    folders = [location.get(key) for key in local] if isinstance(location, dict) else [None]
    if not all(isinstance(f, str) and Path(f).is_absolute() for f in folders):
        raise RunError(f"{run.lineage.path}: the typicality record names no model folder; recompute with "
                       f"`{pointing_command(run, used)} --force`")
    for folder in folders:
        recorded_source(folder, run.lineage.path, run.path)
        if not Path(folder).is_dir():
            raise RunError(f"{folder}: the model folder typicality read is missing; where it is elsewhere on this "
                           f"machine, run `{pointing_command(run, used)}` (its files are checked against the ones "
                           "typicality used; nothing is recomputed)")
    kind = used["model"].split(":", 1)[0]
    model = f"{kind}:{location['base']}" if "base" in local else used["model"]
    options = {**used.get("model_options", {}),
               **({"text_encoder": location["text_encoder"]} if "text_encoder" in local else {})}
    return model, options


def cluster_step(run: Run, config: ClusterConfig, features: FeatureConfig, progress: bool = True,
                 force: bool = False) -> pd.DataFrame | None:
    """DIFT features of the top patches, then k-means per label; returns the clustered patches.

    Data-parallel under accelerate/torchrun: every process computes the features of its share
    of the images, process 0 gathers them and clusters; the other processes return None.
    """
    rank, world, device = distributed_context()
    mine = run.fresh("mine")
    features = _resolved(run, "features", features, device)
    # every image gets the same ensemble noise whatever its batch: the batch size is no part of the result
    feature_settings = result_settings(features, ("batch_size",))
    feature_inputs = {"mine": mine["identity"], **scoring_inputs(run)}
    with _locked(run, "cluster", rank):
        action = _planned(run, "features", feature_settings, feature_inputs, force)
        _barrier(world)
        if action != "done":
            backend = scoring_model(run, device)
            check_block(backend, features)
            if rank == 0:
                run.lineage.drop("features", "cluster")
            run_features(run, backend, features, progress, rank, world)
            if rank == 0:
                run.lineage.put("features", feature_settings, feature_inputs, "cluster",
                                left_out=run.left_out("features"))
        if rank != 0:
            return None
        settings, inputs = asdict(config), {"features": run.lineage.get("features")["identity"]}
        if _planned(run, "cluster", settings, inputs, force) == "done":
            _say_up_to_date("cluster", force)
            return pd.read_parquet(run.clusters_path)
        clustered = run_clustering(run, config)
        run.lineage.put("cluster", settings, inputs, "cluster")
        return clustered


def contrast_step(run: Run, a: str, b: str | None, config, mine: MineConfig, cluster: ClusterConfig,
                  features: FeatureConfig, progress: bool = True, force: bool = False) -> Path:
    """Contrast maps of ``a`` vs ``b`` (None: vs every other label) with the run's trained model,
    then mined and clustered like typicality, and its report page; returns the page.

    Two results: ``contrast-<digest>`` (the maps; expensive, resumable, incremental over the
    listing) and ``contrast-<digest>-elements`` (patches, features, clusters). The labels are kept
    inside the records, never in a file or record name.
    """
    from .contrast import contrast_index, missing_contrast, other_labels, run_contrast
    from .lineage import contrast_name
    from .pages import contrast_page_path, write_contrast_page

    other_labels(run.labels, a, b)  # unknown labels: one line, before any model is loaded
    check_patch(run, mine.patch)  # before the maps are computed
    backend, model_inputs = load_model(run)
    check_block(backend, features)
    listing = run.fresh("listing")
    name = contrast_name(a, b)
    config = _resolved(run, name, config, default_device())  # a resume elsewhere must not mix bf16 and fp32 maps
    directory = run.contrast_dir(a, b)
    settings = {"a": a, "b": b, **result_settings(config, ("batch_size", "workers", "compile", "shard_size"))}
    inputs = {**model_inputs, "prompts": prompts_digest(run), "listing": listing["identity"]}
    command = "contrast " + " ".join(shlex.quote(x) for x in ([a, b] if b is not None else [a, "--vs", "all"]))
    elements = name + "-elements"
    # the features' batch size is how they are computed, not what (as for the cluster step's), and an
    # "auto" precision is made concrete: bf16 on one machine and fp32 on another are other elements
    stored = ((run.lineage.get(elements) or {}).get("settings") or {}).get("features") or {}
    features = _resolved(run, elements, features, default_device(), stored.get("precision"))
    element_settings = {"mine": mine_settings(mine), "cluster": asdict(cluster),
                        "features": _execution_left_out(features, ("batch_size",), stored)}
    with step_lock(run.path, name):
        action = _planned(run, name, settings, inputs, force, expensive=True, incremental=("listing",))
        if action == "done" and missing_contrast(run, a, b, config.images):
            action = "resume"
        if action == "done":
            print(f"contrast: maps up to date ({directory})")
        else:
            if action == "replace":
                _clear(directory)
            run.lineage.put(name, settings, inputs, command, complete=False)
            run_contrast(run, backend, config, a, b, progress)
            index = contrast_index(run, a, b, config.images)
            run.lineage.put(name, settings, inputs, command, complete=not missing_contrast(run, a, b, config.images, index),
                            left_out=_left_out_maps(index))
            _say_left_out_maps(run, index, "contrast", name, coming={elements: element_settings})
        element_inputs = {name: run.fresh(name)["identity"]}
        page = contrast_page_path(run, a, b)
        if _planned(run, elements, element_settings, element_inputs, force, outputs=(page,)) != "done":
            run.lineage.drop(elements)
            store = run.contrast_store(a, b)
            patches, k = run_mining(run, mine, progress, store, directory / "patches.parquet")
            described = patches[patches["kind"].isin(FEATURE_KINDS)].reset_index(drop=True)
            run_features(run, backend, features, progress, patches=described, out=directory / "features.npy",
                         step=elements)
            run_clustering(run, cluster, described, directory / "features.npy", directory / "clusters.parquet")
            write_contrast_page(run, a, b)  # before the record: it may leave out more images
            run.lineage.put(elements, element_settings, element_inputs, command, patch=k,
                            left_out=run.left_out(elements))
        else:
            print("contrast: elements up to date")
        return page


def trends_step(run: Run, order: list[str], config, progress: bool = True, force: bool = False) -> dict:
    """Prevalence and typicality of every element cluster of the run in each label of ``order``
    (RUN/trends/trends.json) and its report page; returns the JSON document."""
    from .pages import threshold_words, trends_page_path, write_trends_page
    from .trends import check_min_size, check_order, check_stride, run_trends, trends_settings

    check_order(run, order)  # before anything: a refused --order leaves the stored trends as they are
    clusters = run.fresh("cluster")
    check_min_size(run, config.min_size)  # so does a --min-size no cluster reaches
    check_stride(run, config)  # and a --stride wider than the patch
    settings = trends_settings(order, config)
    inputs = {"cluster": clusters["identity"], "typicality": run.fresh("typicality")["identity"], **scoring_inputs(run)}
    path = run.result_files("trends")[0]
    with step_lock(run.path, "trends"):
        # the page is an output too: a run recorded before its page was written makes it again
        if _planned(run, "trends", settings, inputs, force, outputs=(trends_page_path(run),)) == "done":
            _say_up_to_date("trends", force)
            return json.loads(path.read_text())
        run.lineage.drop("trends")
        result = run_trends(run, scoring_model(run), list(order), config, progress)
        # before the record: a step recorded up to date has its page
        write_trends_page(run, result, threshold_words(config.threshold, config.percentile))
        run.lineage.put("trends", settings, inputs, "trends", left_out=run.left_out("trends"))
        return result


def report_step(run: Run, config, masks: str | Path | None = None, force: bool = False) -> Path:
    """The site of every fresh result (RUN/report/); rendered only when one of them changed, and
    then only the files whose bytes changed are rewritten."""
    from .evaluate import evaluate_run
    from .report import write_report

    shown = ("model", "mine", "cluster", "classify", "localize", "translate", "cotypicality", "baseline-doersch")
    records = run.lineage.records()
    linked = [name for name in records if name.endswith("-elements") or name == "trends"]  # pages the index links
    inputs = {name: records[name]["identity"] for name in (*shown, *linked)
              if name in records and not run.stale(name)}
    if "mine" not in inputs:
        run.fresh("mine")  # names the step to re-run
    settings = {**asdict(config), "masks": given_digest(masks)}
    paths = _given_paths(masks=masks)
    with step_lock(run.path, "report"):
        if _planned(run, "report", settings, inputs, force) == "done":
            _note_paths(run, "report", paths)
            _say_up_to_date("report", force)
            return run.report_path
        evaluation = evaluate_run(run, masks) if masks else None
        path = write_report(run, config, evaluation, fresh=set(inputs))
        run.lineage.put("report", settings, inputs, "report", left_out=run.left_out("report"), paths=paths)
        return path


def _say_up_to_date(name: str, force: bool, file=None) -> None:
    """The line of a step whose result is kept as it is (with --force, :func:`_planned` said why)."""
    if not force and int(os.environ.get("RANK", "0")) == 0:
        print(f"{name}: up to date", file=file)


def _given_paths(**given) -> dict[str, str]:
    """Where the files given to a step were read from (absolute), recorded beside its identity: the
    re-run hints name them, the identity holds only their content (:func:`lineage.given_digest`)."""
    return {key: str(Path(path).resolve()) for key, path in given.items() if path is not None}


def _note_paths(run: Run, name: str, paths: dict[str, str]) -> None:
    """An up-to-date result whose files were given from another place (a copied run, its masks
    copied along): the record names the new place, its identity unchanged."""
    if (run.lineage.get(name) or {}).get("paths") != paths:
        run.lineage.annotate(name, paths=paths)


# ----------------------------------------------------------------------------------------------
# applications and baselines


def classify_step(run: Run, config, progress: bool = True, force: bool = False) -> dict:
    """Image-level classification by typicality (held-out split first); returns the summary."""
    from .classify import run_classify

    listing = run.fresh("listing")
    config = _resolved(run, "classify", config, default_device())
    backend_inputs = scoring_inputs(run) if run.lineage.get("typicality") else {"model": run.fresh("model")["identity"]}
    settings, inputs = result_settings(config), {**backend_inputs, "listing": listing["identity"]}
    with step_lock(run.path, "classify"):
        if _planned(run, "classify", settings, inputs, force) == "done":
            _say_up_to_date("classify", force)
            return json.loads(run.result_files("classify")[0].read_text())
        backend = scoring_model(run) if run.lineage.get("typicality") else load_model(run)[0]
        # scores.parquet and summary.json are written one after the other: never under the old record
        run.lineage.drop("classify")
        summary = run_classify(run, backend, config, progress)
        run.lineage.put("classify", settings, inputs, "classify", left_out=run.left_out("classify"))
        return summary


def localize_step(run: Run, boxes=None, masks=None, blur: float = 0.0, before=None, force: bool = False) -> dict:
    """Typicality against boxes or masks (held-out split first); returns the summary."""
    from .localize import localize_run

    typicality = run.fresh("typicality")
    # the boxes and masks by content, the run before by its maps: never by the paths they were given as
    before_maps = (Run(before).lineage.get("typicality") or {}).get("identity") \
        if before and Path(before).is_dir() else None
    settings = {"boxes": given_digest(boxes), "masks": given_digest(masks), "blur": blur,
                "before": (before_maps or f"missing: {before}") if before else None}
    paths = _given_paths(boxes=boxes, masks=masks, before=before)
    with step_lock(run.path, "localize"):
        if _planned(run, "localize", settings, {"typicality": typicality["identity"]}, force) == "done":
            _note_paths(run, "localize", paths)
            _say_up_to_date("localize", force, file=sys.stderr)  # stdout holds the table (or the --json document)
            return json.loads(run.result_files("localize")[0].read_text())
        result, extra = localize_run(run, boxes, masks, blur, before)
        run.lineage.put("localize", settings, {"typicality": typicality["identity"]}, "localize", paths=paths, **extra)
        return result


def _positional(run: Run, name: str, config, force: bool) -> tuple:
    """``(config, settings)`` of a step whose shards are positional (shard s holds items s *
    shard_size onwards: translate, co-typicality). The shard size says how the work is cut, not
    what it makes, so it is no setting of the result: a stored result keeps its own (a resume with
    another one would mix two cuts; --force makes it anew with the one given), and a record made
    before this, which names it among its settings, keeps it there (it stays up to date)."""
    record = run.lineage.get(name) or {}
    stored = record.get("settings") or {}
    size = stored.get("shard_size", record.get("shard_size"))
    if not force and isinstance(size, int) and not isinstance(size, bool) and size >= 1 and size != config.shard_size:
        print(f"{name}: keeps the stored result's --shard-size {size} (its shards are cut by it; --force makes it "
              f"anew with {config.shard_size})", file=sys.stderr)
        config = replace(config, shard_size=size)
    settings = result_settings(config, ("batch_size", "workers", "compile", "shard_size"))
    if stored.get("shard_size") == config.shard_size:
        settings["shard_size"] = config.shard_size
    return config, settings


def _sharded_step(run: Run, name: str, settings: dict, inputs: dict, force: bool, missing, clear: tuple[Path, ...],
                  compute, stored, left_out=lambda: (), shard_size: int | None = None):
    """An expensive, sharded, resumable step: up to date (and every shard there) -> ``stored()``;
    else clear a stale result, mark it incomplete, ``compute()``, mark it complete, with what
    ``left_out()`` names as left out (``Lineage.put``: the next call retries them, for a ``compute``
    that does) and the ``shard_size`` its shards are cut by (:func:`_positional`)."""
    with step_lock(run.path, name):
        action = _planned(run, name, settings, inputs, force, expensive=True)
        if action == "done" and missing():
            action = "resume"  # shards lost since
        if action == "done":
            print(f"{name}: up to date")
            return stored()
        if action == "replace":
            _clear(*clear)
        cut = {"shard_size": shard_size} if shard_size is not None else {}
        run.lineage.put(name, settings, inputs, name, complete=False, **cut)
        result = compute()
        run.lineage.put(name, settings, inputs, name, left_out=left_out(), **cut)
        return result


def translate_step(run: Run, config: TranslateConfig, progress: bool = True, force: bool = False) -> int:
    """Translate the run's mined images to other labels with the run's trained model; returns the
    number of shards written (or rewritten: a shard whose images left out were translated once fixed).
    Its identity names the images it left out that may be fixed: once they are translated,
    co-typicality made from the translations without them is stale."""
    from .translate import check_injection, target_labels

    target_labels(run.labels, config.to)  # before the record: a refused --to leaves the translations as they are
    backend, model_inputs = load_model(run)
    check_injection(backend.unet, config)
    config, settings = _positional(run, "translate", config, force)
    inputs = {**model_inputs, "mine": run.fresh("mine")["identity"]}
    return _sharded_step(run, "translate", settings, inputs, force, lambda: missing_translations(run, config),
                         (run.translations_dir, run.path / "cotypicality"),
                         lambda: run_translate(run, backend, config, progress), lambda: 0,
                         left_out=lambda: run.left_out("translate"), shard_size=config.shard_size)


def cotypicality_step(run: Run, config: CotypicalityConfig, features: FeatureConfig, progress: bool = True,
                      force: bool = False) -> pd.DataFrame:
    """Co-typicality of the translated scenes, scored and described by the run's trained model.
    Its identity names the scenes it left out that may be fixed (a source changed since listing,
    or unreadable): the next call retries them, scoring only those whose shards left them out,
    and what was made from the result without them turns stale once they are in."""
    backend, model_inputs = load_model(run)
    stored = ((run.lineage.get("cotypicality") or {}).get("settings") or {}).get("features") or {}
    features = _resolved(run, "cotypicality", features, default_device(), stored.get("precision"))
    # the features of a sequence's members are one forward pass per scene: their batch size is unused
    config, own = _positional(run, "cotypicality", config, force)
    settings = {**own, "features": _execution_left_out(features, ("batch_size",), stored),
                "draws": result_settings(TypicalityConfig.from_settings(run.step_config("typicality")))}
    inputs = {**model_inputs, "translate": run.fresh("translate")["identity"]}
    directory = run.path / "cotypicality"
    return _sharded_step(run, "cotypicality", settings, inputs, force, lambda: missing_cotypicality(run, config),
                         (directory,), lambda: run_cotypicality(run, backend, config, features, progress),
                         lambda: pd.read_parquet(directory / "sequences.parquet"),
                         left_out=lambda: run.left_out("cotypicality"), shard_size=config.shard_size)


def baseline_step(run: Run, config, positive: str | None = None, progress: bool = True,
                  force: bool = False) -> pd.DataFrame:
    """The Doersch et al. (2013) baseline on the run's listing (RUN/baselines/doersch/).

    Resumable: an interrupted call leaves its record incomplete (never served) and each finished
    label's part; the same call again mines only the labels left (``doersch.py``, Resume). Other
    settings are refused while that record stands, as for a complete result: its parts are hours
    of SVMs."""
    from .baselines.doersch import EXECUTION, RESULT, check_size, output_dir, run_doersch

    listing = run.fresh("listing")
    # before the incomplete record below: one made with a patch that does not fit refused the corrected call
    check_size(run.step_config("dataset")["resolution"], config)
    if positive is not None and positive not in run.labels:  # before --force clears the stored baseline
        raise ValueError(f"unknown label {positive!r}; the run has {run.labels}")
    stored = (run.lineage.get(RESULT) or {}).get("settings") or {}
    # the decoding processes are no part of the detections
    settings = {**_execution_left_out(config, EXECUTION, stored), "positive": positive}
    inputs = {"listing": listing["identity"]}
    with step_lock(run.path, RESULT):
        # its table deleted by hand (or left out of a copy): made again, from the labels' parts where they stand
        action = _planned(run, RESULT, settings, inputs, force, expensive=True,
                          outputs=(output_dir(run) / "patches.parquet",))
        if action == "done":
            print("baseline doersch: up to date")
            return pd.read_parquet(output_dir(run) / "patches.parquet")
        run.lineage.put(RESULT, settings, inputs, "baseline doersch", complete=False)
        table = run_doersch(run, config, positive, progress)
        # an image it could not read (or that changed since listing) may be fixed: the next call then
        # mines with it (while it is not, the labels' parts are read back: no SVM is fitted again)
        run.lineage.put(RESULT, settings, inputs, "baseline doersch", left_out=run.left_out(RESULT))
        return table


def export_step(run: Run, fmt: str, out: str | Path, copy_images: bool = False) -> Path:
    """The clustered patches as COCO, a Hugging Face datasets folder or CSV (``export.py``). An
    export lies outside the run: not recorded in its lineage; stale clusters are refused."""
    from .export import export

    return export(run, fmt, out, copy_images)


__all__ = ["prepare", "train_step", "typicality_step", "mine_step", "cluster_step", "contrast_step", "trends_step",
           "report_step", "classify_step", "localize_step", "translate_step", "cotypicality_step", "baseline_step",
           "export_step", "load_model", "RunError"]
