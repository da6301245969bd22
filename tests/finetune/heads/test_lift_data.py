"""Lifting data and the runner's scoring: sequences tiled from shard windows, detector noise,
normalisation, labelled subsets, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from data_shards.configtools import apply_overrides
from data_shards.manifest import find_splits
from finetune.clips import Sequence, read_sequences, read_splits
from finetune.evaluation.metrics import score_sequences
from finetune.heads.lift import base
from finetune.heads.lift.data import corrupt_2d, denormalize_2d, normalize_2d, root_relative_m

AREA = "Lifting heads and the ablation"  # of docs/reliability.md (tests/faultlog.py)


def test_sequences_tile_the_windows_once_per_frame_and_camera(lift_shards):
    splits = read_splits(lift_shards)
    assert set(splits) == {"train", "val", "test"}
    train = splits["train"]
    assert [(s.clip, s.camera) for s in train] == [
        ("jump", "cam0"), ("jump", "cam1"), ("walk", "cam0"), ("walk", "cam1")]  # fmt: skip
    for s in train:
        assert s.first_frame == 0 and s.pose2d.shape == (s.frames, 17, 2)
        assert s.pose3d.shape == (s.frames, 17, 3) and s.K.shape == (s.frames, 3, 3)
    # 8-frame windows every 4 frames cover the clip once: as many frames as the clip has
    from finetune.clips import read_motion

    clips = {c.name: len(c.poses) for c in read_motion(find_splits(lift_shards)["train"], "train")}
    assert {s.clip: s.frames for s in train} == clips


def test_labels_agree_the_3d_projects_onto_the_2d(lift_shards):
    s = read_sequences(find_splits(lift_shards)["val"], "val")[0]
    uvw = np.einsum("nij,nkj->nki", s.K.astype(np.float64), s.pose3d.astype(np.float64))
    np.testing.assert_allclose(uvw[..., :2] / uvw[..., 2:], s.pose2d, atol=1e-2)
    assert (s.pose3d[..., 2] > 1000).all()  # camera coordinates: the body is metres away


@pytest.mark.fault(
    AREA,
    "`finetune lift` on a root without splits, or with train only",
    injected="read_splits of an empty folder, and of the shards asked for train alone",
)
def test_missing_splits_are_named(tmp_path, lift_shards, observed):
    with pytest.raises(ValueError, match="no split directory") as none:
        read_splits(tmp_path)
    with pytest.raises(ValueError, match="no held-out split") as train_only:
        read_splits(lift_shards, names=("train",))
    assert "looked for: none asked for; the root has: " in str(train_only.value)
    assert "test" in str(train_only.value) and "val" in str(train_only.value)
    with pytest.raises(ValueError, match=r"looked for: valid;") as misspelt:
        read_splits(lift_shards, names=("train", "valid"))
    observed(str(misspelt.value))
    observed(str(none.value))
    observed(str(train_only.value))


def test_normalisation_round_trip_and_range():
    px = np.array([[0.0, 0.0], [64.0, 32.0], [128.0, 64.0]], dtype=np.float32)
    x = normalize_2d(px, (128, 64))
    np.testing.assert_allclose(x[:, 0], [-1, 0, 1])
    np.testing.assert_allclose(x[:, 1], [-0.5, 0, 0.5])
    np.testing.assert_allclose(denormalize_2d(x, (128, 64)), px, atol=1e-5)
    import torch

    np.testing.assert_allclose(normalize_2d(torch.from_numpy(px), (128, 64)).numpy(), x)


def test_root_relative_metres():
    pose = np.arange(17 * 3, dtype=np.float64).reshape(17, 3) * 1000
    out = root_relative_m(pose)
    assert (out[0] == 0).all() and out[1, 0] == pytest.approx(3.0)


def test_detector_noise_and_dropped_joints():
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 128, (2000, 17, 2)).astype(np.float32)
    np.testing.assert_array_equal(corrupt_2d(clean, 0, 0, rng), clean)
    noisy = corrupt_2d(clean, 3.0, 0, np.random.default_rng(1))
    assert np.std(noisy - clean) == pytest.approx(3.0, rel=0.05)
    dropped = corrupt_2d(clean, 0, 0.2, np.random.default_rng(2))
    moved = (dropped != clean).any(-1)
    assert moved.mean() == pytest.approx(0.2, abs=0.02)
    kept = ~moved
    centre = (clean * kept[..., None]).sum(1) / kept.sum(1, keepdims=True)
    frame, joint = np.argwhere(moved)[0]
    np.testing.assert_allclose(dropped[frame, joint], centre[frame], rtol=1e-5)


def test_labelled_clips_are_a_nested_seeded_share():
    seqs = [Sequence("train", f"c{i}", "a", "cam0", 0, 50.0, (64, 64), *([None] * 3))
            for i in range(10)]  # fmt: skip
    assert base.labelled_clips(seqs, 0.0, 0) == set()
    one = base.labelled_clips(seqs, 0.01, 0)
    assert len(one) == 1
    small, large = base.labelled_clips(seqs, 0.3, 0), base.labelled_clips(seqs, 0.7, 0)
    assert len(small) == 3 and len(large) == 7 and small <= large
    assert base.labelled_clips(seqs, 1.0, 5) == {f"c{i}" for i in range(10)}


def test_model_inputs_are_seeded_per_split(lift_shards):
    seqs = read_sequences(find_splits(lift_shards)["val"], "val")
    config = base.LiftConfig(noise_px=2.0, drop_prob=0.1)
    a = base.model_inputs(seqs, config, "val")
    np.testing.assert_array_equal(a[0], base.model_inputs(seqs, config, "val")[0])
    assert not np.array_equal(a[0], base.model_inputs(seqs, config, "test")[0])
    assert base.model_inputs(seqs, base.LiftConfig(), "val")[0] is seqs[0].pose2d


@pytest.mark.parametrize("field,value", [("steps", 0), ("drop_prob", 1.0), ("labels", 1.5),
                                         ("noise_px", -1.0), ("log_every", 0)])  # fmt: skip
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=f"LiftConfig.{field}"):
        base.LiftConfig(**{field: value})
    with pytest.raises(ValueError, match="optim: lr must be > 0"):  # the optimiser's own check
        apply_overrides(base.LiftConfig(), ["optim.lr=0"])


@pytest.mark.fault(AREA, "an unknown lifting `--method`", injected="get_method('x')")
def test_unknown_method_is_one_line(observed):
    with pytest.raises(ValueError, match="unknown lifting method 'x'; choose from tcn") as err:
        base.get_method("x")
    observed(str(err.value))


def test_score_by_hand(lift_shards):
    seqs = read_sequences(find_splits(lift_shards)["test"], "test")
    exact = [root_relative_m(s.pose3d) * 1000 for s in seqs]
    actions = [s.action for s in seqs]
    scores = score_sequences(exact, exact, actions)
    assert scores["all"]["mpjpe"] == pytest.approx(0, abs=1e-3)
    assert scores["all"]["mpjve"] == pytest.approx(0, abs=1e-3)
    assert scores["all"]["frames"] == sum(s.frames for s in seqs)
    shifted = [p + np.array([10.0, 0, 0]) for p in exact]  # every joint 10 mm off
    scores = score_sequences(shifted, exact, actions)
    assert scores["all"]["mpjpe"] == pytest.approx(10, rel=1e-4)
    assert scores["all"]["p_mpjpe"] == pytest.approx(0, abs=1e-3)
    assert scores["all"]["mpjve"] == pytest.approx(0, abs=1e-3)
    assert set(scores["per_action"]) == set(actions)


@pytest.mark.fault(
    AREA,
    "shards without 2D keypoints",
    injected="a sample written with pose2d None and has.pose2d false",
)
def test_samples_without_2d_or_cameras_are_named(tmp_path, observed):
    from conftest import make_sample

    from data_shards.write import write_split

    sample = make_sample(key="c-w000", views=1, frames=4, size=(8, 8))
    sample.pose2d, sample.meta.has["pose2d"] = None, False
    write_split(tmp_path, "train", [sample], {}, {})
    with pytest.raises(
        ValueError, match="samples carry no pose2d; lifting needs 2D keypoints"
    ) as err:
        read_sequences(tmp_path / "train", "train")
    observed(str(err.value))
