"""Pretraining on a user's videos, end to end: ordinary H.264 files -> `shards video --detect`
(person-centred windows, no 3D labels) -> `posebert pretrain` with negatives that need no
poses (uniform, cosine); GT-pose negatives refused at the start with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def posebert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posebert", *args], capture_output=True,
                          text=True, timeout=600, env=ENV)  # fmt: skip


@pytest.fixture(scope="module")
def video_shards(mediapipe, tmp_path_factory) -> Path:
    """Three clips as 25 fps videos over photos (a user's camera roll), ingested with the
    detector: 64 px person crops, 8-frame windows, one view, no 3D."""
    from data_shards.clipvideo import ClipVideoConfig, render_clip_video

    root = tmp_path_factory.mktemp("videos")
    files = []
    for i, clip in enumerate(("walk", "dance_b", "getup_faceup")):
        files.append(root / f"{clip}.mp4")
        render_clip_video(files[-1], clip, ClipVideoConfig(seed=i, azimuth_deg=30 + 90 * i))
    r = posebert("shards", "video", *map(str, files), "--out", str(root / "shards"), "--detect",
                 "--frames", "8", "--stride", "4", "--size", "64")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "shards"


@pytest.mark.parametrize("negatives", ["uniform", "cosine"])
def test_pretraining_runs_on_detected_video_windows(video_shards, tmp_path, negatives):
    from data_shards.manifest import Manifest

    manifest = Manifest.load(video_shards / "train")
    assert manifest.views == 1 and not manifest.has["pose3d"] and manifest.has["det2d"]
    run = tmp_path / "run"
    r = posebert("pretrain", "--recipe", "debug_cpu", "--out", str(run),
                 "--set", f"data.train={video_shards / 'train'}", "--set", "data.views=none",
                 "--set", f"objective.negatives.kind={negatives}",
                 "--set", "train.progress=false")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and all(loss == loss for loss in losses)  # finite
    assert posebert("export", "--run", str(run), "--out", str(tmp_path / "enc")).returncode == 0


def test_gt_pose_negatives_are_refused_at_the_start(video_shards, tmp_path):
    r = posebert("pretrain", "--recipe", "debug_cpu", "--out", str(tmp_path / "run"),
                 "--set", f"data.train={video_shards / 'train'}", "--set", "data.views=none",
                 "--set", "objective.negatives.kind=gt_pose")  # fmt: skip
    assert r.returncode != 0
    assert "needs 3D poses" in r.stderr and "use negatives.kind='uniform' or 'cosine'" in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
