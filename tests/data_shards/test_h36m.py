"""Human3.6M ingest on a fake data set in the real layout (see h36m_fixture.py)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import read_split
from h36m_fixture import make_h36m_fixture
from PIL import Image

from data_shards.camera import Camera, project
from data_shards.h36m import (
    KEEP_JOINTS,
    H36MConfig,
    H36MError,
    base_action,
    ingest_h36m,
    load_cameras,
    load_npz,
    read_crop,
)
from data_shards.schema import Sample
from data_shards.video import transform_points

T = 8
AREA = "Ingest"  # of docs/reliability.md (tests/faultlog.py)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_h36m_fixture(tmp_path_factory.mktemp("h36m"))


def check_pose3d(fx, s: Sample) -> None:
    """pose3d = the fixture's 17 kept markers at the window's source frames, in mm."""
    action = s.meta.extra["action_full"]
    expected = fx.positions[s.meta.subject][action][s.meta.extra["source_frames"]]
    np.testing.assert_allclose(s.pose3d, expected[:, KEEP_JOINTS] * 1000.0, atol=1e-2)


def check_pose2d_is_projection(s: Sample) -> None:
    """pose2d in the crop = pose3d projected with the stored per-frame K and [R | t]."""
    for v in range(s.meta.num_views):
        R, t = s.Rt[v, :, :3], s.Rt[v, :, 3]
        for k in range(s.meta.num_frames):
            uv = project(s.pose3d[k].astype(np.float64), s.K[v, k].astype(np.float64), R, t)
            assert np.abs(uv - s.pose2d[v, k]).max() < 0.5


def red_centre(image: np.ndarray) -> np.ndarray:
    """Pixel centre (x, y) of the red blob drawn on the pelvis (redness-weighted centroid)."""
    img = image.astype(np.float64)
    weight = np.clip(img[..., 0] - (img[..., 1] + img[..., 2]) / 2 - 10, 0, None)
    assert weight.max() > 0, "no red pelvis blob in the crop"
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum() + 0.5


def test_round_trip_all_inputs(fx, tmp_path):
    config = H36MConfig(frames=T)
    manifests = ingest_h36m(fx.npz3d, fx.npz2d, fx.frames_dir, fx.cameras_json, tmp_path,
                            config, progress=False)
    assert set(manifests) == {"train", "val", "test"}
    stored = json.loads(fx.cameras_json.read_text())  # both calibration forms are exercised
    assert "K" in stored["S1"][0] and "fx" in stored["S9"][0] and "center" in stored["S9"][0]
    subjects = {"train": {"S1"}, "val": {"S9"}, "test": {"S11"}}  # split by subject
    for split, manifest in manifests.items():
        samples = read_split(tmp_path / split)
        assert {s.meta.subject for s in samples} == subjects[split]
        clips = sum(len(fx.positions[s]) for s in subjects[split])
        assert manifest.samples == len(samples) == clips * (40 // T)
        for s in samples:
            m = s.meta
            assert m.source == "h36m" and m.num_views == 4 and m.fps == 50.0
            assert m.has == {"frames": True, "masks": False, "pose3d": True, "pose2d": True,
                             "cameras": True}
            assert [v.camera for v in m.views] == [c.name for c in fx.cameras[m.subject]]
            assert s.frames.shape == (4, T, 128, 128, 3) and s.K.shape == (4, T, 3, 3)
            check_pose3d(fx, s)
            check_pose2d_is_projection(s)
            for v, k in [(0, 0), (1, T - 1), (3, 3)]:  # the drawn pelvis is where pose2d says
                assert np.linalg.norm(red_centre(s.frames[v, k]) - s.pose2d[v, k, 0]) < 0.3
    walking = [s for s in read_split(tmp_path / "train") if s.meta.clip == "S1_Walking_1"]
    assert walking[0].meta.action == "Walking" and walking[0].key == "S1_Walking_1-000000"
    assert manifests["train"].actions == {"Eating": 5, "Walking": 5}


def test_downsampled_small_crops(fx, tmp_path):
    """fps 25 takes every other frame; a 48 px crop decodes the JPEG at half scale."""
    config = H36MConfig(frames=T, size=(48, 48), fps=25.0, splits={"val": ("S9",)})
    ingest_h36m(fx.npz3d, fx.npz2d, fx.frames_dir, fx.cameras_json, tmp_path, config,
                progress=False)
    samples = read_split(tmp_path / "val")
    assert len(samples) == 20 // T
    for s in samples:
        assert s.meta.fps == 25.0
        assert s.meta.extra["source_frames"] == [2 * i for i in s.meta.frames]
        check_pose3d(fx, s)
        check_pose2d_is_projection(s)
        for v in range(4):
            assert np.linalg.norm(red_centre(s.frames[v, 1]) - s.pose2d[v, 1, 0]) < 0.5


def test_without_frames_or_cameras(fx, tmp_path):
    """2D only: pose2d still in a (virtual) person crop; 3D only: just the poses."""
    config = H36MConfig(frames=T, splits={"train": ("S1",), "test": ("S11",)})
    ingest_h36m(fx.npz3d, fx.npz2d, None, None, tmp_path / "a", config, progress=False)
    s = read_split(tmp_path / "a" / "test")[0]
    assert s.meta.has == {"frames": False, "masks": False, "pose3d": True, "pose2d": True,
                          "cameras": False}
    box = np.array(s.meta.extra["boxes"][1][0])  # the crop box of view 1, frame 0
    det = fx.cameras["S11"][1].project(s.pose3d[0].astype(np.float64))
    np.testing.assert_allclose(s.pose2d[1, 0], (det - box[:2]) * 128 / (box[2] - box[0]),
                               atol=1e-2)
    ingest_h36m(fx.npz3d, None, None, None, tmp_path / "b", config, progress=False)
    s = read_split(tmp_path / "b" / "train")[0]
    assert [k for k, v in s.meta.has.items() if v] == ["pose3d"]
    check_pose3d(fx, s)


def test_projection_instead_of_detections(fx, tmp_path):
    config = H36MConfig(frames=T, splits={"train": ("S1",)}, pose2d_from="projection")
    ingest_h36m(fx.npz3d, fx.npz2d, fx.frames_dir, fx.cameras_json, tmp_path, config,
                progress=False)
    for s in read_split(tmp_path / "train"):
        assert s.meta.extra["pose2d_from"] == "projection"
        check_pose2d_is_projection(s)


@pytest.mark.fault(AREA, "a missing extracted frame, a bad cameras JSON, a non-zip .npz",
                   injected="frames numbered from 0 where the files start at 1; a camera "
                   "entry holding only name and K; a text file named x.npz")  # fmt: skip
def test_missing_frame_and_bad_inputs(fx, tmp_path, observed):
    config = H36MConfig(frames=T, splits={"val": ("S9",)}, first_frame_number=0)
    with pytest.raises(H36MError, match=r"000000\.jpg: unreadable frame") as frame:
        ingest_h36m(fx.npz3d, fx.npz2d, fx.frames_dir, fx.cameras_json, tmp_path, config,
                    progress=False)
    assert not (tmp_path / "val").exists()
    bad = tmp_path / "cams.json"
    bad.write_text(json.dumps({"S9": [{"name": "a", "K": np.eye(3).tolist()}]}))
    with pytest.raises(H36MError, match="S9 camera 0: KeyError") as cameras:
        load_cameras(bad)
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(H36MError, match="not a readable .npz") as npz:
        ingest_h36m(tmp_path / "x.npz", None, None, None, tmp_path, config, progress=False)
    for err in (frame, cameras, npz):
        observed(str(err.value))


@pytest.mark.parametrize("size", [128, 48, 20])  # JPEG decoded at scale 1, 2 and 8
def test_read_crop_geometry(tmp_path, size):
    """A blob at a known sub-pixel spot lands where transform_points puts it, draft or not."""
    yy, xx = np.mgrid[0:256, 0:256] + 0.5
    centre = np.array([60.3, 131.7])
    blob = 255 * np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * 5.0**2))
    path = tmp_path / "blob.jpg"
    Image.fromarray(np.repeat(blob[..., None], 3, -1).astype(np.uint8)).save(
        path, quality=100, subsampling=0)
    box = (-30.0, 40.0, 170.0, 240.0)  # partly outside the image: black there
    crop = read_crop(path, box, (size, size))[..., 1].astype(np.float64)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    found = np.array([(crop * xs).sum(), (crop * ys).sum()]) / crop.sum()
    assert np.abs(found - transform_points(centre, box, (size, size))).max() < 0.05
    camera = Camera(np.eye(3), np.eye(3), np.zeros(3), 1000, 1002, "c")
    with pytest.raises(H36MError, match="256x256 image, camera c is 1000x1002"):
        read_crop(path, box, (size, size), camera)


def test_base_action():
    assert base_action("Walking 1") == "Walking" and base_action("WalkDog") == "WalkDog"
    assert base_action("Sitting 2") == "Sitting"


class _Payload:
    """Unpickling this object runs ``open(marker, 'w')``: what a crafted .npz can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.fault(AREA, "a Human3.6M .npz whose object array runs code when unpickled (3D and "
                   "2D files)", injected="an object array whose __reduce__ creates a marker "
                   "file; the same payload runs under np.load(allow_pickle=True)")  # fmt: skip
