"""Labeled image collections: listing, validation, decoding and resizing.

A dataset is one of:

- a folder with one sub-folder per label;
- a manifest (.csv with a header, or .jsonl) with ``path`` and ``label`` fields, paths relative
  to the manifest's folder;
- WebDataset tar shards (a .tar, a folder of them, or ``shards-{0000..0099}.tar``): a sample is
  the members sharing a key, an image (.jpg/.jpeg/.png/.webp) and a label (.cls/.txt/.json);
- a Hugging Face ``datasets`` imagefolder: a ``save_to_disk`` folder or ``hf:NAME_OR_PATH``
  (needs the optional ``datasets`` package).

Every image is named by its ``image_id``: its path relative to the dataset root, with forward
slashes (``norland/img_0001.png``, ``shard-0003.tar/a/17.jpg``; ``train/000123`` for a row of a
Hugging Face split). An image inside a container has the path ``CONTAINER#MEMBER``, which
:func:`load_image` reads lazily.

Bad input never stops a run: listing returns the good records and a list of problems, and
decoding raises :class:`BadImage` (file and problem named) for the caller to record and skip.
"""

from __future__ import annotations

import csv
import errno
import functools
import io
import json
import os
import re
import stat
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from .terminal import size_text

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Larger images are refused rather than decoded (a 40k x 40k PNG would take GBs of RAM).
MAX_PIXELS = 64_000_000
# Files (and tar members) larger than this are refused unread: no image of MAX_PIXELS needs more,
# and a member's bytes are read whole into memory.
MAX_FILE_BYTES = 512 << 20
# keep-aspect keeps the height and scales the width: a 64000 x 1 strip would become 4 million px
# wide (GBs). Panoramas stay well under this ratio.
MAX_ASPECT = 10
# A label member (.cls/.txt/.json) is read whole while listing: a bigger one is a problem, unread.
MAX_LABEL_BYTES = 64 << 10


class DatasetError(ValueError):
    """The dataset as a whole cannot be used (no labels, one label, unreadable manifest...)."""


