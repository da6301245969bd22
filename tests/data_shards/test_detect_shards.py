"""`posebert shards detect`: the detector's 2D written beside the ground truth as ``det2d``, one
detection per frame shared by the overlapping windows that hold it, a rerun skips, --overwrite
redoes, a failure leaves the old split as it was, a split without frames is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import make_sample, read_split

from data_shards import detect_shards
from data_shards.detect import MISSED
from data_shards.manifest import Manifest
from data_shards.verify import stats_table, verify
from data_shards.write import write_split
from posebert.cli import main


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Real renders at 128 px (the detector upscales them to 256): train jump, val run, two
    cameras, 8-frame windows overlapping by 4, 25 fps (a few seconds to render)."""
    from data_shards.synth import SynthConfig, build_splits

    root = tmp_path_factory.mktemp("detect_shards")
    build_splits(root, SynthConfig(views=2, frames=8, size=128, fps=25.0),
                 splits={"train": ("jump",), "val": ("run",)}, progress=False)  # fmt: skip
    return root


@pytest.fixture
def shards(rendered, tmp_path):
    """A fresh copy of the renders for one test to rewrite."""
    return shutil.copytree(rendered, tmp_path / "shards")


def _by_frame(samples) -> dict[tuple, list[np.ndarray]]:
    """(clip, camera, frame) -> the det2d of that frame in every window holding it."""
    out: dict[tuple, list[np.ndarray]] = {}
    for s in samples:
        for v, view in enumerate(s.meta.views):
            for t, f in enumerate(s.meta.frames):
                out.setdefault((s.meta.clip, view.camera, f), []).append(s.det2d[v, t])
    return out


def _files(split_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split_dir.iterdir())}


def test_detections_are_written_beside_the_ground_truth(mediapipe, shards):
    before = read_split(shards / "train")
    done = detect_shards.detect_shards(shards, progress=False)
    assert set(done) == {"train", "val"}
    manifest = Manifest.load(shards / "train")
    assert manifest.has["det2d"] and manifest.generator["detect"] == done["train"]
    assert manifest.generator["command"] == "synth"  # what made the split is kept
    summary = done["train"]
    frames = {(s.meta.clip, v.camera, f) for s in before for v in s.meta.views
              for f in s.meta.frames}  # fmt: skip
    assert summary["streams"] == 2 and summary["frames"] == len(frames)
    # measured on these renders: found in 62 of 90 train frames, 28 of 40 val frames
    assert summary["rate"] >= 0.5 and done["val"]["rate"] >= 0.5
    after = read_split(shards / "train")
    assert [s.key for s in after] == [s.key for s in before]
    errors = []
    for old, new in zip(before, after, strict=True):
        assert new.meta.has["det2d"] and new.det2d.shape == (2, 8, 17, 3)
        np.testing.assert_array_equal(new.frames, old.frames)  # JPEGs copied, not re-encoded
        np.testing.assert_array_equal(new.pose2d, old.pose2d)
        found = new.det2d[..., 2].max(-1) > 0
        assert (new.det2d[~found] == MISSED).all()
        errors.append(np.linalg.norm(new.det2d[found][..., :2] - old.pose2d[found], axis=-1))
    # the detector's joints land near the projected ones (BlazePose's hips are not H36M's):
    # measured median 9 px on these 128 px crops (walk rendered the same way: 63 px, the
    # tracker holding a wrong pose; docs/results.md)
    assert np.median(np.concatenate(errors)) < 15
    shared = [d for d in _by_frame(after).values() if len(d) > 1]
    assert shared and all((d[0] == x).all() for d in shared for x in d[1:])
    assert verify(shards, progress=False) == []
    assert "train: det2d by shards detect: person found in" in stats_table(shards)


def test_two_workers_detect_exactly_what_one_does(mediapipe, rendered, tmp_path):
    one = shutil.copytree(rendered / "val", tmp_path / "one" / "val")
    two = shutil.copytree(rendered / "val", tmp_path / "two" / "val")
    detect_shards.detect_split(one, workers=1, progress=False)
    detect_shards.detect_split(two, workers=2, progress=False)
    for a, b in zip(read_split(one), read_split(two), strict=True):
        np.testing.assert_array_equal(a.det2d, b.det2d)