@pytest.mark.parametrize("member", ["positions_3d", "positions_2d"])
def test_malicious_pickle_never_runs(tmp_path, member, observed):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    path = tmp_path / "evil.npz"
    np.savez(path, **{member: {"S1": {"Walking 1": _Payload(marker)}}})
    # the payload is live: numpy's own pickle path would run it
    np.savez(tmp_path / "control.npz", **{member: {"S1": _Payload(control)}})
    with np.load(tmp_path / "control.npz", allow_pickle=True) as f:
        f[member]
    assert control.exists()
    with pytest.raises(H36MError, match="refusing to load global builtins.exec") as err:
        load_npz(path)
    config = H36MConfig(splits={"train": ("S1",)})
    with pytest.raises(H36MError, match="builtins.exec"):
        if member == "positions_3d":
            ingest_h36m(path, None, None, None, tmp_path / "out", config, progress=False)
        else:
            ingest_h36m(_plain_3d(tmp_path), path, None, None, tmp_path / "out", config,
                        progress=False)
    assert not marker.exists()
    assert not (tmp_path / "out" / "train").exists()
    observed(f"{err.value}; marker created: {marker.exists()} (numpy's own load: "
             f"{control.exists()})")  # fmt: skip


def _plain_3d(tmp_path: Path) -> Path:
    path = tmp_path / "plain3d.npz"
    np.savez(path, positions_3d={"S1": {"Walking 1": np.zeros((20, 32, 3), np.float32)}})
    return path


@pytest.mark.fault(AREA, "an .npz whose array data is shorter than its header declares",
                   injected="a .npy of 100 floats cut by 8 bytes, zipped as cut.npz")  # fmt: skip
def test_plain_arrays_and_fortran_order(tmp_path, observed):
    path = tmp_path / "a.npz"
    a = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    np.savez(path, a=a, b=np.arange(5, dtype=np.int16))
    data = load_npz(path)
    np.testing.assert_array_equal(data["a"], a)
    np.testing.assert_array_equal(data["b"], np.arange(5))
    buf = io.BytesIO()
    np.save(buf, np.zeros(100))
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as z:  # array data shorter than declared
        z.writestr("a.npy", buf.getvalue()[:-8])
    with pytest.raises(H36MError, match="ends inside the array") as err:
        load_npz(tmp_path / "cut.npz")
    observed(str(err.value))
