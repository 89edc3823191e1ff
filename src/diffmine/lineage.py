"""The lineage record: what every result of a run was made from, in one file, ``RUN/lineage.json``.

Each result is stored under its name together with the settings that made it and the
identities of what it was made from (as FiftyOne Brain stores each result under a key with
its config)::

    "typicality": {
      "settings": {"samples": 16, "t_min": 0.1, ...},          # its own settings
      "inputs":   {"model": "3f2a...", "listing": "9c1d..."},  # identities of what it read
      "identity": "a41b...",                                    # what later steps record as input
      "complete": true,
      "command":  "typicality",                                 # the command that makes it
      "method":   1,                                            # the version of its step's method
      "written":  "2026-12-01T22:58:00+00:00"
    }

Identities are content hashes, never paths or times, so a copied or moved run (``cp -r``,
rsync, another machine) is valid as it is:

- ``listing``: a hash of its rows (image id, label, split, each image's content fingerprint)
  and of the prompts and image size;
- ``model``: the SHA-256 of the weights file and ``backend.json``;
- every other result: a hash of its settings and of its inputs' identities (and of its step's
  method version from version 2 on, so that identities made before a first bump stay valid).

A step's method version (:data:`METHODS`) is raised when the code changes what the step makes
from the same settings and inputs (a new setting needs none: it is a setting). A result made by
another version of its method is treated like one made with other settings: recomputed, or for an
expensive result refused without ``--force``, and never served. A record without the field was
made by version 1.

The rules every step follows (:func:`plan`):

- settings and inputs equal to the record, result complete: nothing to do;
- equal, result incomplete, or made with images left out (unreadable, or changed since listing:
  they may be fixed since): resume;
- an input changed: the result is stale and is recomputed (for typicality a changed listing
  only adds the new images' maps);
- an expensive result (the model, typicality, translations, co-typicality, baselines: hours of
  compute) whose own settings changed, or the model whose listing or prompts changed, is never
  replaced silently: the step stops with one line saying what differs, unless ``--force``.

Readers (``open_run``, ``query``, the report, ``status``) call :func:`stale_reasons` and never
serve a result whose inputs changed: they name the step to re-run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shlex
import stat
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .atomic import write_json
from .rerun import command_flags, gives_settings
from .terminal import shell_word

LINEAGE_FILE = "lineage.json"
LOCK_DIR = ".locks"
LINEAGE_LOCK = ".lineage.lock"  # in the run's root: every edit of lineage.json holds it
PROBLEMS_LOCK = ".problems.lock"  # in the run's root: every edit of problems.parquet holds it
GATE = "gate.lock"  # in LOCK_DIR: see step_lock and quiet_run
# the run's folders its steps write into and remove from (rundir.py's layout): each must be the run's
# own, never a link (checked by step_lock: a received run's clusters/ may lead into the user's files)
RESULT_FOLDERS = ("model", "typicality", "mining", "features", "clusters", "classify", "translations", "cotypicality",
                  "localize", "baselines", "contrast", "trends", "report", "compare")
# results that are identified by their content (not by what made them): a reader checks
# freshness up to them and no further (a model is what it is, whatever it was trained on)
ROOTS = ("listing", "model")
# what a model's use depends on in the listing's settings: its prompts and image size. A result
# scored with the model records their digest as its input "prompts" (no result of its own: checked
# against the listing as it is now, so a listing re-made with --force and other prompts makes it stale)
MODEL_SETTINGS = ("labels", "prompt", "null_prompt", "resolution", "resize", "model")


def prompts_digest_of(listing_settings: dict) -> str:
    """The input "prompts" of a result made from a listing with these settings."""
    return digest({k: listing_settings.get(k) for k in MODEL_SETTINGS})
# the version of each step's method, by result name (or name prefix ending in "-"); 1 if absent
METHODS = {
    # 2: prevalence keeps the upper of two or three groups of best matches (BIC), not Otsu's upper half;
    # 3: two or three groups chosen by AIC
    "trends": 3,
}


def method_of(name: str) -> int:
    """The current version of the method that makes result ``name``."""
    if name in METHODS:
        return METHODS[name]
    return next((v for p, v in METHODS.items() if p.endswith("-") and name.startswith(p)), 1)


def _method_change(record: dict, name: str) -> list[str]:
    """``["v1 -> v2"]`` when ``record`` was made by another version of its method, else ``[]``."""
    old, new = record.get("method", 1), method_of(name)
    return [f"v{old} -> v{new}"] if old != new else []


class LineageError(ValueError):
    """A step would discard a result, or a result is stale or locked; the message says what to do."""


def canonical(value):
    """JSON-normal form: tuples become lists, paths and other objects strings."""
    return json.loads(json.dumps(value, default=str))


def digest(value) -> str:
    """A short content hash (80 bits) of any JSON-able value, independent of key order."""
    text = json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_digest(*paths: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of the files' bytes, in order (streamed: a 3 GB UNet is never held in memory)."""
    h = hashlib.sha256()
    for path in paths:
        # a received run's model/trainable.safetensors may be a link to /dev/zero (read forever) or a pipe
        # (opening it waits forever): only a regular file has an end
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise LineageError(f"{path}: not a regular file (a link to a device or a pipe?), so not a model's file")
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()[:20]


