"""Lifting from a real detector's keypoints (`finetune lift --input detected`): the det2d the
shards carry is every keypoint method's 2D input, lost frames are filled and counted, the
recipe's imitation noise is off unless set, and shards without det2d are refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data_shards import detect_shards
from finetune.clips import read_splits
from finetune.heads.lift import run
from finetune.heads.lift.base import model_inputs
from finetune.heads.lift.data import fill_lost, input_2d, lost_frames
from posebert.cli import main

QUICK = ["--set", "steps=15", "--set", "channels=16", "--set", "batch_size=32"]


def test_lost_frames_are_interpolated_between_the_nearest_detections_and_held_at_the_ends():
    det = np.zeros((6, 17, 3), np.float32)
    for t, x in ((1, 10.0), (4, 40.0)):  # found at frames 1 and 4 only
        det[t, :, 0], det[t, :, 1], det[t, :, 2] = x, 2 * x, 0.8
    det[4, 3, 2] = 0.0  # one unsure joint of a found frame: the frame still counts as found
    assert lost_frames(det).tolist() == [True, False, True, True, False, True]
    xy = fill_lost(det, (64, 48))
    np.testing.assert_allclose(xy[:, 0, 0], [10, 10, 20, 30, 40, 40])  # held, lerp, held
    np.testing.assert_allclose(xy[:, 5, 1], [20, 20, 40, 60, 80, 80])
    np.testing.assert_allclose(xy[4], det[4, :, :2])  # detected frames as they are
    det[2, :, :2], det[2, :, 2] = 99.0, 0.3  # found, but unsure of every joint
    assert lost_frames(det).tolist() == [True, False, False, True, False, True]
    assert lost_frames(det, min_confidence=0.5).tolist() == [True, False, True, True, False,
                                                               True]  # fmt: skip
    np.testing.assert_allclose(fill_lost(det, (64, 48), 0.5)[:, 0, 0], [10, 10, 20, 30, 40, 40])
    assert fill_lost(det, (64, 48))[2, 0, 0] == 99.0
    never = fill_lost(np.zeros((3, 17, 3), np.float32), (64, 48))
    assert never.shape == (3, 17, 2) and (never == [32, 24]).all()  # the crop's centre


def _detected_like_this(sample, table):
    """Stand-in for the detector on the 64 px renders: the projections moved by 3 px, frames
    whose index is a multiple of 5 lost (x = y = confidence = 0)."""
    det = np.concatenate([sample.pose2d + 3.0, np.full(sample.pose2d.shape[:-1] + (1,), 0.7)],
                         -1).astype(np.float32)  # fmt: skip
    det[:, [t for t, f in enumerate(sample.meta.frames) if f % 5 == 0]] = 0.0
    sample.det2d = det
    sample.meta.has = {**sample.meta.has, "det2d": True}
    return sample


@pytest.fixture(scope="module")
def detected_shards(lift_shards, tmp_path_factory):
    """The session's 64 px renders with a stand-in detector's det2d (the real rewrite path)."""
    root = shutil.copytree(lift_shards, tmp_path_factory.mktemp("detected") / "shards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(detect_shards, "detect_streams",
                   lambda streams, *a: {k: np.zeros((len(j), 17, 3), np.float32)
                                        for k, j in streams.items()})  # fmt: skip
        mp.setattr(detect_shards, "with_det2d", _detected_like_this)
        detect_shards.detect_shards(root, progress=False)
    return root


def test_every_keypoint_method_reads_the_detections(detected_shards):
    splits = read_splits(detected_shards)
    seq = splits["val"][0]
    assert seq.det2d is not None and seq.det2d.shape == (seq.frames, 17, 3)
    method = run.get_method("cyclic")
    config = run.build_config(method, "encoder loss only", [], "detected")
    assert (config.input, config.noise_px, config.drop_prob) == ("detected", 0.0, 0.0)
    px = model_inputs(splits["val"], config, "val")
    for s, x in zip(splits["val"], px, strict=True):
        np.testing.assert_array_equal(x, fill_lost(s.det2d, s.image_size))
        found = ~lost_frames(s.det2d)
        np.testing.assert_allclose(x[found], s.pose2d[found] + 3.0, atol=1e-4)
    noisy = run.build_config(method, "encoder loss only", ["noise_px=2"], "detected")
    assert noisy.noise_px == 2.0 and noisy.drop_prob == 0.0  # --set still applies
    moved = model_inputs(splits["val"], noisy, "val")[0] - px[0]
    assert 1.5 < moved.std() < 2.5
    assert run.build_config(method, "encoder loss only", []).noise_px == 2.0  # gt: the recipe
    assert input_2d(seq, "gt") is seq.pose2d


def test_cli_lifts_from_detections_and_says_so(detected_shards, tmp_path, capsys):
    out = tmp_path / "tcn"
    base = ["finetune", "lift", "--method", "tcn", "--shards", str(detected_shards), "--out",
            str(out), "--rows", "rf1", *QUICK]  # fmt: skip
    assert main([*base, "--input", "detected"]) == 0
    result = json.loads((out / "lift.json").read_text())
    protocol = result["protocol"]
    assert protocol["input"] == "detected" and "det2d" in protocol["inputs"]
    for split in ("train", "val", "test"):  # every frame whose index is a multiple of 5
        counts = protocol["detected"][split]
        assert 0.15 < counts["lost_share"] < 0.25 and counts["sequences_never_found"] == 0
    row = result["rows"]["rf1"]
    assert row["config"]["input"] == "detected" and "--input detected" in row["command"]
    assert set(row["scores"]) == {"val", "test"}  # scored on every frame against the 3D
    md = (out / "lift.md").read_text()
    assert "Input (`--input detected`)" in md and "lost the person in" in md
    capsys.readouterr()
    assert main([*base, "--input", "gt"]) == 0  # another input: the row is trained again
    assert "rf1: training" in capsys.readouterr().out
    assert json.loads((out / "lift.json").read_text())["protocol"]["input"] == "gt"


def test_the_image_head_says_its_input_is_the_frames():
    words = run.describe_input(run.get_method("hrnet"), ["detected"])
    assert words.startswith("the frames") and "does not change" in words
    assert "det2d" in run.describe_input(run.get_method("tcn"), ["detected"])


@pytest.mark.fault(
    "Lifting heads and the ablation",
    "`finetune lift --input detected` on shards without detected keypoints (det2d)",
    injected="the command run on synthetic shards that never went through `shards detect`",
)
def test_shards_without_det2d_are_refused_in_one_line_naming_the_fix(lift_shards, tmp_path,
                                                                      capsys,
                                                                      observed):  # fmt: skip
    args = ["finetune", "lift", "--method", "tcn", "--shards", str(lift_shards), "--out",
            str(tmp_path / "out"), "--input", "detected"]  # fmt: skip
    code = main(args)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"run `posebert shards detect {lift_shards}`" in err
    assert not (tmp_path / "out").exists()
    observed(f"exit {code}: {err}; output created: {(tmp_path / 'out').exists()}")


def test_real_detections_end_to_end(mediapipe, lift_shards, tmp_path, capsys):
    """The detector on the 64 px renders (upscaled to 256), then a short lift on its output."""
    shards = shutil.copytree(lift_shards, tmp_path / "shards")
    assert main(["shards", "detect", str(shards)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("person found in") == 3
    out = tmp_path / "cyclic"
    assert main(["finetune", "lift", "--method", "cyclic", "--shards", str(shards), "--out",
                 str(out), "--rows", "encoder loss only", "--input", "detected",
                 "--set", "steps=10", "--set", "width=32"]) == 0  # fmt: skip
    result = json.loads((out / "lift.json").read_text())
    assert result["protocol"]["input"] == "detected"
    for counts in result["protocol"]["detected"].values():
        assert 0 <= counts["lost_share"] < 1
    scores = result["rows"]["encoder loss only"]["scores"]
    assert all(np.isfinite(scores[s]["all"]["mpjpe"]) for s in ("val", "test"))
