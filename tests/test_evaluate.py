"""evaluate: masks found by image id taken literally, and only fresh clusters and baselines scored."""

from diffmine.evaluate import find_mask


def test_find_mask_takes_glob_characters_in_an_image_id_literally(tmp_path):
    folder = tmp_path / "fm" / "lab"
    folder.mkdir(parents=True)
    (folder / "a1.png").write_bytes(b"")
    assert find_mask(tmp_path / "fm", "lab/a[12].jpg") is None  # not a1.png: the brackets are a name
    (folder / "a[12].png").write_bytes(b"")
    assert find_mask(tmp_path / "fm", "lab/a[12].jpg") == folder / "a[12].png"
    assert find_mask(tmp_path / "fm", "lab/a1.jpg") == folder / "a1.png"
    assert find_mask(tmp_path / "fm", "lab/a?.jpg") is None
