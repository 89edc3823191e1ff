"""The run directory: one folder holds every step's settings and results.

    RUN/
      lineage.json             every result's settings, inputs and identity (see lineage.py)
      images.parquet           the dataset listing: index, image_id, path (relative to the dataset
                               root), label, split (train | holdout), size, fingerprint
      problems.parquet         images skipped and why: image_id, path, step, problem
      model/                   backend.json + trainable.safetensors (the trained model)
        base-location.json     where this machine keeps an SD model's base (relocate.py; not its identity)
        checkpoints/step-N/    resumable training state (safetensors + JSON, no pickle)
        metrics.csv            step, loss, learning rate, images/s of every training step
      typicality/              maps at latent resolution, sharded
        shard-00000.safetensors    one (h, w) tensor per image, key = row in shard
        shard-00000.parquet        index: image_id, label, fingerprint, height, width, key, mean, status, problem
      mining/patches.parquet   top (significant) / rejected (not) / least / random patches per
                               label, with typicality, its standard error se, z = typicality / se
                               and p (the flip test's, mine --significance-test flip; else empty)
      features/features.npy    DIFT feature per top and rejected patch (rows of mining/patches.parquet
                               of kind top, then rejected)
      clusters/patches.parquet top patches with cluster, cluster_rank, rank_in_cluster and the
                               cluster's statistics (size, coverage in and out of the label, score)
      classify/, translations/, cotypicality/, localize/, baselines/NAME/   applications and baselines
      report/                  the visual summary, a static site (index.html; report.py)

Nothing in it names an absolute path that a copy would break: image paths are relative to the
dataset root, itself relative to the run when it lies inside it (the demo's data), and every
identity is a content hash. The exception, an SD model's base folder, is pointed to anew with
``diffmine relocate`` (its files checked against a fingerprint; the identity unchanged). Every
Parquet file can be queried with DuckDB, e.g.
``SELECT label, avg(typicality) FROM 'RUN/clusters/patches.parquet' GROUP BY label``.
"""

from __future__ import annotations

import fcntl
import json
import os
import string
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import write_table
from .data import Problem, problem_may_be_fixed
from .lineage import PROBLEMS_LOCK, Lineage, LineageError, command_of, open_lock, require_fresh, stale_reasons, unlinked
from .terminal import print_problems, shell_word

# in RUN/model: the image ids the trained model saw (no part of its identity: a record of its training set)
TRAINED_ON_FILE = "trained-on.parquet"
PROBLEM_COLUMNS = ["image_id", "path", "step", "problem"]  # of problems.parquet


def no_problems() -> pd.DataFrame:
    """An empty problems table whose columns are text (untyped, Parquet and DuckDB read them as NULL)."""
    return pd.DataFrame({column: pd.Series(dtype="string") for column in PROBLEM_COLUMNS})

# What a listing records, by kind (the first six always): a received run's lineage.json and
# images.parquet are files anyone could have edited, and a value of another kind failed deep in a
# later step with a traceback instead of a line naming the file.
LISTING_KINDS = {"labels": list, "prompt": str, "null_prompt": str, "resolution": int, "resize": str, "root": str,
                 "model": str, "holdout": (int, float), "holdout_seed": int, "data": str, "images": int}
_text = lambda kind: pa.types.is_string(kind) or pa.types.is_large_string(kind)  # noqa: E731 - pandas writes either
LISTING_COLUMNS = {"image_id": _text, "path": _text, "label": _text, "size": pa.types.is_integer,
                   "mtime_ns": pa.types.is_integer, "fingerprint": _text}


def listing_problems(settings: dict) -> list[str]:
    """The names of the listing's settings that are missing or not of the kind diffmine records."""
    def wrong(key, value) -> bool:
        if key == "labels":
            return not isinstance(value, list) or not all(isinstance(label, str) for label in value)
        return not isinstance(value, LISTING_KINDS[key]) or isinstance(value, bool)

    required = list(LISTING_KINDS)[:6]
    return [key for key in LISTING_KINDS if (key in settings or key in required) and wrong(key, settings.get(key))]