def given_digest(path: str | Path | None) -> str | None:
    """The identity of what a path given to a step holds (``report --masks DIR``, ``localize --boxes
    CSV``): a hash of a file's bytes, or of a folder's files (their names under it and their bytes;
    hidden ones left out), never the path, so a copied run and its copied masks stay the same result.
    None for no path; a path that does not exist is named (the step then says what is missing)."""
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        return f"missing: {path}"
    if not path.is_dir():
        return file_digest(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    return digest([[p.relative_to(path).as_posix(), file_digest(p)] for p in files])


def differences(old: dict, new: dict) -> list[str]:
    """``["samples: 16 -> 8", ...]`` for every key whose value differs."""
    old, new = canonical(old), canonical(new)
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def identity_of(name: str, settings: dict, inputs: dict, left_out=()) -> str:
    """The identity :meth:`Lineage.put` gives result ``name`` made with ``settings`` from ``inputs``
    (leaving out the images ``left_out``): a hash of them and of its method version when past 1.
    A part of a result kept for a resume (a label of baseline doersch) carries it too."""
    method, left_out = method_of(name), sorted(left_out)
    return digest([settings, inputs] + ([method] if method > 1 else []) + ([{"left_out": left_out}] if left_out else []))


class Lineage:
    """The records of one run directory (read fresh on every call: other processes write too)."""

    def __init__(self, run_path: str | Path):
        self.run_path = Path(run_path)
        self.path = self.run_path / LINEAGE_FILE

    def records(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            records = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LineageError(f"{self.path}: unreadable lineage record ({exc})") from None
        # a received run's record is text anyone could have edited: its shape is checked once, here
        if not isinstance(records, dict) or not all(
                isinstance(r, dict) and isinstance(r.get("settings"), dict) and isinstance(r.get("inputs"), dict)
                and isinstance(r.get("identity"), str) for r in records.values()):
            raise LineageError(f"{self.path}: not a lineage record (an object of results, each with settings, "
                               "inputs and identity)")
        return records

    def get(self, name: str) -> dict | None:
        return self.records().get(name)

    @contextmanager
    def _editing(self):
        """Read-modify-write under an exclusive lock: steps of parallel processes each add their record."""
        self.run_path.mkdir(parents=True, exist_ok=True)
        with open_lock(self.run_path / LINEAGE_LOCK) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                records = self.records()
                yield records
                write_json(self.path, records)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put(self, name: str, settings: dict, inputs: dict, command: str, identity: str | None = None,
            complete: bool = True, left_out: list[str] = (), **extra) -> dict:
        """Record result ``name``; its identity defaults to the hash of its settings and inputs (and
        of its method version when past 1, and of ``left_out`` when not empty).

        ``left_out``: the image ids the result had to leave out (unreadable, or changed since they
        were listed). They are part of its identity: the result made again once they are fixed is
        another one, and what was made from it is stale. The record counts them, and :func:`plan`
        makes the result again rather than serve it."""
        left_out = sorted(left_out)
        identity = identity or identity_of(name, settings, inputs, left_out)
        record = {"settings": canonical(settings), "inputs": canonical(inputs), "identity": identity,
                  "complete": complete, "command": command, "method": method_of(name),
                  "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  **({"left_out": len(left_out)} if left_out else {}), **canonical(extra)}
        with self._editing() as records:
            records[name] = record
        return record

    def annotate(self, name: str, **extra) -> None:
        """Change what record ``name`` says beside its identity (where an input was read from),
        leaving its settings, inputs and identity as they are: nothing made from it turns stale."""
        with self._editing() as records:
            records[name].update(canonical(extra))

    def drop(self, *names: str) -> None:
        with self._editing() as records:
            for name in names:
                records.pop(name, None)


def plan(lineage: Lineage, name: str, settings: dict, inputs: dict, force: bool = False, expensive: bool = False,
         guard_inputs: bool = False, incremental: tuple[str, ...] = ()) -> str:
    """What a step must do with result ``name`` given the settings and inputs it was asked for.

    Returns ``"new"`` (no result yet), ``"done"`` (up to date), ``"resume"`` (same settings and
    inputs but incomplete or with images left out; or only an ``incremental`` input changed) or ``"replace"`` (stale, or
    ``force``). Raises LineageError where replacing would discard hours of work the user did not
    ask to discard: an ``expensive`` result whose own settings (or method version) changed, or a
    ``guard_inputs`` result (the model) whose inputs changed.
    """
    records = lineage.records()
    record = records.get(name)
    if record is None:
        return "new"
    settings, inputs = canonical(settings), canonical(inputs)
    changed = differences(record["settings"], settings) + [f"method: {c}" for c in _method_change(record, name)]
    if not changed and record["inputs"] == inputs:
        # a result that left images out is made again: they may be fixed since (else it leaves them out again)
        return "done" if record.get("complete") and not record.get("left_out") else "resume"
    if force:
        return "replace"
    changed_inputs = [k for k in sorted(set(record["inputs"]) | set(inputs)) if record["inputs"].get(k) != inputs.get(k)]
    if not changed and set(changed_inputs) <= set(incremental):
        return "resume"
    if (changed and expensive) or (changed_inputs and guard_inputs):
        what = "; ".join(changed + [f"its input {k} changed" for k in changed_inputs])
        # the first way out named is the one that loses nothing: an interrupted result asked again with other
        # settings lands here (its settings, not a method's version: the same settings are refused again)
        made = f"`diffmine {rerun_command(name, record, records)} --run {shell_word(lineage.run_path)}`" \
            if gives_settings(command_of(name)) else "the left of each ->"
        keep = f"give the settings it was made with ({made}) to keep or finish it, " \
            if differences(record["settings"], settings) else ""
        raise LineageError(f"{lineage.run_path}: the stored {name} result was made differently ({what}); "
                           f"{keep}pass --force to replace it, or use another --run")
    return "replace"


def stale_reasons(lineage: Lineage, name: str, records: dict | None = None) -> list[tuple[str, str]]:
    """Why result ``name`` must not be served: ``[(reason, command to re-run), ...]``, most upstream
    first; empty when it is fresh. Checks its inputs' records transitively, up to the ROOTS."""
    records = lineage.records() if records is None else records
    record = records.get(name)
    if record is None:
        return [(f"{name} has not been made", command_of(name))]
    reasons = []
    for input_name, identity in record["inputs"].items():
        if input_name == "prompts":
            listing = records.get("listing")
            if listing is not None and prompts_digest_of(listing["settings"]) != identity:
                reasons.append((f"the dataset's prompts or image size changed since {name} was made",
                                rerun_command(name, record, records)))
            continue
        if command_of(input_name, None) is None:
            continue  # a digest of an outside model: nothing to look up
        upstream = records.get(input_name)
        if upstream is None:
            reasons.append((f"its input {input_name} is gone", command_of(input_name)))
        elif upstream["identity"] != identity:
            reasons += stale_reasons(lineage, input_name, records) if input_name not in ROOTS else []
            reasons.append((f"{input_name} changed since {name} was made", rerun_command(name, record, records)))
        elif input_name not in ROOTS:
            reasons += stale_reasons(lineage, input_name, records)
    reasons += [(f"{name} was made by another version of its method ({change})", rerun_command(name, record, records))
                for change in _method_change(record, name)]
    if not record.get("complete", True):
        reasons.append((f"{name} is incomplete", rerun_command(name, record, records)))
    return reasons


COMMANDS = {"listing": "prepare --data DIR", "model": "train", "typicality": "typicality", "mine": "mine", "features": "cluster",
            "cluster": "cluster", "report": "report", "classify": "classify", "translate": "translate",
            "cotypicality": "cotypicality", "localize": "localize", "baseline-doersch": "baseline doersch",
            "trends": "trends"}


# results named per item (a digest of untrusted labels inside the name) -> the command that makes them
COMMAND_PREFIXES = {"contrast-": "contrast"}


def rerun_command(name: str, record: dict, records: dict | None = None) -> str:
    """The command that makes ``name`` again as it was made: the arguments its record names (a
    contrast's labels) and the flags of the settings it and the other results of its command were
    made with (``records``: the run's; :func:`rerun.command_flags`), ``mine --top 40``.

    A received run's lineage.json is text anyone could have edited: only a step whose command
    takes arguments (a contrast's labels) reads the stored command, when it starts with the step's
    own, re-quoted word by word, and the flags are only known fields' values, quoted, so what is
    printed as "re-run ..." never runs anything else in a shell.
    """
    command = command_of(name)
    flags = command_flags(command, name, {**(records or {}), name: record})
    return " ".join([_stored_arguments(name, record) or command, *flags])


def _stored_arguments(name: str, record: dict) -> str | None:
    """The stored command of a result made per item (a contrast's, with its labels), re-quoted word
    by word; None for another result, or a stored command that is not the step's own."""
    command = command_of(name)
    if not any(name.startswith(prefix) for prefix in COMMAND_PREFIXES):
        return None
    try:
        words = shlex.split(str(record.get("command", "")))
    except ValueError:
        return None
    if words[:len(command.split())] != command.split():
        return None
    return " ".join(shlex.quote(word) for word in words)


def command_of(name: str, default: str | None = "") -> str | None:
    """The command that makes result ``name`` (``default`` for a name that is no result; "": the name)."""
    if name in COMMANDS:
        return COMMANDS[name]
    prefix = next((p for p in COMMAND_PREFIXES if name.startswith(p)), None)
    if prefix is not None:
        return COMMAND_PREFIXES[prefix]
    return name if default == "" else default


def contrast_key(a: str, b: str | None) -> str:
    """A file- and record-safe name for the pair (labels are untrusted text); b None: vs all."""
    return digest(["contrast", a, b])


def contrast_name(a: str, b: str | None) -> str:
    """The lineage name of contrast maps ``a`` vs ``b``; its mined and clustered elements are
    ``contrast_name(a, b) + "-elements"``."""
    return f"contrast-{contrast_key(a, b)}"


def require_fresh(lineage: Lineage, name: str) -> dict:
    """The record of ``name``; raises LineageError naming the step to re-run when it is stale."""
    reasons = stale_reasons(lineage, name)
    if reasons:
        reason, command = reasons[0]
        raise LineageError(f"{lineage.run_path}: the {name} result is out of date ({reason}); "
                           f"re-run `diffmine {command} --run {shell_word(lineage.run_path)}`")
    return lineage.get(name)


def unlinked(root: Path, path: Path) -> Path:
    """``path`` (under ``root``) when no link lies on the way to it from ``root`` (the part of it
    that exists: what is not there yet is no link); else LineageError naming where the link leads.
    ``root`` itself may be reached through links (a run under a linked home folder)."""
    expected = os.path.normpath(os.path.join(os.path.realpath(root), os.path.relpath(path, root)))
    actual = os.path.realpath(path)
    if actual != expected:
        raise LineageError(f"{path}: leads through a link to {actual}; diffmine uses only a run's own folders, "
                           "never links (a received run may hold links anywhere): remove the link")
    return path


def open_lock(path: Path):
    """The lock file ``path`` opened to ``flock`` it, created empty where absent and never written,
    never through a link: a received run's ``.lineage.lock`` may be a link to any path (opening it
    as a file would create an empty file there, e.g. ``/etc/nologin``)."""
    try:
        handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LineageError(f"{path}: a link, not a lock file of the run (a received run may hold links "
                               "anywhere): remove it") from None
        raise
    return os.fdopen(handle, "ab")


def _lock_file(run_path: str | Path, name: str) -> Path:
    directory = Path(run_path) / LOCK_DIR
    if directory.is_symlink():  # its lock files would be created wherever it leads
        raise LineageError(f"{directory}: a link, not the run's folder of lock files (a received run may hold "
                           "links anywhere): remove it")
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


@contextmanager
def step_lock(run_path: str | Path, step: str, worker: bool = False):
    """One process per step of a run: a second one exits at once with a clear message. The lock is
    an ``flock``, released by the kernel when the process ends, so a killed run leaves none behind.
    Data-parallel workers share one step: process 0 takes its lock, the others (``worker``) a lock
    they share, ``STEP.workers.lock``, which tells :func:`quiet_run` they are alive even when
    process 0 died before them.

    A step takes its lock through the gate, which :func:`quiet_run` holds while it checks that no
    step runs (and while ``diffmine clean`` then removes leftovers): a step starting meanwhile waits
    there (seconds at most) instead of being refused, or of starting unseen."""
    name = step.replace(" ", "-") + (".workers" if worker else "") + ".lock"
    for folder in RESULT_FOLDERS:
        unlinked(Path(run_path), Path(run_path) / folder)
    with ExitStack() as held:
        try:  # opened, never written: a finished step changes no file
            gate = held.enter_context(open_lock(_lock_file(run_path, GATE)))
            lock = held.enter_context(open_lock(_lock_file(run_path, name)))
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            gate = None
        if gate is None:
            # a run this process cannot write (a read-only share, an archive): no lock can be made, and
            # none is needed to read it. A step that is up to date answers; one that would write stops
            # at its first write, naming the file
            yield
            return
        fcntl.flock(gate, fcntl.LOCK_SH)
        try:
            fcntl.flock(lock, fcntl.LOCK_SH if worker else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LineageError(f"{run_path}: another diffmine process is running {step} on this run; "
                               "wait for it to finish (or stop it)") from None
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def quiet_run(run_path: str | Path):
    """Every lock of the run at once, for what must not overlap a step's writes (``diffmine clean``).

    Yields ``[]`` holding the gate and every step's lock (and the lineage record's): no diffmine
    process is in a step of the run, and none enters one until the block ends. Else yields what
    holds a lock (``["typicality"]``): a step is running, the caller must leave the run alone.
    Never waits on a step: only on the gate, which steps hold for an instant (and another
    ``quiet_run`` for its block)."""
    run_path = Path(run_path)
    with ExitStack() as held:
        gate = held.enter_context(open_lock(_lock_file(run_path, GATE)))
        fcntl.flock(gate, fcntl.LOCK_EX)
        held.callback(fcntl.flock, gate, fcntl.LOCK_UN)
        running = []
        for path in sorted((run_path / LOCK_DIR).glob("*.lock")) + [run_path / LINEAGE_LOCK, run_path / PROBLEMS_LOCK]:
            if path.name == GATE or not path.is_file():
                continue
            lock = held.enter_context(open(path))  # read: an existing file, never created or written here
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                running.append(_holder(path.name))
                continue
            held.callback(fcntl.flock, lock, fcntl.LOCK_UN)
        if running:
            held.close()  # the caller leaves the run alone: the steps and the gate are let go at once
        yield running


def _holder(lock_name: str) -> str:
    """What holds the lock file ``lock_name``, in words: the step (its data-parallel workers)."""
    if lock_name in (LINEAGE_LOCK, PROBLEMS_LOCK):
        return f"an edit of {'lineage.json' if lock_name == LINEAGE_LOCK else 'problems.parquet'}"
    step = lock_name.removesuffix(".lock")
    return f"{step.removesuffix('.workers')} (data-parallel workers)" if step.endswith(".workers") else step
