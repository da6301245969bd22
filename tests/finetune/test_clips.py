"""The one reader of labelled clips: windows tiled per (clip, camera), optional frames, world
motion runs, nested labelled subsets."""

from __future__ import annotations

import numpy as np
import pytest

from data_shards.manifest import find_splits
from finetune.clips import (
    labelled_subset,
    read_motion,
    read_sequences,
    read_split,
)


def test_read_split_gives_each_sample_once_in_manifest_order(lift_shards):
    split = find_splits(lift_shards)["train"]
    keys = [k for batch in read_split(split, batch_size=3) for k in batch["keys"]]
    again = [k for batch in read_split(split, batch_size=64) for k in batch["keys"]]
    assert keys == again and len(keys) == len(set(keys))
    from data_shards.manifest import Manifest

    assert len(keys) == Manifest.load(split).samples


def test_frames_come_from_the_same_window_as_the_labels(lift_shards):
    split = find_splits(lift_shards)["val"]
    plain = read_sequences(split, "val")
    framed = read_sequences(split, "val", frames=True, size=32)
    assert [s[:6] for s in plain] == [s[:6] for s in framed] and plain[0].images is None
    for a, b in zip(plain, framed, strict=True):
        assert b.images.shape == (a.frames, 3, 32, 32) and b.images.dtype == np.uint8
        assert b.image_size == (32, 32)  # labels follow the resize exactly
        np.testing.assert_allclose(b.pose2d, a.pose2d * 32 / 64, atol=1e-3)
        np.testing.assert_array_equal(b.pose3d, a.pose3d)
        assert b.images.std() > 0


def test_motion_runs_cover_the_clips_the_sequences_cover(lift_shards):
    split = find_splits(lift_shards)["train"]
    motion = {c.name: c for c in read_motion(split, "train")}
    sequences = read_sequences(split, "train")
    assert {s.clip: s.frames for s in sequences} == {n: len(c.poses) for n, c in motion.items()}
    for c in motion.values():
        step = np.linalg.norm(np.diff(c.poses, axis=0), axis=-1).mean(-1)
        assert step.max() < 100  # mm per frame: no jump where windows hand over


def test_labelled_subsets_are_nested_seeded_and_never_empty():
    ids = [f"w{i:03d}" for i in range(200)]
    sets = [labelled_subset(ids, f, seed=7) for f in (0.01, 0.1, 0.5, 1.0)]
    assert [len(s) for s in sets] == [2, 20, 100, 200]
    assert all(a <= b for a, b in zip(sets, sets[1:], strict=False))
    assert labelled_subset(ids[::-1], 0.1, seed=7) == sets[1]  # order of the input is irrelevant
    assert labelled_subset(ids, 0.1, seed=8) != sets[1]
    assert len(labelled_subset(ids[:3], 0.01, seed=0)) == 1 and labelled_subset(ids, 0, 0) == set()
    with pytest.raises(ValueError, match="no ids"):
        labelled_subset([], 0.5, seed=0)


def test_an_empty_split_is_named(tmp_path):
    from data_shards.manifest import Manifest

    (tmp_path / "val").mkdir()
    Manifest("val", [], views=1, frames=8, image_size=(8, 8), fps=50.0, has={}).save(
        tmp_path / "val"
    )
    with pytest.raises(ValueError, match="'val'.*is empty"):
        read_sequences(tmp_path / "val", "val")
    with pytest.raises(ValueError, match="'val'.*is empty"):
        read_motion(tmp_path / "val", "val")