@lru_cache(maxsize=64)  # asked for every image's prompt
def prompt_problem(prompt) -> str | None:
    """What is wrong with a label prompt; None when it holds ``{label}``, bare, as its only replacement
    field. Nothing else is filled in: "{label.__class__}" would reach into Python's objects, and
    "{label:>999999999999}" build a string of a terabyte."""
    try:
        fields = [(name, conversion, spec) for _, name, spec, conversion in string.Formatter().parse(str(prompt))
                  if name is not None]
    except ValueError as exc:
        return str(exc)
    if not isinstance(prompt, str) or not fields or any(field != ("label", None, "") for field in fields):
        return "it must contain '{label}' and no other {...} field, nor a conversion or format spec"
    return None


class RunError(ValueError):
    """The run directory lacks what a step needs; the message says which step to run first."""


class Run:
    """A run directory. ``open_run(path)`` is the public door."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        """What a notebook shows: the steps done (stale ones marked) and the counts."""
        records = self.lineage.records() if (self.path / "lineage.json").is_file() else {}
        steps = [f"{name}{' (stale)' if self.stale(name) else ''}" for name in records]
        parts = [f"Run({str(self.path)!r})"]
        if "listing" in records:
            images = pd.read_parquet(self.images_path, columns=["label"])
            parts.append(f"{len(images)} images, {images['label'].nunique()} labels")
        if "model" in records and records["model"].get("steps"):
            parts.append(f"model trained {records['model']['steps']} steps")
        if "cluster" in records and self.clusters_path.is_file():
            clusters = pd.read_parquet(self.clusters_path, columns=["label", "cluster"])
            parts.append(f"{len(clusters)} clustered patches in {len(clusters.drop_duplicates())} clusters")
        parts.append("done: " + (", ".join(steps) if steps else "nothing yet"))
        return "; ".join(parts)

    def show_cluster(self, label: str, rank: int = 0, n: int = 16, size: int = 96):
        """A PIL image: the ``n`` members of cluster ``rank`` (0 = most typical) of ``label``
        nearest its centre, each with some context, the patch outlined."""
        from .images import cluster_grid

        return cluster_grid(self, label, rank, n, size)

    def show_image(self, image_id: str, side: int = 256):
        """A PIL image: the image beside its typicality overlay, the mined boxes drawn."""
        from .images import image_view

        return image_view(self, image_id, side)

    # -- layout ---------------------------------------------------------------------------
    @property
    def images_path(self) -> Path:
        return self.path / "images.parquet"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def typicality_dir(self) -> Path:
        return self.path / "typicality"

    @property
    def patches_path(self) -> Path:
        return self.path / "mining" / "patches.parquet"

    @property
    def features_path(self) -> Path:
        return self.path / "features" / "features.npy"

    @property
    def clusters_path(self) -> Path:
        return self.path / "clusters" / "patches.parquet"

    @property
    def translations_dir(self) -> Path:
        return self.path / "translations"

    @property
    def report_path(self) -> Path:
        return self.path / "report" / "index.html"

    def own_path(self, path: Path) -> Path:
        """``path`` (a folder or file under the run), checked to be reached from the run's folder
        through no link. A received run is data anyone could have made, links included (``cp -r``,
        rsync and tar keep them): its ``report`` may lead to the user's home, where an update of the
        site would remove every file it did not write. An error naming the link otherwise."""
        return unlinked(self.path, path)

    def result_files(self, name: str) -> tuple[Path, ...]:
        """The files a cheap result ``name`` lives in (none listed: a sharded result checks its own
        shards, the model its weights). A record whose files are gone is made again, not read."""
        files = {"mine": (self.patches_path,), "features": (self.features_path,), "cluster": (self.clusters_path,),
                 "report": (self.report_path,), "classify": (self.path / "classify" / "summary.json",),
                 "localize": (self.path / "localize" / "summary.json",),
                 "trends": (self.path / "trends" / "trends.json",)}
        return files.get(name, ())

    # -- lineage ----------------------------------------------------------------------------
    @property
    def lineage(self) -> Lineage:
        return Lineage(self.path)

    @property
    def config(self) -> dict:
        """The settings of every result made so far, by name (from the lineage record)."""
        return {name: record["settings"] for name, record in self.lineage.records().items()}

    def width_multiple(self) -> int:
        """The multiple the width of a keep-aspect image was rounded to (the latent factor of the
        model that scored it; 1 for square images), so that images are shown at their maps' size."""
        dataset = self.step_config("dataset")
        if dataset.get("resize", "square") == "square":
            return 1
        recorded = (self.lineage.get("typicality") or {}).get("width_multiple")
        if isinstance(recorded, int) and recorded >= 1:
            return recorded
        # a run scored before the record named it, or not scored yet: the trained model's factor
        from .models import model_sources  # torch comes with it: only here

        try:
            spec = json.loads((self.model_dir / "backend.json").read_text())
            if spec.get("kind") == "sd":  # the base where this machine keeps it (a relocated run's too)
                vae = json.loads((Path(model_sources(self.model_dir, spec)["base"]) / "vae" / "config.json").read_text())
                return 2 ** (len(vae["block_out_channels"]) - 1)
            return int(spec["config"]["latent_factor"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 8 if str(dataset.get("model", "tiny")).startswith("sd") else 4

    def step_config(self, step: str) -> dict:
        """The settings of result ``step`` ("dataset" is the listing's); RunError if not made yet."""
        name = "listing" if step == "dataset" else step
        record = self.lineage.get(name)
        if record is None:
            if name == "listing" and (self.path / "config.json").is_file():
                raise RunError(f"{self.path}: written by diffmine 0.1, which kept no lineage record; "
                               "run its steps again into a new run directory")
            hint = f"run `diffmine train --data DIR --run {shell_word(self.path)}` first" if name == "listing" else \
                f"run `diffmine {command_of(name)} --run {shell_word(self.path)}` first"
            raise RunError(f"{self.path}: no {name} result yet; {hint}")
        if name == "listing" and (wrong := listing_problems(record["settings"])):
            raise RunError(f"{self.path / 'lineage.json'}: the listing's {', '.join(wrong)} "
                           f"{'is' if len(wrong) == 1 else 'are'} not what diffmine records; list the dataset again "
                           f"(`diffmine prepare --data DIR --run {shell_word(self.path)}` with the listing's flags)")
        return record["settings"]

    def stale(self, name: str) -> list[tuple[str, str]]:
        """Why result ``name`` is out of date, [(reason, command to re-run)]; empty when fresh.
        RunError for a damaged listing record (what every result is checked against)."""
        self._check_listing()
        return stale_reasons(self.lineage, name)

    def _check_listing(self) -> None:
        if self.lineage.get("listing") is not None:
            self.step_config("dataset")  # RunError naming lineage.json when its listing was damaged

    def fresh(self, name: str) -> dict:
        """The record of ``name``, or RunError naming the step to re-run when it is out of date."""
        self._check_listing()
        try:
            return require_fresh(self.lineage, name)
        except LineageError as exc:
            raise RunError(str(exc)) from None

    # -- dataset --------------------------------------------------------------------------
    @property
    def dataset_root(self) -> Path:
        """Where the listed images are (absolute): the recorded root, relative to the run when inside
        it. Absolute, so that the paths a run records (problems.parquet) and shows do not depend on
        how `--run` was spelled where the command ran."""
        root = Path(self.step_config("dataset")["root"])
        return root if root.is_absolute() else (self.path / root).absolute()

    def images(self) -> pd.DataFrame:
        """The listing: index, image_id, path (absolute), label, split, size, fingerprint."""
        if not self.images_path.is_file():
            raise RunError(f"{self.path}: no dataset listed here; run `diffmine train --data DIR --run {shell_word(self.path)}` first")
        root = str(self.dataset_root)
        table = pq.read_table(self.images_path)
        wrong = [c for c, kind in LISTING_COLUMNS.items()
                 if c not in table.column_names or not kind(table.schema.field(c).type)]
        if wrong:
            raise RunError(f"{self.images_path}: not a listing of diffmine's (its {', '.join(wrong)} "
                           f"{'is' if len(wrong) == 1 else 'are'} missing or of another type); list the dataset again "
                           f"(`diffmine prepare --run {shell_word(self.path)}`)")
        images = table.to_pandas()
        images["path"] = [p if os.path.isabs(p) else os.path.join(root, p) for p in images["path"]]
        return images

    def training_images(self) -> pd.DataFrame:
        """The listing less the held-out images: what training may see."""
        images = self.images()
        return images[images["split"] == "train"].reset_index(drop=True)

    def trained_on(self) -> set[str] | None:
        """The image ids the run's own model trained on, when its typicality maps are that model's
        (None: scored with an outside model, or a model trained before this was recorded)."""
        path = self.model_dir / TRAINED_ON_FILE
        if "model" not in ((self.lineage.get("typicality") or {}).get("inputs") or {}) or not path.is_file():
            return None
        return set(pq.read_table(path).column("image_id").to_pylist())

    def as_trained(self, images: pd.DataFrame) -> pd.DataFrame:
        """``images`` (image_id, split, ...) with the split the model saw: "train" for the images it
        trained on, "holdout" for the others. A later listing's split (another --holdout) may call a
        trained image held out, and a held-out score must never count one. As listed where the
        model's training set is not recorded (:meth:`trained_on`)."""
        trained_on = self.trained_on()
        if trained_on is None:
            return images
        return images.assign(split=np.where(images["image_id"].isin(list(trained_on)), "train", "holdout"))

    @property
    def labels(self) -> list[str]:
        return self.step_config("dataset")["labels"]

    def prompt(self, label: str | None) -> str:
        """The exact prompt string for ``label`` (None: the null prompt), as trained."""
        prompts = self.step_config("dataset")
        if label is None:
            return prompts["null_prompt"]
        problem = prompt_problem(prompts["prompt"])  # a received run's record is text anyone could have edited
        if problem:
            raise RunError(f"{self.lineage.path}: the listing's prompt {prompts['prompt']!r} is not one diffmine "
                           f"writes ({problem}); list the data again with `diffmine prepare --data DIR --run "
                           f"{shell_word(self.path)} --force`")
        return prompts["prompt"].format(label=label)

    # -- problems -------------------------------------------------------------------------
    def _recorded_problems(self) -> pd.DataFrame:
        """problems.parquet's rows (:data:`PROBLEM_COLUMNS`); none where it is not written yet."""
        path = self.path / "problems.parquet"
        return pd.read_parquet(path) if path.is_file() else no_problems()

    def record_problems(self, step: str, problems: list[Problem]) -> None:
        """Append skipped images to problems.parquet (replacing earlier records of this step)."""
        # read-modify-write under a lock: steps of one run may finish at once (each holds only its own
        # step lock), and a lost record would lose what a result left out (see ``left_out``)
        with open_lock(self.path / PROBLEMS_LOCK) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = self._recorded_problems()
            old = old[old["step"] != step]
            new = pd.DataFrame([{"image_id": p.image_id, "path": p.path, "step": step, "problem": p.problem}
                                for p in problems], columns=PROBLEM_COLUMNS)
            write_table(pa.Table.from_pandas(pd.concat([old, new], ignore_index=True), preserve_index=False,
                                             schema=pa.schema([(column, pa.string()) for column in PROBLEM_COLUMNS])),
                        self.path / "problems.parquet")

    def report_skipped(self, step: str, problems: list[Problem]) -> None:
        """The images ``step`` left out (unreadable, or changed since they were listed): one line
        each on the terminal (the first ten), and recorded as the step's problems for `status`,
        replacing its earlier ones, so an image fixed since is no longer named. A step that skipped
        nothing and had nothing recorded writes nothing (a run that is only read stays unwritten)."""
        if problems or self.skipped_by(step):
            self.record_problems(step, problems)
        print_problems(problems, self.path)

    def add_skipped(self, step: str, problems: list[Problem]) -> None:
        """More images ``step`` left out (a page it writes after its measure): those not yet
        recorded for the step get their line and join its records, which are kept."""
        recorded = self._recorded_problems()
        recorded = recorded[recorded["step"] == step]
        said = set(recorded["image_id"])
        new = [p for p in problems if p.image_id not in said]
        if new:
            self.record_problems(step, [*recorded.itertuples(), *new])
        print_problems(new, self.path)

    def skipped_by(self, step: str, may_be_fixed: bool = False) -> list[str]:
        """The image ids recorded as skipped by ``step`` (:meth:`report_skipped`), sorted.

        ``may_be_fixed``: only those whose problem can go away while the listing stays as it is (a
        file changed since listing can be restored, an unreadable one mounted): a result that left
        them out is made again by the next call of its step (``Lineage.put(left_out=...)``). A file
        that was read as listed and cannot be used (corrupt, too large) stays so until it is listed
        anew, which makes every result from the listing stale anyway; re-making a result for it at
        every call would break "nothing to do twice" on any large collection."""
        recorded = self._recorded_problems()
        recorded = recorded[recorded["step"] == step]
        if may_be_fixed:
            recorded = recorded[np.array([problem_may_be_fixed(p) for p in recorded["problem"]], dtype=bool)]
        return sorted(recorded["image_id"])

    def left_out(self, step: str) -> list[str]:
        """What a result of ``step`` records as left out: :meth:`skipped_by` that may be fixed."""
        return self.skipped_by(step, may_be_fixed=True)

    def problems(self) -> pd.DataFrame:
        """Every image skipped so far: one row per image and step that left it out, with the problem.

        The map steps (typicality, each contrast) keep their bad rows in their own shards; the
        other steps record theirs in problems.parquet (:meth:`report_skipped`)."""
        from .shards import read_index

        path = self.path / "problems.parquet"
        frames = [pd.read_parquet(path)] if path.is_file() else []
        map_indexes = {"typicality": self.typicality_index(missing_ok=True)}
        for name, record in sorted(self.lineage.records().items()):
            if name.startswith("contrast-") and "a" in record["settings"]:  # the maps, not the elements
                index = read_index(self.contrast_dir(record["settings"]["a"], record["settings"]["b"]))
                map_indexes[name] = None if index is None else current_rows(index, self.images())
        for step, index in map_indexes.items():
            if index is not None and len(index):
                bad = index[index["status"] != "ok"]
                frames.append(pd.DataFrame({"image_id": bad["image_id"], "path": bad["path"], "step": step,
                                            "problem": bad["problem"]}))
        if not frames:
            return no_problems()
        return pd.concat(frames, ignore_index=True).drop_duplicates(["image_id", "step", "problem"], ignore_index=True)

    # -- typicality -----------------------------------------------------------------------
    def typicality_shards(self) -> list[Path]:
        return sorted(self.typicality_dir.glob("shard-*.parquet"))

    def typicality_index(self, missing_ok: bool = False) -> pd.DataFrame | None:
        """One row per listed image that has a typicality result (status ok, bad or unreachable),
        with its shard; maps of images no longer listed, or listed with other content, are left out."""
        from .shards import read_index

        record = self.lineage.get("typicality")
        index = read_index(self.typicality_dir) if record is not None else None
        if index is None:
            if missing_ok:
                return None
            raise RunError(f"{self.path}: no typicality yet; run `diffmine typicality --run {shell_word(self.path)}`")
        return current_rows(index, self.images())

    def _check_maps(self, name: str = "typicality") -> None:
        """Maps are served per image whatever the listing, but never those of another model or prompts."""
        for reason, command in self.stale(name):
            if "listing" not in reason and "incomplete" not in reason:
                raise RunError(f"{self.path}: the {name} maps are out of date ({reason}); "
                               f"re-run `diffmine {command} --run {shell_word(self.path)}`")

    @cached_property
    def typicality_store(self) -> "MapStore":
        """The typicality maps, per image (checked not to be stale)."""
        self._check_maps()
        return MapStore(self.typicality_dir, self.typicality_index(), "typicality")

    def latent_typicality_map(self, image_id: str) -> np.ndarray:
        """(h, w) float32 typicality on the latent grid, as stored."""
        return self.typicality_store.latent(image_id)

    def typicality_map(self, image_id: str) -> np.ndarray:
        """(H, W) float32 typicality at the image's resolution after the run's resize.

        Positive where the label explains the pixel better than the null prompt does.
        """
        return self.typicality_store.pixel(image_id)

    # -- contrasts ------------------------------------------------------------------------
    def contrast_dir(self, a: str, b: str | None) -> Path:
        """RUN/contrast/<digest of the pair>/: labels are untrusted text, never a file name."""
        from .lineage import contrast_key

        return self.path / "contrast" / contrast_key(a, b)

    def contrast_store(self, a: str, b: str | None = None) -> "MapStore":
        """The maps of contrast ``a`` vs ``b`` (None: vs every other label), per image."""
        from .lineage import contrast_name
        from .shards import read_index

        name = contrast_name(a, b)
        if self.lineage.get(name) is None:
            raise RunError(f"{self.path}: no contrast of {a!r} vs {b if b is not None else 'all'!r} yet; "
                           f"run `diffmine contrast --run {shell_word(self.path)} ...` first")
        self._check_maps(name)
        index = read_index(self.contrast_dir(a, b))
        rows = current_rows(index, self.images()) if index is not None else pd.DataFrame(columns=["image_id", "status"])
        return MapStore(self.contrast_dir(a, b), rows, f"contrast {a!r} vs {b!r}")

    def contrast_map(self, image_id: str, a: str, b: str | None = None) -> np.ndarray:
        """(H, W) float32 C(x | a, b) = E[L(x, eps, b) - L(x, eps, a)] at the image's resolution:
        positive where ``a``'s prompt explains the pixel better than ``b``'s (b None: the smallest
        margin over every other label)."""
        key = (a, b)
        if key not in self._contrast_stores:
            self._contrast_stores[key] = self.contrast_store(a, b)
        return self._contrast_stores[key].pixel(image_id)

    @cached_property
    def _contrast_stores(self) -> dict:
        return {}

    # -- mining and clusters --------------------------------------------------------------
    def patches(self, kind: str = "top") -> pd.DataFrame:
        """Mined patches: image_id, label, x0, y0, x1, y1 (pixels, x1/y1 exclusive), typicality,
        se (its standard error over the draws), z = typicality / se, and, once clustered,
        cluster, cluster_rank (0 = best-ranked cluster of its label), rank_in_cluster (0 =
        nearest to the centroid) and the cluster's statistics (see ``clustering.py``).
        ``kind``: top (significant), rejected (not), least or random.

        RunError when the result asked for is out of date (e.g. re-mined after clustering)."""
        if kind == "top" and self.lineage.get("cluster") is not None:
            self.fresh("cluster")
            return pd.read_parquet(self.clusters_path)
        return self.mined_patches(kind)

    def mined_patches(self, kind: str | tuple[str, ...] = "top") -> pd.DataFrame:
        """The mining step's table of one kind (or several, in the table's order: top, rejected,
        least, random), most typical first (least: least typical first)."""
        if self.lineage.get("mine") is None or not self.patches_path.is_file():
            raise RunError(f"{self.path}: no mined patches yet; run `diffmine mine --run {shell_word(self.path)}`")
        self.fresh("mine")
        table = pd.read_parquet(self.patches_path)
        kinds = (kind,) if isinstance(kind, str) else kind
        return table[table["kind"].isin(kinds)].reset_index(drop=True)

    # -- translations ---------------------------------------------------------------------
    def translations_index(self) -> pd.DataFrame:
        """Every translation made so far: image_id, source_label, target_label, key, status, shard."""
        from .shards import read_index

        index = read_index(self.translations_dir) if self.lineage.get("translate") is not None else None
        if index is None:
            raise RunError(f"{self.path}: no translations yet; run `diffmine translate --run {shell_word(self.path)}`")
        return index

    @cached_property
    def _translation_lookup(self) -> dict[tuple[str, str], tuple[str, str]]:
        self.fresh("translate")
        index = self.translations_index()
        ok = index[index["status"] == "ok"]
        return {(r.image_id, r.target_label): (r.shard, r.key) for r in ok.itertuples()}

    def forget_translations(self) -> None:
        """Drop the translations looked up so far: ``run_translate`` wrote shards since, which may
        hold translations of images that had none (a source fixed since it was left out)."""
        self.__dict__.pop("_translation_lookup", None)

    def translation(self, image_id: str, label: str) -> np.ndarray:
        """(H, W, 3) uint8: image ``image_id`` translated to ``label``.

        Raises KeyError when that translation was not made.
        """
        from .shards import read_array

        try:
            shard, key = self._translation_lookup[(image_id, label)]
        except KeyError:
            raise KeyError(f"no translation of {image_id!r} to {label!r} in {self.path}") from None
        return read_array(self.translations_dir, shard, key)


def current_rows(index: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """The rows of a per-image result index that belong to the current listing: same image id,
    label and content fingerprint; one row per image (an ok row over a failed one, else the
    latest shard's), with the listing's index, path, split, size and mtime_ns (what a reader
    checks the file against before it shows the image beside its result: ``data.listed_of``)."""
    key = ["image_id", "label", "fingerprint"]
    taken = ("index", "path", "split", "size", "mtime_ns")
    listing = images[key + list(taken)]
    rows = index.drop(columns=[c for c in taken if c in index.columns]).merge(listing, on=key, how="inner")
    rows = rows.assign(_ok=rows["status"] == "ok").sort_values(["image_id", "_ok", "shard"], kind="mergesort")
    rows = rows.drop_duplicates("image_id", keep="last").drop(columns="_ok")
    return rows.sort_values("index", kind="mergesort").reset_index(drop=True)


class MapStore:
    """Per-image maps on the latent grid, sharded (typicality, a contrast): ``index`` holds the
    current rows (image_id, shard, key, height, width, status) of ``directory``."""

    def __init__(self, directory: Path, index: pd.DataFrame, what: str):
        self.directory, self.index, self.what = directory, index, what
        ok = index[index["status"] == "ok"]
        self._lookup = {r.image_id: (r.shard, r.key, r.height, r.width) for r in ok.itertuples()}

    def ok(self) -> pd.DataFrame:
        return self.index[self.index["status"] == "ok"]

    def latent(self, image_id: str) -> np.ndarray:
        """(h, w) float32, as stored."""
        from .shards import read_array

        try:
            shard, key, _, _ = self._lookup[image_id]
        except KeyError:
            raise KeyError(f"no {self.what} map for {image_id!r} in {self.directory} (unknown image, or skipped as bad)") from None
        return read_array(self.directory, shard, key).astype(np.float32)

    def pixel(self, image_id: str) -> np.ndarray:
        """(H, W) float32, bilinear at the image's resolution after the run's resize."""
        from .typicality import upsample

        _, _, height, width = self._lookup.get(image_id, (None, None, 0, 0))
        return upsample(self.latent(image_id), (height, width))


def open_run(path: str | Path) -> Run:
    """Open a run directory written by diffmine."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory")
    return Run(path)
