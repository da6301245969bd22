"""Video ingest: H.264 files made here with PyAV -> shards -> decoded samples."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import read_split

from data_shards.video import (
    VideoConfig,
    VideoError,
    centre_box,
    crop_resize,
    expected_windows,
    ingest_videos,
    iter_video_samples,
    split_files,
    transform_points,
)
from data_shards.write import WriterConfig

W, H, FPS = 160, 96, 25
AREA = "Ingest"  # of docs/reliability.md (tests/faultlog.py)


def source_frame(i: int) -> np.ndarray:
    """(H, W, 3) smooth frame i: a gradient, a level that identifies i, a blob that moves."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    img = np.empty((H, W, 3))
    img[..., 0] = 40 + 4 * i  # frame identity
    img[..., 1] = xx / W * 200
    img[..., 2] = 60 + 120 * np.exp(-((xx - 40 - 2 * i) ** 2 + (yy - 48) ** 2) / 300)
    return img.clip(0, 255).astype(np.uint8)


def write_mp4(path: Path, num_frames: int, fps: int = FPS) -> Path:
    """An H.264 .mp4 of ``source_frame(0 .. num_frames - 1)`` (high quality, yuv420p)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "8"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(source_frame(i), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    return {"a": write_mp4(d / "clip a.mp4", 48), "b": write_mp4(d / "b.mp4", 20),
            "c": write_mp4(d / "c.mp4", 30), "short": write_mp4(d / "short.mp4", 5)}


def test_round_trip_frames_windows_and_keypoints(videos, tmp_path):
    rng = np.random.default_rng(1)
    kp = rng.uniform([0, 0], [W, H], size=(48, 17, 2))
    kp_dir = tmp_path / "kp"
    kp_dir.mkdir()
    np.save(kp_dir / "clip a.npy", kp)
    config = VideoConfig(size=(64, 64), frames=8, stride=4, keypoints=str(kp_dir), action="wave")
    manifests = ingest_videos([videos["a"]], tmp_path / "out", config, progress=False)
    samples = read_split(tmp_path / "out" / "train")
    assert set(manifests) == {"train"}
    assert len(samples) == expected_windows(48, config) == (48 - 8) // 4 + 1
    box = centre_box(W, H, (64, 64))
    assert box == (32.0, 0.0, 128.0, 96.0)  # the middle 96 x 96 square
    for s in samples:
        m = s.meta
        assert (m.source, m.clip, m.action, m.fps) == ("video", "clip_a", "wave", 25.0)
        assert m.has == {"frames": True, "masks": False, "pose3d": False, "pose2d": True,
                         "cameras": False, "det2d": False}
        assert [v.camera for v in m.views] == ["video"] and s.frames.shape == (1, 8, 64, 64, 3)
        assert m.frames == m.extra["source_frames"] == list(range(m.frames[0], m.frames[0] + 8))
        for t, i in enumerate(m.frames):
            expected = crop_resize(source_frame(i), box, (64, 64)).astype(float)
            assert np.abs(s.frames[0, t] - expected).mean() < 3.0
        # keypoints: (p - (x0, y0)) * 64 / 96, written independently of the code under test
        np.testing.assert_allclose(s.pose2d[0], (kp[m.frames] - [32, 0]) * (64 / 96), atol=1e-3)
    assert [s.meta.frames[0] for s in samples] == list(range(0, 41, 4))


def test_frames_are_the_right_source_frames(videos):
    """The red level 40 + 4 i identifies the source frame of every output frame."""
    config = VideoConfig(size=(32, 32), frames=4, fps=12.5)
    samples = list(iter_video_samples([videos["a"]], config, progress=False))
    for s in samples:
        assert s.meta.fps == 12.5
        src = s.meta.extra["source_frames"]
        assert src == [2 * k for k in s.meta.frames]  # 25 -> 12.5 fps takes every other frame
        red = s.frames[0, :, :, :, 0].mean(axis=(1, 2))
        np.testing.assert_allclose(red, 40 + 4 * np.array(src), atol=2.5)
    assert len(samples) == expected_windows(24, config) == 6


def test_fixed_crop_box_outside_the_image_is_black(videos):
    config = VideoConfig(size=(32, 16), frames=4, crop_box=(-80, 0, 80, 80))
    s = next(iter_video_samples([videos["a"]], config, progress=False))
    assert s.frames.shape == (1, 4, 16, 32, 3)
    assert s.frames[0, :, :, :14].max() < 12  # the left half of the box is outside the image
    assert s.frames[0, :, :, 18:].mean() > 30


@pytest.mark.parametrize("box", [(30.0, 10.0, 130.0, 70.0), (-40.0, -8.5, 100.0, 61.5)])
def test_crop_resize_is_the_transform_of_points(box):
    """A blob at a known sub-pixel spot lands where transform_points maps its centre."""
    yy, xx = np.mgrid[0:H, 0:W] + 0.5  # pixel centres (continuous convention)
    centre = np.array([70.3, 31.6])
    blob = 255 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * 3.0**2))
    image = np.repeat(blob[..., None], 3, -1).astype(np.uint8)
    crop = crop_resize(image, box, (50, 30))[..., 0].astype(np.float64)
    assert crop.shape == (30, 50)
    ys, xs = np.mgrid[0:30, 0:50] + 0.5
    found = np.array([(crop * xs).sum(), (crop * ys).sum()]) / crop.sum()
    assert np.abs(found - transform_points(centre, box, (50, 30))).max() < 0.03


@pytest.mark.fault(AREA, "a keypoints file with another frame count than its video",
                   injected="19 and 21 frames of keypoints for a 20-frame video")  # fmt: skip
def test_json_keypoints_with_wrong_frame_count(videos, tmp_path, observed):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(np.zeros((19, 17, 2)).tolist()))
    config = VideoConfig(frames=4, keypoints=str(path))
    with pytest.raises(VideoError, match=r"b\.mp4: keypoints file .*b\.json has 19 frames, the vi"
                       ) as fewer:  # fmt: skip
        list(iter_video_samples([videos["b"]], config, progress=False))
    path.write_text(json.dumps(np.zeros((21, 17, 2)).tolist()))
    with pytest.raises(VideoError, match=r"b\.json has 21 frames, the video has 20") as more:
        list(iter_video_samples([videos["b"]], config, progress=False))
    observed(str(fewer.value))
    observed(str(more.value))


@pytest.mark.fault(AREA, "a keypoints directory without the video's file",
                   injected="an empty directory given as the keypoints")  # fmt: skip
def test_missing_keypoints_file_in_directory(videos, tmp_path, observed):
    config = VideoConfig(frames=4, keypoints=str(tmp_path))
    with pytest.raises(VideoError, match="no keypoints file") as err:
        list(iter_video_samples([videos["b"]], config, progress=False))
    observed(str(err.value))


BAD_CONTENT = [b"", b"this is not a video\n" * 50, b"\x00\x00\x00\x18ftypmp42"]  # last: cut .mp4


@pytest.mark.fault(AREA, "an empty file, a text file or a cut .mp4 given as a video",
                   injected="broken.mp4 holding each, ingested after a good video")  # fmt: skip
@pytest.mark.parametrize("content", BAD_CONTENT)
def test_bad_video_file_is_one_clear_error(videos, tmp_path, content, observed):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(content)
    with pytest.raises(VideoError) as info:
        ingest_videos([videos["b"], bad], tmp_path / "out", VideoConfig(frames=4), progress=False)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert message.startswith(f"{bad}: ")
    assert not (tmp_path / "out" / "train").exists()  # nothing that looks like a split
    observed(f"{type(info.value).__name__}: {message}; split written: "
             f"{(tmp_path / 'out' / 'train').exists()}")  # fmt: skip


@pytest.mark.fault(AREA, "a video shorter than one window of T frames",
                   injected="a 5-frame video beside a 20-frame one, 8-frame windows")  # fmt: skip
def test_short_video_is_skipped_with_warning(videos, tmp_path, caplog, observed):
    with caplog.at_level(logging.WARNING, logger="data_shards.video"):
        ingest_videos([videos["short"], videos["b"]], tmp_path / "out", VideoConfig(frames=8),
                      WriterConfig(max_samples=1), split="test", progress=False)
    assert "short.mp4: skipped" in caplog.text
    samples = read_split(tmp_path / "out" / "test")
    assert {s.meta.clip for s in samples} == {"b"}
    assert len(samples) == expected_windows(20, VideoConfig(frames=8)) == 2
    observed(next(m for m in caplog.messages if "short.mp4" in m))
    with pytest.raises(ValueError, match="no video is as long as a window") as err:
        ingest_videos([videos["short"]], tmp_path / "out2", VideoConfig(frames=8), progress=False)
    observed(f"the short video alone: {err.value}")


def test_val_fraction_splits_by_file(videos, tmp_path):
    files = [videos["a"], videos["b"], videos["c"]]
    train, val = split_files(files, 0.34, seed=3)
    assert len(train) == 2 and len(val) == 1 and not set(train) & set(val)
    ingest_videos(files, tmp_path / "out", VideoConfig(frames=8), val_fraction=0.34, seed=3,
                  progress=False)
    clips = {split: {s.meta.clip for s in read_split(tmp_path / "out" / split)}
             for split in ("train", "val")}
    assert clips["val"] == {Path(val[0]).stem} and len(clips["train"]) == 2
    assert not clips["train"] & clips["val"]


@pytest.mark.fault(AREA, "two videos of the same name in different folders",
                   injected="a copy of b.mp4 in another folder, ingested with a val "
                   "fraction")  # fmt: skip
def test_clip_name_clash_across_directories(videos, tmp_path, observed):
    other = tmp_path / "b.mp4"
    other.write_bytes(videos["b"].read_bytes())
    with pytest.raises(VideoError, match="clip name 'b' clashes") as err:
        ingest_videos([videos["b"], other], tmp_path / "out", val_fraction=0.5, progress=False)
    observed(str(err.value))


def test_config_validation():
    with pytest.raises(ValueError):
        VideoConfig(frames=0)
    with pytest.raises(ValueError):
        VideoConfig(crop_box=(10, 0, 5, 5))
    with pytest.raises(ValueError):
        VideoConfig(fps=-1.0)


# ------------------------------------------------------------------- with the person detector


@pytest.fixture(scope="module")
def person_video(tmp_path_factory) -> tuple[Path, dict]:
    """A held-out clip rendered as an ordinary 640x360 H.264 video over a photo, with its
    ground truth."""
    from data_shards.clipvideo import ClipVideoConfig, render_clip_video

    path = tmp_path_factory.mktemp("person") / "dance_b.mp4"
    return path, render_clip_video(path, "dance_b", ClipVideoConfig(max_frames=48))


def test_detect_writes_person_centred_windows_with_detector_keypoints(mediapipe, person_video,
                                                                      tmp_path):  # fmt: skip
    path, truth = person_video
    config = VideoConfig(size=(128, 128), frames=8, stride=4, detect=True)
    manifests = ingest_videos([path], tmp_path, config, progress=False)
    counts = manifests["train"].source["detection"]["dance_b.mp4"]
    assert counts["detected"] + counts["lost"] == 48 and counts["detected"] >= 40
    samples = read_split(tmp_path / "train")
    assert samples and all(s.meta.has["det2d"] and s.meta.has["pose2d"] for s in samples)
    for s in samples:
        frames = s.meta.frames
        assert frames == list(range(frames[0], frames[0] + 8))  # never across a gap
        np.testing.assert_allclose(s.pose2d[0], s.det2d[0, ..., :2], atol=1e-4)
        assert (s.det2d[0, ..., 2] > 0).all() and (s.det2d[0, ..., 2] <= 1).all()
        # person-centred: the pelvis near the middle of the crop
        assert np.abs(s.pose2d[0, :, 0] - 64).max() < 40
    from data_shards.verify import stats_table

    assert "dance_b.mp4: person found in" in stats_table(tmp_path)


def test_detect_on_a_video_without_anybody_is_one_clear_error(mediapipe, videos, tmp_path,
                                                               caplog):  # fmt: skip
    config = VideoConfig(size=(64, 64), frames=4, detect=True)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError,
                                                         match="no video has the person found"):
        ingest_videos([videos["b"]], tmp_path, config, progress=False)
    assert "no 4 consecutive frames with the person found (found in 0 of 20" in caplog.text
    assert not (tmp_path / "train").exists()  # nothing half-written


def test_detect_handles_a_portrait_video(mediapipe, tmp_path):
    from data_shards.clipvideo import ClipVideoConfig, render_clip_video

    path = tmp_path / "walk.mp4"
    render_clip_video(path, "walk", ClipVideoConfig(size=(240, 426), max_frames=24, hfov_deg=30))
    samples = list(iter_video_samples([path], VideoConfig(size=(64, 64), frames=4, detect=True),
                                      progress=False))  # fmt: skip
    assert samples and samples[0].frames.shape == (1, 4, 64, 64, 3)


def test_detect_and_a_fixed_crop_box_exclude_each_other():
    with pytest.raises(ValueError, match="crop_box and detect"):
        VideoConfig(detect=True, crop_box=(0, 0, 10, 10))
