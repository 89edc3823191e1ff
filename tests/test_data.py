import io
import json
import os
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from diffmine import data
from diffmine.data import BadImage, DatasetError, fingerprint_images, iter_images, load_image, scan_dataset


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        for i in range(3):
            _png(tmp_path / label / f"{i}.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    return tmp_path


def test_folder_listing_names_images_by_relative_path(folder):
    ds = scan_dataset(folder)
    assert ds.label_names == ["a", "b"]
    assert "a/0.png" in ds.image_ids and len(ds) == 6


def test_one_label_is_refused_with_the_reason(tmp_path):
    _png(tmp_path / "only" / "x.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match="1 label.*'only'.*at least 2"):
        scan_dataset(tmp_path)


def test_manifest_problems_are_listed_not_raised(folder):
    (folder / "m.csv").write_text("path,label\na/0.png,a\nb/0.png,b\n../outside.png,a\nmissing.png,b\na/1.png,\n")
    ds = scan_dataset(folder / "m.csv")
    assert ds.image_ids == ["a/0.png", "b/0.png"]
    problems = {p.image_id: p.problem for p in ds.problems}
    assert "outside the dataset root" in problems["../outside.png"]
    assert "file not found" in problems["missing.png"]
    assert "empty label" in problems["a/1.png"]


def test_a_name_that_is_no_utf8_or_no_regular_file_is_a_problem_the_rest_listed(folder):
    """A Latin-1 file name (or label folder) failed the whole listing when its table was written,
    naming no file; a pipe named x.png was listed, and hashing it waited forever."""
    image = (folder / "a" / "0.png").read_bytes()
    (folder / "b" / "caf\udce9.png").write_bytes(image)  # the bytes b"caf\xe9.png", as os.listdir gives them
    (folder / "l\udce4nd").mkdir()
    (folder / "l\udce4nd" / "x.png").write_bytes(image)
    os.mkfifo(folder / "a" / "pipe.png")
    ds = scan_dataset(folder)
    assert sorted(ds.image_ids) == [f"{label}/{i}.png" for label in "ab" for i in range(3)]
    problems = {p.image_id: (p.path, p.problem) for p in ds.problems}
    assert problems["b/caf\\xe9.png"] == (f"{folder}/b/caf\\xe9.png",
                                          "its name (or its label's) is not UTF-8: rename it to list it")
    assert "not UTF-8" in problems["l\\xe4nd/x.png"][1]
    assert problems["a/pipe.png"][1] == "not a regular file: a device or a pipe"
    ds.table()  # every listed name, and every problem's, can be stored
    assert pa.table({"path": [p.path for p in ds.problems]}).num_rows == 3


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl"])
def test_a_manifest_saved_with_a_byte_order_mark_is_read(folder, name):
    """Excel's "CSV UTF-8" starts the file with a BOM: its header read '\\ufeffpath', refused."""
    rows = [("a/0.png", "a"), ("b/1.png", "b")]
    text = "path,label\n" + "".join(f"{p},{l}\n" for p, l in rows) if name.endswith("csv") else \
        "".join(json.dumps({"path": p, "label": l}) + "\n" for p, l in rows)
    (folder / name).write_text(text, encoding="utf-8-sig")
    assert scan_dataset(folder / name).image_ids == ["a/0.png", "b/1.png"]


def test_jsonl_manifest_and_unknown_label(folder):
    rows = [{"path": "a/0.png", "label": "a"}, {"path": "b/0.png", "label": "b"}, {"path": "b/1.png", "label": "c"}]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = scan_dataset(folder / "m.jsonl", labels=["a", "b"])
    assert ds.image_ids == ["a/0.png", "b/0.png"]
    assert any("unknown label 'c'" in p.problem for p in ds.problems)


def test_manifest_without_columns_is_a_clear_error(folder):
    (folder / "m.csv").write_text("file,class\na/0.png,a\n")
    with pytest.raises(DatasetError, match="needs 'path' and 'label'"):
        scan_dataset(folder / "m.csv")


@pytest.mark.parametrize("make,problem", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10), "cannot decode"),
    (lambda p: p.write_bytes(b"not an image at all"), "cannot decode"),
])
def test_bad_files_raise_badimage_naming_the_file(tmp_path, make, problem):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(BadImage, match=problem) as info:
        load_image(path, 16)
    assert str(path) in str(info.value)


def test_truncated_file_is_bad(tmp_path):
    path = tmp_path / "t.png"
    _png(path, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(BadImage):
        load_image(path, 16)


def test_a_file_that_cannot_be_opened_is_unreadable_not_corrupt(tmp_path, monkeypatch):
    """No permission on a listed file (or an I/O error): a problem of reading it, which may be fixed
    while the listing stays (typicality retries it, a result that left it out is made again), not
    of its content ("cannot decode image (PermissionError: ...)" was kept for good)."""
    from diffmine.typicality import bad_status

    path = tmp_path / "a.png"
    _png(path, np.zeros((16, 16, 3), np.uint8))

    def denied(source, *args, **kwargs):  # what opening a file without read permission raises (not as root)
        raise PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(data.Image, "open", denied)
    with pytest.raises(BadImage) as info:
        load_image(path, 16)
    assert info.value.problem == "cannot read file (Permission denied)"
    assert data.problem_may_be_fixed(info.value.problem) and bad_status(info.value) == "unreachable"


def test_huge_image_is_refused_without_decoding(tmp_path, monkeypatch):
    import diffmine.data as data

    path = tmp_path / "big.png"
    _png(path, np.zeros((300, 300, 3), np.uint8))
    monkeypatch.setattr(data, "MAX_PIXELS", 10_000)
    with pytest.raises(BadImage, match="too large"):
        load_image(path, 16)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "LA", "P", "I;16"])