def _fake_detections(streams, config, workers, bar):
    """Stand-in for the detector: every third frame lost, the rest at a frame-dependent spot."""
    out = {}
    for key, jpegs in streams.items():
        dets = np.repeat(MISSED[None], len(jpegs), axis=0)
        for i in range(len(jpegs)):
            if (key[-1] + i) % 3:
                dets[i, :, :2], dets[i, :, 2] = key[-1] + i, 0.9
        out[key] = dets
        bar.update(len(jpegs))
    return out


def test_a_rerun_skips_and_overwrite_detects_again(shards, monkeypatch, capsys):
    monkeypatch.setattr(detect_shards, "detect_streams", _fake_detections)
    assert main(["shards", "detect", str(shards), "--splits", "val"]) == 0
    assert "val: person found in" in capsys.readouterr().out
    assert not Manifest.load(shards / "train").has["det2d"]  # only the named split
    files = _files(shards / "val")
    assert main(["shards", "detect", str(shards), "--splits", "val"]) == 0
    assert "val: carries det2d already, skipped" in capsys.readouterr().out
    assert _files(shards / "val") == files
    calls = []
    monkeypatch.setattr(detect_shards, "detect_streams",
                        lambda *a: calls.append(1) or _fake_detections(*a))  # fmt: skip
    assert main(["shards", "detect", str(shards / "val"), "--overwrite"]) == 0
    assert calls == [1] and "val: person found in" in capsys.readouterr().out
    assert sorted(p.name for p in shards.iterdir()) == ["train", "val"]  # no leftovers


def test_a_failure_mid_split_leaves_the_old_split_intact(shards, monkeypatch):
    monkeypatch.setattr(detect_shards, "detect_streams", _fake_detections)
    files = _files(shards / "train")
    written, original = [], detect_shards.with_det2d

    def fail_on_third(sample, table):
        if len(written) == 2:
            raise OSError("disk full")
        written.append(sample.key)
        return original(sample, table)

    monkeypatch.setattr(detect_shards, "with_det2d", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        detect_shards.detect_split(shards / "train", progress=False)
    assert _files(shards / "train") == files  # the old split, byte for byte
    assert sorted(p.name for p in shards.iterdir()) == ["train", "val"]  # no temp folder left
    assert not Manifest.load(shards / "train").has["det2d"]


def test_overlapping_windows_share_one_detection_per_frame(shards, monkeypatch):
    monkeypatch.setattr(detect_shards, "detect_streams", _fake_detections)
    detect_shards.detect_shards(shards, ["train"], progress=False)
    frames = _by_frame(read_split(shards / "train"))
    assert any(len(d) > 1 for d in frames.values())
    for (_, _, f), dets in frames.items():
        expected = MISSED if f % 3 == 0 else np.tile([f, f, 0.9], (17, 1))  # stream starts at 0
        for d in dets:
            np.testing.assert_allclose(d, expected, rtol=1e-6)


def test_streams_break_at_gaps_and_never_mix_cameras(tmp_path):
    samples = [make_sample(f"k{i}", views=2, frames=4, seed=0, clip="c") for i in range(2)]
    samples[1].meta.frames = [6, 7, 8, 9]  # frames 4 and 5 missing: a new stream at 6
    write_split(tmp_path, "train", samples, {}, {})
    streams = detect_shards.collect_streams(tmp_path / "train", Manifest.load(tmp_path / "train"))
    assert sorted(streams) == [("s0", "c", "cam0", 0, 0), ("s0", "c", "cam0", 0, 6),
                               ("s0", "c", "cam1", 0, 0), ("s0", "c", "cam1", 0, 6)]  # fmt: skip
    assert all(len(j) == 4 for j in streams.values())


def test_a_split_without_frames_is_refused_in_one_line(tmp_path, capsys):
    sample = make_sample()
    sample.meta.has["frames"] = False
    sample.meta.has["masks"] = False
    write_split(tmp_path, "train", [sample], {}, {})
    assert main(["shards", "detect", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "split 'train'" in err and "has no frames to detect on" in err
    assert main(["shards", "detect", str(tmp_path), "--splits", "val"]) == 2
    assert "no split 'val'" in capsys.readouterr().err


def test_detector_fields_are_set_from_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["shards", "detect", str(tmp_path), "--set", "help"])
    assert "min_torso" in capsys.readouterr().out
