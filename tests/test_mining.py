import numpy as np
import pandas as pd
import pytest

from diffmine.mining import TopN, greedy_boxes, patch_scores


def test_patch_scores_equal_brute_force_means():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(11, 9)).astype(np.float32)
    k = 4
    scores = patch_scores(values, k)
    assert scores.shape == (8, 6)
    for y in range(8):
        for x in range(6):
            assert scores[y, x] == pytest.approx(values[y:y + k, x:x + k].mean(), abs=1e-5)


def test_greedy_boxes_take_the_best_and_never_overlap_or_touch():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(40, 40))
    k = 6
    scores = patch_scores(values, k)
    boxes = greedy_boxes(scores, k, 5)
    assert len(boxes) == 5
    assert boxes[0][2] == pytest.approx(scores.max())
    assert [b[2] for b in boxes] == sorted([b[2] for b in boxes], reverse=True)
    for i, (y, x, _) in enumerate(boxes):
        for y2, x2, _ in boxes[i + 1:]:
            # apart in at least one axis by more than k: no shared or adjacent pixel
            assert abs(y - y2) > k or abs(x - x2) > k


def test_touching_box_is_suppressed_but_one_pixel_gap_is_allowed():
    scores = np.zeros((30, 30))
    scores[0, 0] = 10   # box x in [0, 5)
    scores[0, 5] = 9    # touches it (x = 5 is adjacent to 4): must be skipped
    scores[0, 6] = 8    # one pixel of gap: allowed
    boxes = greedy_boxes(scores, 5, 2)
    assert [(y, x) for y, x, _ in boxes] == [(0, 0), (0, 6)]


def test_greedy_boxes_stop_when_the_image_is_full():
    scores = patch_scores(np.ones((8, 8)), 4)
    assert len(greedy_boxes(scores, 4, 5)) == 1


def test_topn_keeps_the_best_per_label_whatever_the_chunking():
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"label": rng.choice(["a", "b"], 500), "typicality": rng.normal(size=500),
                          "image_id": [f"i{i}" for i in range(500)], "y0": 0, "x0": 0})
    acc = TopN(7)
    for start in range(0, 500, 23):
        chunk = frame.iloc[start:start + 23]
        acc.add(chunk)
    got = acc.result()
    for label, group in frame.groupby("label"):
        expected = sorted(group["typicality"], reverse=True)[:7]
        assert list(got[got["label"] == label]["typicality"]) == expected