def test_any_mode_becomes_rgb_uint8(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    if mode == "I;16":
        img = Image.fromarray((np.arange(400).reshape(20, 20) * 150).astype(np.uint16))
    else:
        img = Image.new(mode, (20, 10))
    img.save(path)
    out = load_image(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    if mode == "I;16":  # 16-bit range scaled, not clipped: the brightest pixel stays bright
        assert out.max() > 200


def test_alpha_is_composited_over_white(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert load_image(path, 8).min() == 255


def test_keep_aspect_resize_rounds_width_to_the_latent_multiple(tmp_path):
    path = tmp_path / "w.png"
    _png(path, np.zeros((100, 250, 3), np.uint8))
    out = load_image(path, 32, "keep-aspect", multiple=8)
    assert out.shape == (32, 80, 3)


def test_keep_aspect_refuses_a_strip_instead_of_allocating_it(tmp_path):
    """A 64000 x 1 PNG is a few hundred bytes; kept at its aspect it would be 4 million px wide."""
    from diffmine.data import MAX_ASPECT

    path = tmp_path / "strip.png"
    _png(path, np.zeros((1, 64000, 3), np.uint8))
    with pytest.raises(BadImage, match=r"strip.png.*64000x1, wider than 10:1.*--resize square"):
        load_image(path, 64, "keep-aspect", multiple=4)
    assert load_image(path, 8, "square").shape == (8, 8, 3)
    _png(path, np.zeros((10, 10 * MAX_ASPECT, 3), np.uint8))  # at the cap: kept
    assert load_image(path, 8, "keep-aspect", multiple=4).shape == (8, 80, 3)


def test_iter_images_reports_bad_files_in_order(tmp_path):
    good = tmp_path / "g.png"
    _png(good, np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "b.png"
    bad.write_bytes(b"")
    for workers in (0, 1):
        items = list(iter_images([str(good), str(bad), str(good)], 8, workers=workers))
        assert [i for i, _ in items] == [0, 1, 2]
        assert isinstance(items[1][1], BadImage) and items[0][1].shape == (8, 8, 3)
        assert isinstance(items[0][1], np.ndarray)  # with workers too (doersch's features need an array)


@pytest.mark.parametrize("labels", [(0, 1), (0, "x"), ("1990-01-01", "2000-01-01")])
def test_jsonl_labels_are_read_as_written(folder, labels):
    rows = [{"path": "a/0.png", "label": labels[0]}, {"path": "b/0.png", "label": labels[1]}]
    (folder / "m.jsonl").write_text("\n\n".join(json.dumps(r) for r in rows))
    assert scan_dataset(folder / "m.jsonl").labels == [str(label) for label in labels]


def test_jsonl_line_that_is_not_json_is_named(folder):
    (folder / "bad.jsonl").write_text('{"path": "a/0.png", "label": 0}\n{"path": "b/0.png" "label": 1}\n')
    with pytest.raises(DatasetError, match="line 2 is not JSON"):
        scan_dataset(folder / "bad.jsonl")


# --------------------------------------------------------------------------------------------
# WebDataset tar shards and Hugging Face datasets


def _encoded(array, fmt="png"):
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt)
    return out.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """Two shards of 3 samples, labels as .cls, .txt and .json; returns (folder, pixels by image_id)."""
    rng = np.random.default_rng(0)
    pixels = {}
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:04d}.tar", "w") as tar:
            for i, (extension, label) in enumerate([("cls", b"a"), ("txt", b"b\n"), ("json", b'{"label": "a"}')]):
                array = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                _add(tar, f"dir/{s}{i}.png", _encoded(array))
                _add(tar, f"dir/{s}{i}.{extension}", label)
                pixels[f"shard-{s:04d}.tar/dir/{s}{i}.png"] = array
    return tmp_path, pixels


def test_tar_shards_by_pattern_folder_and_file_decode_like_files(shards):
    folder, pixels = shards
    ds = scan_dataset(folder / "shard-{0000..0001}.tar")
    assert ds.image_ids == list(pixels) and ds.labels == ["a", "b", "a"] * 2 and not ds.problems
    assert ds.paths[0] == f"{folder}/shard-0000.tar#dir/00.png"
    assert scan_dataset(folder).image_ids == ds.image_ids
    assert scan_dataset(folder / "shard-0001.tar").image_ids == ds.image_ids[3:]
    for path, expected in zip(ds.paths, pixels.values()):
        np.testing.assert_array_equal(load_image(path, 16), expected)
    # workers forked after this process opened the shards read them through their own handles
    for workers in (0, 2):
        decoded = dict(iter_images(ds.paths, 16, workers=workers))
        for n, expected in enumerate(pixels.values()):
            np.testing.assert_array_equal(np.asarray(decoded[n]), expected)


def test_bad_tar_members_are_problems_naming_shard_and_member(shards):
    folder, _ = shards
    with tarfile.open(folder / "shard-0002.tar", "w") as tar:
        _add(tar, "nolabel.png", _encoded(np.zeros((8, 8, 3), np.uint8)))
        _add(tar, "corrupt.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        _add(tar, "corrupt.cls", b"b")
        _add(tar, "badjson.png", _encoded(np.zeros((8, 8, 3), np.uint8)))
        _add(tar, "badjson.json", b"{oops")
    (folder / "shard-0003.tar").write_bytes((folder / "shard-0000.tar").read_bytes()[:1500])  # truncated
    ds = scan_dataset(folder / "shard-{0000..0004}.tar")
    problems = {p.image_id: (p.path, p.problem) for p in ds.problems}
    assert problems["shard-0002.tar/nolabel.png"] == (f"{folder}/shard-0002.tar#nolabel.png",
                                                      "sample 'nolabel' has no label (a non-empty .cls, .json, .txt member)")
    assert "unreadable label member badjson.json" in problems["shard-0002.tar/badjson.png"][1]
    assert "unreadable tar shard" in problems["shard-0003.tar"][1]
    assert problems["shard-0004.tar"][1] == "no such tar shard"
    # the corrupt image is listed; decoding it names the shard and the member
    corrupt = ds.paths[ds.image_ids.index("shard-0002.tar/corrupt.png")]
    with pytest.raises(BadImage, match=r"shard-0002\.tar#corrupt\.png: cannot decode image"):
        load_image(corrupt, 16)
    with pytest.raises(BadImage, match="cannot read the member"):
        load_image(f"{folder}/shard-0002.tar#missing.png", 16)


def test_hugging_face_saved_folder_and_hf_prefix(folder, tmp_path_factory, monkeypatch):
    datasets = pytest.importorskip("datasets")
    tmp_path = tmp_path_factory.mktemp("hf")  # outside the image folder, which load_dataset reads whole
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    expected = [load_image(folder / label / f"{i}.png", 16) for label in "ab" for i in range(3)]
    # save_to_disk stores the image bytes in Arrow files; a selection is stored in order
    datasets.DatasetDict({"train": loaded.select([4, 0])}).save_to_disk(tmp_path / "saved", num_shards={"train": 2})
    ds = scan_dataset(tmp_path / "saved")
    assert ds.image_ids == ["train/000000", "train/000001"] and ds.labels == ["b", "a"]
    assert ds.paths[1] == f"{tmp_path}/saved/train/data-00001-of-00002.arrow#image/0"
    for path, want in zip(ds.paths, [expected[4], expected[0]]):
        np.testing.assert_array_equal(load_image(path, 16), want)
    # load_dataset of a local imagefolder keeps the image files: they are read in place
    ds = scan_dataset(f"hf:{folder}")
    assert ds.labels == ["a"] * 3 + ["b"] * 3 and ds.paths[0] == str(folder / "a" / "0.png")


def test_hugging_face_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DatasetError, match="pip install datasets"):
        scan_dataset("hf:someone/cars")


def test_an_image_changed_since_listing_is_refused_and_an_unchanged_one_is_not_read_twice(tmp_path, monkeypatch):
    path = tmp_path / "a" / "0.png"
    _png(path, np.full((8, 8, 3), 10, np.uint8))
    sizes, mtimes, fingerprints = fingerprint_images([str(path)])
    listed = (sizes[0], mtimes[0], fingerprints[0])
    hashed = []
    real = data.content_fingerprint
    monkeypatch.setattr(data, "content_fingerprint", lambda p: hashed.append(p) or real(p))
    assert load_image(path, 8, listed=listed)[0, 0].tolist() == [10, 10, 10]
    assert hashed == []  # size and mtime as listed: trusted unread, as by the listing's own shortcut
    os.utime(path, ns=(mtimes[0] + 10**9, mtimes[0] + 10**9))  # touched (or copied without its times)
    assert load_image(path, 8, listed=listed)[0, 0].tolist() == [10, 10, 10]  # hashed: the same bytes
    assert hashed == [path]
    _png(path, np.full((8, 8, 3), 200, np.uint8))  # edited in place
    with pytest.raises(BadImage, match=r"0\.png: changed since `diffmine prepare` listed it .*re-run `diffmine prepare`"):
        load_image(path, 8, listed=listed)
    assert load_image(path, 8)[0, 0].tolist() == [200, 200, 200]  # unchecked without a listing
    items = list(iter_images([str(path)], 8, listed=[listed]))
    assert isinstance(items[0][1], BadImage) and items[0][1].problem == data.CHANGED
    path.unlink()  # unreadable is not "changed": decoding names that problem (typicality retries it)
    with pytest.raises(BadImage, match="cannot read file"):
        load_image(path, 8, listed=listed)
