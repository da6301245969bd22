"""The parts of `posebert predict` that need no detector: runs, the lifter's crop, scoring
against a truth file, the drawing and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_shards.camera import person_box
from data_shards.skeleton import NUM_JOINTS
from finetune.predict.lifters import CropRule, crop_rule, runs, training_shards
from finetune.predict.render import RenderConfig, compose, side_view
from finetune.predict.run import score_truth
from finetune.predict.track import Track, scaled_size
from posebert.cli import main


def test_runs_are_the_stretches_of_detected_frames():
    assert runs(np.array([0, 1, 1, 0, 0, 1, 0, 1, 1, 1], bool)) == [(1, 3), (5, 6), (7, 10)]
    assert runs(np.ones(3, bool)) == [(0, 3)] and runs(np.zeros(4, bool)) == []


def test_the_crop_is_the_shards_rule_applied_to_the_detected_joints():
    rng = np.random.default_rng(0)
    joints = rng.uniform([100, 50], [300, 330], (5, NUM_JOINTS, 2))
    rule = CropRule(128, 0.2, "test")
    px, K = rule.to_crop(joints)
    for j, p, k in zip(joints, px, K, strict=True):
        x0, y0, x1, y1 = person_box(j, 0.2)
        np.testing.assert_allclose(p, (j - [x0, y0]) * 128 / (x1 - x0))
        np.testing.assert_allclose(k[:2, :2], np.eye(2) * 128 / (x1 - x0))
    # the joints' extent spans 1 / 1.4 of the crop: margin 0.2 on every side
    assert px[..., 0].max(-1).max() <= 128 and np.isclose(np.ptp(px[0], 0).max(), 128 / 1.4)


def test_the_lifter_names_its_shards_and_their_crop(tmp_path):
    out = tmp_path / "lift"
    out.mkdir()
    command = f"posebert finetune lift --method tcn --shards {tmp_path / 's'} --out {out}"
    (out / "lift.json").write_text(json.dumps({"rows": {"rf27": {"command": command}}}))
    assert training_shards(out, "rf27") == tmp_path / "s"
    assert training_shards(out, "rf1") is None and training_shards(tmp_path, "rf27") is None
    rule = crop_rule(tmp_path / "s")  # no manifest there: the synth defaults, and it says so
    assert (rule.size, rule.margin) == (128, 0.2) and "defaults" in rule.source


def _track(n: int, found: np.ndarray, joints_2d: np.ndarray) -> Track:
    return Track(path=None, size=(640, 360), fps=25.0, timestamps=np.arange(n) / 25,
                 joints_2d=joints_2d, confidence=np.ones((n, NUM_JOINTS)), detected=found,
                 declared_frames=n, stopped=None, seconds={})  # fmt: skip


def test_scores_against_the_truth_are_over_the_detected_frames(tmp_path):
    rng = np.random.default_rng(1)
    n = 6
    truth3 = rng.normal(0, 300, (n, NUM_JOINTS, 3)) + [0, 0, 4000]
    truth2 = rng.uniform(0, 360, (n, NUM_JOINTS, 2))
    np.savez(tmp_path / "t.npz", joints_3d=truth3, joints_2d=truth2)
    found = np.array([1, 1, 0, 1, 0, 1], bool)
    pred = truth3 - truth3[:, :1] + [10.0, 0, 0]  # 10 mm off on every joint but the root
    pred[:, 0] = 0
    pred[~found] = np.nan
    joints_2d = truth2 + [3.0, 4.0]
    mean_pose = np.zeros((NUM_JOINTS, 3))
    s = score_truth(pred, _track(n, found, joints_2d), tmp_path / "t.npz", mean_pose)
    assert s["frames_scored"] == 4 and s["detection_rate"] == pytest.approx(4 / 6, abs=1e-4)
    assert s["mpjpe"] == pytest.approx(10 * 16 / 17) and s["p_mpjpe"] < s["mpjpe"]
    assert s["detector_2d_px"]["median"] == pytest.approx(5.0)
    rel = truth3[found] - truth3[found][:, :1]
    assert s["mean_pose"]["mpjpe"] == pytest.approx(np.linalg.norm(rel, axis=-1).mean())
    nobody = score_truth(pred, _track(n, np.zeros(n, bool), joints_2d), tmp_path / "t.npz")
    assert nobody["mpjpe"] is None and nobody["frames_scored"] == 0
    with pytest.raises(ValueError, match="4 frames of truth, the video has 6"):
        np.savez(tmp_path / "short.npz", joints_3d=truth3[:4], joints_2d=truth2[:4])
        score_truth(pred, _track(n, found, joints_2d), tmp_path / "short.npz")


def test_the_side_view_turns_about_the_vertical():
    pose = np.array([[0.0, 0, 0], [100, -200, 50]] + [[0, 0, 0]] * (NUM_JOINTS - 2))
    front = side_view(pose, RenderConfig(azimuth_deg=0, elevation_deg=0))
    np.testing.assert_allclose(front, pose[:, :2])  # the camera's own view, orthographic
    side = side_view(pose, RenderConfig(azimuth_deg=90, elevation_deg=0))
    np.testing.assert_allclose(side[1], [-50, -200], atol=1e-9)  # depth becomes the x axis


def test_an_output_frame_is_the_video_beside_a_square_panel():
    frame = np.zeros((360, 640, 3), np.uint8)
    joints = np.random.default_rng(2).uniform(100, 300, (NUM_JOINTS, 2))
    pose = np.random.default_rng(3).normal(0, 300, (NUM_JOINTS, 3))
    out = compose(frame, joints, np.ones(NUM_JOINTS), pose, "0  0.00 s", RenderConfig())
    assert out.shape == (360, 1000, 3) and out[:, :640].any() and out[:, 640:].any()
    lost = compose(frame, None, None, None, "1  no person", RenderConfig())
    assert lost.shape == out.shape
    assert scaled_size((3840, 2160), 640) == (640, 360)
    assert scaled_size((1080, 1920), 640) == (360, 640) and scaled_size((320, 240), 640) == (
        320, 240)  # fmt: skip


def test_set_help_lists_the_fields(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "x.mp4", "--out", "o", "--set", "help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "detector.min_torso" in text and "render.azimuth_deg" in text
    assert main(["predict", "x.mp4", "--out", "o", "--set", "wobble=1"]) == 2