class BadImage(ValueError):
    """One image cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem

    def __reduce__(self):  # crosses process boundaries from DataLoader workers
        return BadImage, (self.path, self.problem)


@dataclass(frozen=True)
class Problem:
    image_id: str
    path: str
    problem: str


Row = tuple[str, str, str]  # image_id, path, label


@dataclass
class Dataset:
    root: Path
    image_ids: list[str]
    paths: list[str]  # absolute
    labels: list[str]
    problems: list[Problem]

    @property
    def label_names(self) -> list[str]:
        return sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.image_ids)

    def table(self) -> pa.Table:
        return pa.table({
            "index": pa.array(range(len(self)), pa.int64()),
            "image_id": self.image_ids,
            "path": self.paths,
            "label": self.labels,
        })


def _inside(real_path: str, real_root: str) -> bool:
    return real_path == real_root or real_path.startswith(real_root.rstrip(os.sep) + os.sep)


def _scan_folder(root: Path) -> tuple[list[Row], list[Problem]]:
    rows, problems = [], []
    real_root = os.path.realpath(root)
    outside = f"symlink points outside the dataset root {root} (not read)"
    label_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for label_dir in label_dirs:
        if label_dir.is_symlink() and not _inside(os.path.realpath(label_dir), real_root):
            problems.append(Problem(label_dir.name, str(label_dir), outside))
            continue
        # rglob does not walk into symlinked sub-folders; a symlink is checked where it is listed
        for path in sorted(label_dir.rglob("*")):
            if path.name.startswith("."):
                continue
            image_id = path.relative_to(root).as_posix()
            if path.is_symlink() and not _inside(os.path.realpath(path), real_root):
                problems.append(Problem(image_id, str(path), outside))
                continue
            if path.is_dir():
                continue
            if path.exists() and not path.is_file():  # a pipe named x.png: hashing it waited forever
                problems.append(Problem(image_id, str(path), NOT_REGULAR))
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                problems.append(Problem(image_id, str(path), f"not an image file extension ({path.suffix or 'none'})"))
                continue
            rows.append((image_id, str(path), label_dir.name))
    return rows, problems


def _manifest_column(table: pa.Table, name: str) -> list[str]:
    """One manifest column as stripped strings, "" where missing (JSON numbers become text)."""
    column = pc.fill_null(table.column(name).cast(pa.string()), "")
    return pc.utf8_trim_whitespace(column).to_pylist()


def _require_columns(manifest: Path, columns: list[str]) -> None:
    if not {"path", "label"} <= set(columns):
        raise DatasetError(f"{manifest}: needs 'path' and 'label' columns, found {sorted(columns)}")


def _read_jsonl_in_python(manifest: Path) -> tuple[list[str], list[str]]:
    """The slow path, for what pyarrow refuses: a line that is not JSON (named here), or a field
    whose type changes between rows (labels 1 and "x")."""
    entries = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8-sig").splitlines(), 1):
        if line.strip():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{manifest}: line {n} is not JSON ({exc.msg})") from None
            if not isinstance(entry, dict):
                raise DatasetError(f"{manifest}: line {n} is not a JSON object")
            entries.append(entry)
    if entries:
        _require_columns(manifest, list(entries[0]))
    return tuple(["" if e.get(name) is None else str(e[name]).strip() for e in entries] for name in ("path", "label"))


def _read_manifest(manifest: Path) -> tuple[list[str], list[str]]:
    """The ``path`` and ``label`` columns of a manifest, read by pyarrow: a million-row manifest
    becomes two lists of strings, never a million dicts."""
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json

    try:
        if manifest.suffix.lower() == ".jsonl":
            try:
                table = pa_json.read_json(manifest)
                # inference turns date-like strings into timestamps: read those columns again as text
                dates = [n for n in ("path", "label") if n in table.column_names
                         and pa.types.is_temporal(table.schema.field(n).type)]
                if dates:
                    table = pa_json.read_json(manifest, parse_options=pa_json.ParseOptions(
                        explicit_schema=pa.schema([(n, pa.string()) for n in dates]), unexpected_field_behavior="infer"))
            except pa.ArrowException:
                return _read_jsonl_in_python(manifest)
        else:
            with manifest.open(newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a BOM
                header = next(csv.reader(f), [])
            if not header:
                return [], []
            _require_columns(manifest, header)
            # only the two columns, as text: other columns are never parsed, "NA" stays a label
            table = pa_csv.read_csv(manifest, convert_options=pa_csv.ConvertOptions(
                include_columns=["path", "label"], column_types={"path": pa.string(), "label": pa.string()}))
    except UnicodeDecodeError:
        raise DatasetError(f"{manifest}: not a text manifest") from None
    except pa.ArrowException as exc:
        raise DatasetError(f"{manifest}: cannot read the manifest ({exc})") from None
    if not table.num_rows:
        return [], []
    _require_columns(manifest, table.column_names)
    return _manifest_column(table, "path"), _manifest_column(table, "label")


def _scan_manifest(manifest: Path) -> tuple[list[Row], list[Problem]]:
    root = str(manifest.parent.resolve())
    inside = root.rstrip(os.sep) + os.sep
    rows, problems, seen = [], [], set()
    real_dirs: dict[str, bool] = {}  # folder -> resolves inside the root (one realpath per folder)
    for n, (raw, label) in enumerate(zip(*_read_manifest(manifest)), 1):
        where = f"{manifest.name} row {n}"
        if not raw:
            problems.append(Problem(f"<{where}>", "", f"{where}: empty path"))
            continue
        # normpath, not resolve(): no system call per row, and a symlinked image keeps its name
        path = os.path.normpath(os.path.join(root, raw))
        if not path.startswith(inside):
            problems.append(Problem(raw, path, f"{where}: path points outside the dataset root {root}"))
            continue
        image_id = path[len(inside):].replace(os.sep, "/")
        # a symlink, or a symlinked folder on the way, may still lead out of the root
        folder = os.path.dirname(path)
        if folder not in real_dirs:
            real_dirs[folder] = _inside(os.path.realpath(folder), root)
        if not real_dirs[folder] or (os.path.islink(path) and not _inside(os.path.realpath(path), root)):
            problems.append(Problem(image_id, path, f"{where}: symlink points outside the dataset root {root} (not read)"))
            continue
        if not label:
            problems.append(Problem(image_id, path, f"{where}: empty label"))
        elif not os.path.isfile(path):
            problems.append(Problem(image_id, path, f"{where}: file not found"))
        elif image_id in seen:
            problems.append(Problem(image_id, path, f"{where}: listed twice"))
        else:
            seen.add(image_id)
            rows.append((image_id, path, label))
    return rows, problems


# --------------------------------------------------------------------------------------------
# images inside containers: WebDataset tar shards and Hugging Face Arrow files
#
# Such an image's path is CONTAINER#MEMBER ("/data/shard-0003.tar#a/17.jpg",
# "/hf/data-00000-of-00002.arrow#image/123": column and row of the Arrow file), so every step
# passes it around as it does a file path, and load_image opens the member lazily.

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# .cls first: in WebDataset collections .txt is often a caption and .json other metadata
TAR_LABEL_EXTENSIONS = ("cls", "json", "txt")
_MEMBER = re.compile(r"^(.+?\.(?:tar|arrow))#(.+)$")


def split_member(path: str | Path) -> tuple[str, str] | None:
    """("/d/shard.tar", "a/17.jpg") for "/d/shard.tar#a/17.jpg"; None for a plain file path."""
    match = _MEMBER.match(str(path))
    if match is None or os.path.exists(path):  # a real file may have '#' in its name
        return None
    return match[1], match[2]


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``shards-{0000..0002}.tar`` -> three names (zero padding
    kept); ``{a,b}`` lists alternatives."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", match[1])
    if span:
        items = [str(i).zfill(len(span[1])) for i in range(int(span[1]), int(span[2]) + 1)]
    else:
        items = match[1].split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for item in items for name in expand_braces(head + item + tail)]


NOT_REGULAR = "not a regular file: a device or a pipe"


def require_regular_file(path: str | Path) -> os.stat_result:
    """``os.stat(path)``, refusing what has no end to read: a received run's listing may name, or
    link an image to, /dev/zero (read forever) or a pipe (opening it waits forever).

    Raises:
        OSError: unreadable, or not a regular file.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, NOT_REGULAR, str(path))
    return st


