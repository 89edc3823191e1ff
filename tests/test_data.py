import json

import numpy as np
import pytest
from PIL import Image

from diffmine.data import BadImage, DatasetError, iter_images, load_image, scan_dataset


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


def test_iter_images_reports_bad_files_in_order(tmp_path):
    good = tmp_path / "g.png"
    _png(good, np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "b.png"
    bad.write_bytes(b"")
    for workers in (0, 1):
        items = list(iter_images([str(good), str(bad), str(good)], 8, workers=workers))
        assert [i for i, _ in items] == [0, 1, 2]
        assert isinstance(items[1][1], BadImage) and items[0][1].shape == (8, 8, 3)
