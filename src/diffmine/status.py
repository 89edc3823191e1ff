"""``diffmine status``: what a run has done, what is out of date, what is left, which files were bad."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .adaptive import draws_summary, rounds_progress
from .leftovers import status_line as leftovers_line
from .lineage import command_of, rerun_command
from .models.base import model_files
from .relocate import location_lines
from .terminal import counted, printable, shell_word
from .train import latest_checkpoint

ORDER = ("listing", "model", "typicality", "mine", "features", "cluster", "report", "classify", "localize",
         "translate", "cotypicality", "baseline-doersch")


def _rerun(run, name: str) -> str:
    """``COMMAND --flags`` that makes result ``name`` again as it was made (its recorded settings)."""
    records = run.lineage.records()
    return rerun_command(name, records[name], records) if name in records else command_of(name)


def _state(run, name: str) -> str:
    reasons = run.stale(name)
    gone = [path for path in run.result_files(name) if not path.is_file()]
    if gone and not reasons:
        return f"its file {gone[0]} is gone: re-run `diffmine {_rerun(run, name)} --run {shell_word(run.path)}`"
    if not reasons:
        left_out = (run.lineage.get(name) or {}).get("left_out")
        return (f"done, {left_out} image(s) left out (listed below; the next `diffmine {_rerun(run, name)} --run "
                f"{shell_word(run.path)}` tries them again)") if left_out else "done"
    reason, command = reasons[0]
    return f"out of date ({reason}): re-run `diffmine {command} --run {shell_word(run.path)}`"


def _kept(run, settings: dict) -> str:
    """How many of the images' candidates mining kept as top patches, and by which test."""
    kinds = pd.read_parquet(run.patches_path, columns=["kind"])["kind"]
    top, rejected = int((kinds == "top").sum()), int((kinds == "rejected").sum())
    test = "no significance filter" if not settings.get("significance", True) else \
        f"flip test, p <= {settings.get('alpha')}" if settings.get("significance_test") == "flip" else \
        f"z >= {settings.get('z_min')}"
    return f"{top} top patches kept, {rejected} rejected candidates stored ({test})"  # rejected: up to --top a label


def _outside_model_lines(run, record: dict) -> list[str]:
    """Where the model given to ``typicality --model sd:FOLDER`` (or its ``--text-encoder FOLDER``)
    is read from, and what to do when a folder is gone (a copied run). Nothing for the run's own
    model or hub ids."""
    from .pipeline import local_parts, pointing_command

    location, settings = record.get("location"), record["settings"]
    folders = [location.get(key) for key in local_parts(settings)] if isinstance(location, dict) else []
    folders = list(dict.fromkeys(folder for folder in folders if isinstance(folder, str)))
    if not folders:
        return []
    missing = [folder for folder in folders if not Path(folder).is_dir()]
    if not missing:
        return [f"  scored with the model in {', '.join(folders)} (`typicality --model`)"]
    return [f"  its model folder {missing[0]} is missing: where it is elsewhere on this machine, run "
            f"`{pointing_command(run, settings)}` (its files are checked; nothing is recomputed)"]


def status(run) -> str:
    lines = [f"run: {run.path}"]
    records = run.lineage.records()
    if "listing" not in records:
        return "\n".join(lines + ["nothing yet: start with `diffmine train --data DIR --run RUN`"])
    listing = records["listing"]["settings"]
    images = run.images()
    held_out = int((images["split"] == "holdout").sum())
    # a dataset inside the run is recorded relative to it: a copy reads its own, not the original's
    source = listing["data"] if Path(str(listing.get("root", "/"))).is_absolute() else run.dataset_root
    lines.append(f"dataset: {len(images)} images ({held_out} held out), labels {', '.join(listing['labels'])} "
                 f"({source})")
    for name in ORDER[1:]:
        record = records.get(name)
        if name == "model":
            if record is None or not record.get("complete"):
                checkpoint = latest_checkpoint(run.model_dir)
                state = f"resumable at {checkpoint.name}" if checkpoint else "not started"
                if checkpoint and record:  # its recipe is recorded: the command that goes on
                    state += f": `diffmine {_rerun(run, name)} --run {shell_word(run.path)}` goes on"
                lines.append(f"train: {state}")
            elif not all(path.is_file() for path in model_files(run.model_dir)):
                lines.append(f"train: its files in {run.model_dir} are gone: `diffmine {_rerun(run, name)} --run "
                             f"{shell_word(run.path)}` rebuilds them (from the last checkpoint where there is one)")
            else:
                lines.append(f"train: {_state(run, name)} ({record.get('steps', '?')} steps, model {record['identity']})")
                lines += location_lines(run.model_dir)
            continue
        if record is None:
            if name in ("typicality", "mine", "cluster", "report"):
                lines.append(f"{name}: not run")
            continue
        if name == "typicality":
            index = run.typicality_index(missing_ok=True)
            done = 0 if index is None else len(index)  # a map, or a problem (retried where it may be fixed)
            left = len(images) - done
            state = _state(run, name) if left == 0 else \
                f"{left} images left: re-run `diffmine {_rerun(run, name)} --run {shell_word(run.path)}`"
            without = 0 if index is None else int((index["status"] != "ok").sum())
            maps = f" ({without} without a map: see the bad images below)" if without else ""
            lines.append(f"typicality: {done}/{len(images)} images{maps}, {counted(len(run.typicality_shards()), 'shard')}; "
                         f"{state}")
            if record["settings"].get("estimator") == "adaptive" and index is not None:
                lines.append(f"  draws per image: {draws_summary(index)}")
            rounds = rounds_progress(run.typicality_dir, images)  # an adaptive run interrupted mid-way
            if rounds:
                lines.append(f"  {rounds}")
            lines += _outside_model_lines(run, record)
            continue
        lines.append(f"{name}: {_state(run, name)}")
        if name == "mine" and run.patches_path.is_file():
            lines.append(f"  {_kept(run, record['settings'])}")
        if name == "baseline-doersch" and not record.get("complete"):
            from .baselines.doersch import kept_labels

            kept, labels = kept_labels(run)
            lines.append(f"  {kept} of {labels} labels mined before it stopped: the same call again mines only the others")
    for name in sorted(set(records) - set(ORDER)):  # contrasts (by a digest of their labels), trends
        settings = records[name]["settings"]
        what = f" ({settings['a']} vs {settings.get('b') or 'all'})" if "a" in settings else ""
        lines.append(f"{name}{what}: {_state(run, name)}")
    parts = sorted(run.features_path.parent.glob("part-*-of-*.npz"))
    if parts:  # a data-parallel cluster step running, or killed
        world = int(parts[0].stem.rsplit("-", 1)[1])
        lines.append(f"cluster features: {len(parts)}/{world} processes' parts written, not yet gathered")
    leftover = leftovers_line(run)
    if leftover:
        lines.append(leftover)
    problems = run.problems()
    lines.append(f"bad or skipped images: {problems['image_id'].nunique()}")  # below: one line per image and step
    lines += [f"  {p.path or p.image_id} ({p.step}): {p.problem}" for p in problems.head(20).itertuples()]
    if len(problems) > 20:
        lines.append(f"  ... {len(problems) - 20} more: diffmine query --run {shell_word(run.path)} \"SELECT * FROM problems\"")
    return "\n".join(printable(line) for line in lines)  # labels and paths are untrusted text