@functools.lru_cache(maxsize=16)
def _open_tar(path: str, pid: int) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    # keyed by process: a DataLoader worker forked from a process holding this handle would share
    # its file offset, so each process opens its own. The member table is read once per handle.
    tar = tarfile.open(path)
    return tar, {info.name: info for info in tar.getmembers()}


@functools.lru_cache(maxsize=16)
def _open_arrow(path: str, pid: int) -> pa.Table:
    # memory-mapped: opening reads only the metadata, a row's bytes are paged in when read
    return pa.ipc.open_stream(pa.memory_map(path)).read_all()


def _member_bytes(container: str, member: str) -> bytes:
    """The stored bytes of a tar member or of an Arrow file's image cell ("column/row")."""
    require_regular_file(container)
    if container.endswith(".tar"):
        tar, members = _open_tar(container, os.getpid())
        if member not in members:
            raise KeyError(f"no member {member!r}")
        info = members[member]
        if info.size > MAX_FILE_BYTES:  # refused from the header, before any byte is read
            raise ValueError(f"member is {info.size} bytes, over the {size_text(MAX_FILE_BYTES)} cap")
        return tar.extractfile(info).read()
    column, _, row = member.rpartition("/")
    cell = _open_arrow(container, os.getpid()).column(column)[int(row)]
    stored = cell["bytes"] if cell.is_valid else None
    if stored is None or not stored.is_valid:
        raise KeyError("no image bytes stored in this row")
    size = stored.as_buffer().size  # a view into the memory map: nothing copied yet
    if size > MAX_FILE_BYTES:
        raise ValueError(f"stored image is {size} bytes, over the {size_text(MAX_FILE_BYTES)} cap")
    return stored.as_py()


def _label_text(extension: str, data: bytes) -> str:
    """The label of a WebDataset sample from its .cls, .txt or .json ({"label": ...}) member."""
    text = data.decode("utf-8").strip()
    if extension != "json":
        return text
    value = json.loads(text)
    label = value.get("label") if isinstance(value, dict) else None
    return "" if label is None else str(label).strip()


