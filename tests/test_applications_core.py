"""Pure parts of translation, co-typicality and classification, on small tensors (no training)."""

import numpy as np
import pandas as pd
import pytest
import torch

from diffmine.classify import summarize
from diffmine.cotypicality import cotypical_boxes, reduce_blocks
from diffmine.models import create_backend
from diffmine.translate import SourceInjection, TranslateConfig, ddim_step, ddim_timesteps, target_labels


def test_ddim_step_is_invertible_for_a_fixed_eps():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a1, a2 = torch.tensor(0.9), torch.tensor(0.3)
    there = ddim_step(x, eps, a1, a2)
    assert not torch.allclose(there, x)
    assert torch.allclose(ddim_step(there, eps, a2, a1), x, atol=1e-5)
    # to alpha = 1 it returns the predicted clean latent
    x0 = (x - (1 - a1).sqrt() * eps) / a1.sqrt()
    assert torch.allclose(ddim_step(x, eps, a1, torch.tensor(1.0)), x0, atol=1e-6)


def test_ddim_timesteps_are_ascending_and_end_at_the_last_step():
    t = ddim_timesteps(1000, 50)
    assert t.shape == (50,) and int(t[-1]) == 999 and bool((t[1:] > t[:-1]).all()) and int(t[0]) > 0


def test_target_labels():
    assert target_labels(["a", "b"], "all") == ["a", "b"]
    assert target_labels(["a", "b"], "b") == ["b"]
    with pytest.raises(ValueError, match="unknown target"):
        target_labels(["a", "b"], "c")
    with pytest.raises(ValueError, match="method"):
        TranslateConfig(method="magic")


def test_source_injection_copies_the_source_branch_only_while_on():
    backend = create_backend("tiny", ["A x.", "A y.", "A."], seed=0)
    unet = backend.unet.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 48, 16, 16, generator=g)  # rows: source, unconditional, conditional
    states = backend.encode_prompts(["A x.", "A.", "A y."])
    t = torch.full((3,), 500)
    with torch.no_grad():
        reference = backend.denoiser(x, t, states)
        injection = SourceInjection(unet, 1, 1, [0, 1, 2])
        assert injection.attention_layers > 0
        seen = {}
        # registered after the injection hook, so it sees the (possibly replaced) output
        probe = unet.up_blocks[1].resnets[1].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.clone()))
        off = backend.denoiser(x, t, states)
        assert not torch.allclose(seen["out"][1], seen["out"][0])
        injection.features = injection.attention = True
        on = backend.denoiser(x, t, states)
        assert torch.equal(seen["out"][1], seen["out"][0]) and torch.equal(seen["out"][2], seen["out"][0])
        probe.remove()
        injection.remove()
        after = backend.denoiser(x, t, states)
    assert torch.equal(off, reference) and torch.equal(after, reference)
    assert torch.equal(on[0], reference[0])  # the source branch itself is untouched
    assert not torch.allclose(on[2], reference[2])


def test_cotypical_boxes_need_every_member():
    # the top-left is typical in every member (1, 1, 1); the bottom-right very typical in one
    # member only (9, 0, 0): the mean would pick the bottom-right, the median picks the top-left
    maps = np.zeros((3, 32, 32), np.float32)
    maps[:, 2:8, 2:8] = 1.0
    maps[0, 20:26, 20:26] = 9.0
    boxes = cotypical_boxes(maps, 6, 2)
    (y, x, score, members) = boxes[0]
    assert (y, x) == (2, 2) and score == pytest.approx(1.0)
    assert members.shape == (3,) and np.allclose(members, 1.0)
    assert all(b[2] <= score for b in boxes[1:])


def test_reduce_blocks_reduces_each_label_separately():
    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)]
    reduced = reduce_blocks(blocks, 3, seed=0)
    assert reduced.shape == (40, 6)
    assert np.allclose(reduced, reduce_blocks(blocks, 3, seed=0))  # seeded


def test_summarize_confusion_matrix():
    rows = []
    truth = {"i1": "a", "i2": "a", "i3": "b", "i4": "b"}
    best = {"i1": "a", "i2": "b", "i3": "b", "i4": "b"}
    for image_id, label in truth.items():
        for candidate in ("a", "b"):
            rows.append(dict(image_id=image_id, label=label, candidate=candidate,
                             typicality=1.0 if candidate == best[image_id] else 0.0))
    summary = summarize(pd.DataFrame(rows), ["a", "b"])
    assert summary["accuracy"] == 0.75
    assert summary["confusion"] == [[1, 1], [0, 2]]
    assert summary["per_label"] == {"a": 0.5, "b": 1.0}


def test_a_retry_killed_between_its_two_files_leaves_a_complete_shard_that_is_retried_again(tmp_path, monkeypatch):
    """retry_in_shard writes the shard's arrays, then its index: killed between the two, the old
    index still finds every key it lists (the kept ones, as stored), so the shard is complete and
    its bad rows are retried by the next call, which puts the fixed image's rows in their place."""
    import diffmine.shards
    from diffmine.data import CHANGED
    from diffmine.shards import images_to_retry, read_array, retry_in_shard, shard_is_complete, write_shard
    from diffmine.translate import SHARD_SCHEMA, row_order

    def row(place, image_id, status, problem=None):
        return dict(index=place, image_id=image_id, path=f"/data/{image_id}", source_label="a", target_label="b",
                    height=2 if status == "ok" else 0, width=2 if status == "ok" else 0,
                    key=f"{place}/b" if status == "ok" else "", status=status, problem=problem)

    kept = np.full((2, 2, 3), 7, np.uint8)
    write_shard(tmp_path, "shard-00000", {"0/b": kept}, [row(0, "x.png", "ok"), row(1, "y.png", "bad", CHANGED)],
                SHARD_SCHEMA)
    images = pd.DataFrame({"index": [0, 1], "image_id": ["x.png", "y.png"]})
    retried = []

    def translate(frame):  # the fixed image, as compute_shard gives it: under its place in the shard
        retried.append(frame.index.tolist())
        return {"1/b": np.full((2, 2, 3), 9, np.uint8)}, [row(1, "y.png", "ok")]

    assert images_to_retry(tmp_path) == {"shard-00000": {"y.png"}}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(diffmine.shards, "write_table", killed)  # the index is never written
    with pytest.raises(KeyboardInterrupt):
        retry_in_shard(tmp_path, "shard-00000", images, {"y.png"}, translate, SHARD_SCHEMA, row_order)
    monkeypatch.undo()
    assert shard_is_complete(tmp_path, "shard-00000") and images_to_retry(tmp_path) == {"shard-00000": {"y.png"}}
    assert retry_in_shard(tmp_path, "shard-00000", images, {"y.png"}, translate, SHARD_SCHEMA, row_order)
    assert retried == [[1], [1]] and images_to_retry(tmp_path) == {}
    index = pd.read_parquet(tmp_path / "shard-00000.parquet")
    assert index["status"].tolist() == ["ok", "ok"] and index["key"].tolist() == ["0/b", "1/b"]
    np.testing.assert_array_equal(read_array(tmp_path, "shard-00000", "0/b"), kept)
    assert int(read_array(tmp_path, "shard-00000", "1/b")[0, 0, 0]) == 9