def _scan_tar(tar_path: Path, root: Path) -> tuple[list[Row], list[Problem]]:
    """The samples of one WebDataset shard: members sharing a key (the name up to the first dot
    of its base name, ``a/17`` for ``a/17.jpg``), an image and a label each."""
    shard = tar_path.relative_to(root).as_posix()
    samples: dict[str, dict[str, str]] = {}  # key -> extension -> member name
    labels: dict[str, str] = {}
    unreadable: dict[str, str] = {}  # key -> why its label member could not be read
    problems = []
    try:
        with tarfile.open(tar_path) as tar:
            for info in tar:  # one pass over the headers; only label members are read
                if info.name.startswith("/") or ".." in info.name.split("/"):
                    # an image id becomes a path elsewhere (MASKS/<image_id>): no escaping it
                    problems.append(Problem(f"{shard}/{info.name}", f"{tar_path}#{info.name}",
                                            f"tar member {info.name!r} of {shard} has an absolute path or a '..' "
                                            "component (refused)"))
                    continue
                directory, _, base = info.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not info.isfile() or not dot or not stem:
                    continue
                key = f"{directory}/{stem}" if directory else stem
                extension = extension.lower()
                samples.setdefault(key, {})[extension] = info.name
                if extension in TAR_LABEL_EXTENSIONS and key not in labels:
                    if info.size > MAX_LABEL_BYTES:  # a label is a word, not a stream to hold in memory
                        labels[key] = ""
                        unreadable[key] = (f"label member {info.name} is {info.size} bytes, over the "
                                           f"{size_text(MAX_LABEL_BYTES)} cap (not read)")
                        continue
                    try:
                        labels[key] = _label_text(extension, tar.extractfile(info).read())
                    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                        labels[key] = ""
                        unreadable[key] = f"unreadable label member {info.name} ({type(exc).__name__}: {exc})"
    except (tarfile.TarError, OSError) as exc:  # a damaged shard: keep the samples before the damage
        problems.append(Problem(shard, str(tar_path), f"unreadable tar shard, later members skipped ({exc})"))
    rows = []
    for key, members in samples.items():
        image = next((members[e] for e in TAR_IMAGE_EXTENSIONS if e in members), None)
        name = image or next(iter(members.values()))
        image_id, path = f"{shard}/{name}", f"{tar_path}#{name}"
        if image is None:
            problems.append(Problem(image_id, path, f"sample {key!r} has no image member (.{', .'.join(TAR_IMAGE_EXTENSIONS)})"))
        elif not labels.get(key):
            problems.append(Problem(image_id, path, unreadable.get(key) or f"sample {key!r} has no label "
                                                    f"(a non-empty .{', .'.join(TAR_LABEL_EXTENSIONS)} member)"))
        else:
            rows.append((image_id, path, labels[key]))
    return rows, problems


def _scan_tars(tars: list[Path], root: Path) -> tuple[list[Row], list[Problem]]:
    rows, problems = [], []
    for tar_path in tars:
        if not tar_path.is_file():
            problems.append(Problem(tar_path.relative_to(root).as_posix(), str(tar_path), "no such tar shard"))
            continue
        shard_rows, shard_problems = _scan_tar(tar_path, root)
        rows += shard_rows
        problems += shard_problems
    return rows, problems


def _is_saved_hf(directory: Path) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    return (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file()


def _scan_hf(source: str) -> tuple[Path, list[Row], list[Problem]]:
    """A Hugging Face dataset with an Image column and a ``label`` column (an imagefolder):
    ``hf:NAME_OR_PATH`` through ``load_dataset``, or a ``save_to_disk`` folder. Every split is
    listed; image ids are ``SPLIT/ROW``."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{source}: reading a Hugging Face dataset needs the `datasets` package: "
                           "pip install datasets (or pip install 'diffmine[hf]')") from None
    try:
        if source.startswith("hf:"):
            loaded = datasets.load_dataset(source[3:], streaming=False)
        else:
            loaded = datasets.load_from_disk(source)
    except Exception as exc:  # not found, offline, not a dataset: the library's own words
        raise DatasetError(f"{source}: cannot load the Hugging Face dataset ({type(exc).__name__}: {exc})") from exc
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    rows, problems, files = [], [], []
    for split, table in splits:
        split_rows, split_problems, split_files = _hf_split_rows(source, table, split)
        rows += split_rows
        problems += split_problems
        files += split_files
    # a loaded dataset lives in the datasets cache, next to its Arrow files
    root = Path(files[0]).parent if source.startswith("hf:") else Path(source).resolve()
    return root, rows, problems


def _hf_split_rows(source: str, split, split_name: str) -> tuple[list[Row], list[Problem], list[str]]:
    """Rows of one split (a ``datasets.Dataset``), each image addressed in the Arrow file that
    stores it. Returns (rows, problems, the split's Arrow files)."""
    import datasets

    where = f"{source}" + (f" split {split_name!r}" if split_name else "")
    image_column = next((n for n, f in split.features.items() if isinstance(f, datasets.Image)), None)
    if image_column is None or "label" not in split.features:
        raise DatasetError(f"{where}: needs an Image column and a 'label' column, found {sorted(split.features)}")
    if split._indices is not None:  # a selection or shuffle: store the rows in order first
        split = split.flatten_indices()
    files = [f["filename"] for f in split.cache_files]
    if not files:
        raise DatasetError(f"{where}: held in memory only; save it with save_to_disk and pass that folder")
    table = split.data.table
    label_feature = split.features["label"]
    labels = table.column("label").to_pylist()
    if isinstance(label_feature, datasets.ClassLabel):
        labels = [label_feature.names[v] if v is not None and v >= 0 else "" for v in labels]
    else:
        labels = ["" if v is None else str(v).strip() for v in labels]
    images = table.column(image_column)
    has_bytes = pc.is_valid(pc.struct_field(images, "bytes")).to_pylist()
    stored_paths = pc.struct_field(images, "path").to_pylist()
    # global row -> (Arrow file, row in that file)
    counts = [_open_arrow(f, os.getpid()).num_rows for f in files]
    if sum(counts) != len(labels):
        raise DatasetError(f"{where}: its Arrow files hold {sum(counts)} rows, the dataset {len(labels)}")
    starts = np.cumsum([0] + counts[:-1])
    file_of = np.repeat(np.arange(len(files)), counts)
    row_in_file = (np.arange(len(labels)) - starts[file_of]).tolist()
    file_of = file_of.tolist()
    prefix = f"{split_name}/" if split_name else ""
    rows, problems = [], []
    for n, (label, embedded, stored) in enumerate(zip(labels, has_bytes, stored_paths)):
        image_id = f"{prefix}{n:06d}"
        # the bytes in the Arrow file, or, loaded from image files (load_dataset of a local
        # folder), the file itself
        path = f"{files[file_of[n]]}#{image_column}/{row_in_file[n]}" if embedded else stored
        if not path:
            problems.append(Problem(image_id, "", f"{where} row {n}: no image"))
        elif not label:
            problems.append(Problem(image_id, path, f"{where} row {n}: no label"))
        else:
            rows.append((image_id, path, label))
    return rows, problems, files


def _shown(text: str) -> str:
    """A name with the bytes that are no UTF-8 (Python keeps them as surrogates) written as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8_only(rows: list[Row], problems: list[Problem]) -> tuple[list[Row], list[Problem]]:
    """The rows whose file name, path and label are UTF-8, and a problem for each other one: a name
    of other bytes (a Latin-1 ``caf\\xe9.png``, a tar member's) cannot be stored in the listing's
    Parquet table, and failed the whole listing in one line that named no file."""
    try:  # the common case, at a million rows: one encode
        "\0".join(part for row in rows for part in row).encode("utf-8")
        "\0".join(part for problem in problems for part in (problem.image_id, problem.path)).encode("utf-8")
        return rows, problems
    except UnicodeEncodeError:
        pass
    kept = [row for row in rows if all(_shown(part) == part for part in row)]
    problems = [Problem(_shown(p.image_id), _shown(p.path), _shown(p.problem)) for p in problems]
    problems += [Problem(_shown(row[0]), _shown(row[1]), "its name (or its label's) is not UTF-8: rename it to list it")
                 for row in rows if any(_shown(part) != part for part in row)]
    return kept, problems


def scan_dataset(source: str | Path, labels: list[str] | None = None, min_labels: int = 2) -> Dataset:
    """List a labeled image collection.

    Args:
        source: a folder of label sub-folders; a .csv/.jsonl manifest; WebDataset tar shards (a
            .tar file, a folder of them, or a brace pattern such as ``shards-{0000..0099}.tar``);
            a ``datasets`` folder written by ``save_to_disk``; or ``hf:NAME_OR_PATH``.
        labels: if given, the labels a model knows; images of any other label are reported as
            problems ("unknown label") instead of listed.
        min_labels: typicality contrasts a label with the null prompt learned on all labels, so
            a collection of one label has nothing to contrast.
    """
    text = str(source)
    source = Path(source)
    if text.startswith("hf:"):
        root, rows, problems = _scan_hf(text)
    elif not source.exists() and re.search(r"\{[^{}]*\}", text):
        tars = [Path(name).resolve() for name in expand_braces(text)]
        root = Path(os.path.commonpath([t.parent for t in tars]))
        rows, problems = _scan_tars(tars, root)
    elif not source.exists():
        raise DatasetError(f"{source}: no such dataset folder or manifest")
    elif source.is_dir() and _is_saved_hf(source):
        root, rows, problems = _scan_hf(text)
    elif source.is_dir() and any(source.glob("*.tar")):
        root = source.resolve()
        rows, problems = _scan_tars(sorted(root.glob("*.tar")), root)
    elif source.is_dir():
        root = source.resolve()
        rows, problems = _scan_folder(root)
    elif source.suffix.lower() == ".tar":
        root = source.parent.resolve()
        rows, problems = _scan_tars([source.resolve()], root)
    elif source.suffix.lower() in (".csv", ".jsonl"):
        root = source.parent.resolve()
        rows, problems = _scan_manifest(source)
    else:
        raise DatasetError(f"{source}: expected a folder of label sub-folders, a .csv/.jsonl manifest, "
                           ".tar shards or a Hugging Face dataset")
    rows, problems = _utf8_only(rows, problems)
    if labels is not None:
        known = set(labels)
        problems += [Problem(i, p, f"unknown label {l!r} (the model knows {sorted(known)})")
                     for i, p, l in rows if l not in known]
        rows = [row for row in rows if row[2] in known]
    found = sorted({l for _, _, l in rows})
    if not rows:
        raise DatasetError(f"{source}: no images found (expected <label>/<image> files or a manifest)")
    if len(found) < min_labels:
        raise DatasetError(
            f"{source}: found {len(found)} label ({', '.join(map(repr, found))}); typicality contrasts each "
            f"label with the null prompt learned over all labels, so at least {min_labels} labels are needed")
    image_ids, paths, row_labels = (list(column) for column in zip(*rows))
    return Dataset(root, image_ids, paths, row_labels, problems)


# --------------------------------------------------------------------------------------------
# decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha is composited over white, 16-bit is scaled, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def target_size(width: int, height: int, resolution: int, resize: str, multiple: int) -> tuple[int, int]:
    """(width, height) an image is resized to.

    ``square``: resolution x resolution. ``keep-aspect``: height = resolution, width scaled and
    rounded to a multiple of ``multiple`` (the backend's latent factor), as the paper does for
    cars at height 256.
    """
    if resize == "square":
        return resolution, resolution
    if resize == "keep-aspect":
        w = max(multiple, int(round(width * resolution / height / multiple)) * multiple)
        return w, resolution
    raise ValueError(f"unknown resize mode {resize!r} (square, keep-aspect)")


def load_image(path: str | Path, resolution: int, resize: str = "square", multiple: int = 1,
               listed: tuple[int, int, str] | None = None) -> np.ndarray:
    """Decode, convert to RGB and resize one image: a file, or a tar/Arrow member (``CONTAINER#MEMBER``).

    ``listed``: the image's (size, mtime_ns, fingerprint) in a run's listing (:func:`listed_of`):
    an image that is no longer the one listed is refused (:func:`changed_since_listing`), so no
    result is ever shown beside, or made from, other pixels than the ones the listing names.

    Returns:
        (H, W, 3) uint8 array at the run's size.
    Raises:
        BadImage: missing, empty, corrupt, truncated, oversized or changed files.
    """
    member = split_member(path)
    if member is None:
        path = Path(path)
        try:
            size = require_regular_file(path).st_size
        except OSError as exc:
            raise BadImage(path, f"cannot read file ({exc.strerror or exc})") from None
        if size > MAX_FILE_BYTES:
            raise BadImage(path, f"file is {size} bytes, over the {size_text(MAX_FILE_BYTES)} cap")
        source = path
    else:
        try:
            data = _member_bytes(*member)
        except (OSError, KeyError, IndexError, ValueError, tarfile.TarError, pa.ArrowException) as exc:
            raise BadImage(path, f"cannot read the member ({type(exc).__name__}: {exc})") from None
        size, source = len(data), io.BytesIO(data)
    if listed is not None and changed_since_listing(path, listed):
        raise BadImage(path, CHANGED)
    if size == 0:
        raise BadImage(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise BadImage(path, f"image too large ({img.width}x{img.height} > {MAX_PIXELS} pixels)")
                img = ImageOps.exif_transpose(img)
                img.load()
                rgb = _to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(path, f"image too large (over {MAX_PIXELS} pixels)") from None
    except Exception as exc:  # PIL raises many types for broken files
        if isinstance(exc, OSError) and exc.errno is not None:  # opening or reading the file failed (no
            # permission, an I/O error), not decoding it: it may be fixed while the listing stays
            raise BadImage(path, f"cannot read file ({exc.strerror or exc})") from None
        message = str(exc).replace(repr(source), "the data")  # not "<_io.BytesIO object at 0x...>"
        raise BadImage(path, f"cannot decode image ({type(exc).__name__}: {message})") from None
    w, h = target_size(rgb.width, rgb.height, resolution, resize, multiple)
    if w > MAX_ASPECT * h:
        raise BadImage(path, f"image is {rgb.width}x{rgb.height}, wider than {MAX_ASPECT}:1, which --resize "
                             f"keep-aspect would make {w} px wide; crop it, or use --resize square")
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8)


def to_model_input(images: np.ndarray) -> "torch.Tensor":
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], the range diffusion models expect."""
    import torch

    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # e.g. decoded translations read back from a shard: torch warns, and would share it
        images = images.copy()
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _Decoder:
    """Picklable per-item decoder for DataLoader workers: index -> (index, image or BadImage)."""

    def __init__(self, paths: list[str], resolution: int, resize: str, multiple: int, listed: list | None = None):
        self.paths, self.resolution, self.resize, self.multiple = paths, resolution, resize, multiple
        self.listed = listed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            listed = self.listed[i] if self.listed is not None else None
            return i, load_image(self.paths[i], self.resolution, self.resize, self.multiple, listed)
        except BadImage as exc:
            return i, exc


def iter_images(paths: list[str], resolution: int, resize: str = "square", multiple: int = 1, workers: int = 0,
                listed: list | None = None):
    """Decode images in order, ``workers`` processes prefetching ahead of the consumer.

    Yields ``(position, (H, W, 3) uint8 array)`` or ``(position, BadImage)``; a bad file is
    reported, never raised, so one broken image cannot stop a long run. ``listed``: per path, what
    the run's listing recorded of it (see :func:`load_image`).
    """
    import torch.utils.data

    decoder = _Decoder(paths, resolution, resize, multiple, listed)
    if workers <= 0:
        yield from (decoder[i] for i in range(len(decoder)))
        return
    loader = torch.utils.data.DataLoader(decoder, batch_size=None, num_workers=workers, prefetch_factor=8)
    # the loader makes tensors of the arrays: arrays again, as without workers
    yield from ((i, item.numpy() if isinstance(item, torch.Tensor) else item) for i, item in loader)


def image_batches(paths: list[str], resolution: int, resize: str = "square", multiple: int = 1, per_batch: int = 32,
                  workers: int = 0, listed: list | None = None):
    """Decoded images grouped for the model: consecutive images of one size, at most ``per_batch``.

    Yields ``(positions, (B, H, W, 3) uint8 array)`` for a batch, or ``([position], BadImage)``
    for an image that could not be read (or is no longer the one ``listed``: see :func:`load_image`).
    """
    pending: list[tuple[int, np.ndarray]] = []
    for i, item in iter_images(paths, resolution, resize, multiple, workers, listed):
        if isinstance(item, BadImage):
            yield [i], item
            continue
        if pending and (pending[0][1].shape != item.shape or len(pending) >= per_batch):
            yield [j for j, _ in pending], np.stack([a for _, a in pending])
            pending = []
        pending.append((i, item))
    if pending:
        yield [j for j, _ in pending], np.stack([a for _, a in pending])


# --------------------------------------------------------------------------------------------
# identity of an image: its content, so that a copied or moved dataset keeps its results


def _stat_key(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or of the container holding a member; None if unreadable."""
    member = split_member(path)
    try:
        st = os.stat(member[0] if member else path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _recorded(key: tuple[int, int] | None, old: tuple[int, int, str] | None) -> str | None:
    """The fingerprint recorded in ``old`` = (size, mtime_ns, fingerprint) when the file's stat
    ``key`` still matches it: trusted unread, as git's index does; else None (hash the file)."""
    return old[2] if key is not None and old is not None and (old[0], old[1]) == key and old[2] else None


def content_fingerprint(path: str) -> str:
    """A hash of an image's stored bytes (a file, or a tar/Arrow member); "" if unreadable."""
    import hashlib

    h = hashlib.blake2b(digest_size=10)
    member = split_member(path)
    try:
        if member:
            h.update(_member_bytes(*member))
        else:
            require_regular_file(path)
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    except Exception:  # noqa: BLE001 - any unreadable image gets no fingerprint and is re-read next time
        return ""
    return h.hexdigest()


def fingerprint_images(paths: list[str], known: dict[str, tuple[int, int, str]] | None = None,
                       workers: int = 8) -> tuple[list[int], list[int], list[str]]:
    """(sizes, mtimes, fingerprints) of the images at ``paths``.

    An image whose file (or container) has the size and mtime recorded in ``known`` (path ->
    (size, mtime_ns, fingerprint), the previous listing) keeps its fingerprint without being read,
    as git's index does; the others are hashed, in threads (hashing releases the GIL).
    """
    from concurrent.futures import ThreadPoolExecutor

    known = known or {}
    keys = [_stat_key(p) for p in paths]
    fingerprints: list[str | None] = [None] * len(paths)
    todo = []
    for n, (path, key) in enumerate(zip(paths, keys)):
        fingerprints[n] = _recorded(key, known.get(path))
        if fingerprints[n] is None:
            todo.append(n)
    # plain files in threads; members one at a time (a process shares one handle per tar file,
    # whose reads seek: not thread-safe)
    files = [n for n in todo if split_member(paths[n]) is None]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for n, fp in zip(files, pool.map(content_fingerprint, [paths[n] for n in files])):
            fingerprints[n] = fp
    for n in set(todo) - set(files):
        fingerprints[n] = content_fingerprint(paths[n])
    sizes = [k[0] if k else -1 for k in keys]
    mtimes = [k[1] if k else -1 for k in keys]
    return sizes, mtimes, fingerprints


# the problem of a listed image whose bytes are no longer those the listing fingerprinted
CHANGED = ("changed since `diffmine prepare` listed it (its bytes no longer match the run's images.parquet); "
           "re-run `diffmine prepare` to list it anew")


def problem_may_be_fixed(problem: str) -> bool:
    """Whether an image's problem can go away without listing it anew: a file changed since it was
    listed (restored), or one that could not be read (missing, unmounted, no permission)."""
    return problem == CHANGED or problem.startswith("cannot read")


def listed_of(rows) -> list[tuple[int, int, str]]:
    """(size, mtime_ns, fingerprint) of each row of a run's listing, or of a frame that took those
    columns from it: what :func:`load_image` checks each image against."""
    return list(zip(rows["size"].tolist(), rows["mtime_ns"].tolist(), rows["fingerprint"].tolist()))


def listed_by_id(rows) -> dict[str, tuple[int, int, str]]:
    """:func:`listed_of` keyed by each row's ``image_id``: what readers that look images up by id
    (the report, features, trends, co-typicality) check each one against."""
    return dict(zip(rows["image_id"], listed_of(rows)))


def read_as_listed(path: str, listed: tuple[int, int, str]) -> bool:
    """Whether the image at ``path`` can be read and holds the bytes a run's listing fingerprinted
    (``listed``: its (size, mtime_ns, fingerprint) there): one stat, and a hash only when its size
    or mtime differ from the listed ones, as :func:`changed_since_listing`, which holds an unreadable
    file unchanged."""
    now = _fingerprint_now(path, listed)
    return bool(now) and now == listed[2]


def _fingerprint_now(path: str, listed: tuple[int, int, str]) -> str:
    """The image's fingerprint: the listed one while its size and mtime are the listed ones, else
    its bytes hashed ("" if unreadable)."""
    return _recorded(_stat_key(path), listed) or content_fingerprint(path)


def changed_since_listing(path: str, listed: tuple[int, int, str]) -> bool:
    """Whether the image at ``path`` is no longer the one a run's listing fingerprinted (``listed``:
    its (size, mtime_ns, fingerprint) there): edited or replaced since ``diffmine prepare``, or, in a
    received run whose images.parquet was edited, another file altogether.

    One stat per image: its bytes are hashed only when its size or mtime differ from the listed
    ones, so reading a few images of a million-image run re-hashes none (a received run's listed
    size and mtime are the sender's: another file passes unread only with both equal, to the
    nanosecond). An unreadable file is not "changed": decoding it names that problem (and
    typicality retries it).
    """
    now = _fingerprint_now(path, listed)
    return bool(now) and now != listed[2]
