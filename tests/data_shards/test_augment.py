"""Motion augmentation of the embedded data (``shards synth --mirror --speeds``): mirrored and
time-warped copies of the train clips agree with their cameras and pixels; val, test and the
defaults do not move."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from data_shards import augment, camera, mocap, skeleton, synth
from data_shards.configtools import ConfigError, apply_overrides

TINY = synth.SynthConfig(views=2, frames=4, stride=20, size=32, fps=25.0)
WORLD_MIRROR = np.array([1.0, -1.0, 1.0])  # mocap.MIRROR_MOCAP in the world frame (Z up)


def _mirrored(joints: np.ndarray) -> np.ndarray:
    """(..., J, 3) world joints reflected across y = 0, left and right labels exchanged."""
    return (joints * WORLD_MIRROR)[..., skeleton.flip_permutation(), :]


def _handedness(joints: np.ndarray) -> np.ndarray:
    """(N,) sign of det[right hip - left hip, thorax - pelvis, nose - thorax]: flips for a
    mirror-image body, stays for a real body in any pose."""
    j = skeleton.JOINT_INDEX
    side = joints[:, j["r_hip"]] - joints[:, j["l_hip"]]
    up = joints[:, j["thorax"]] - joints[:, j["pelvis"]]
    front = joints[:, j["nose"]] - joints[:, j["thorax"]]
    return np.sign(np.linalg.det(np.stack([side, up, front], axis=-1)))


def test_mirror_is_the_reflection_with_left_and_right_exchanged():
    for joint, (parent, offset) in mocap._OFFSETS.items():  # the character is symmetric
        other = mocap._OFFSETS[mocap._other_side(joint)]
        assert other[0] == mocap._other_side(parent)
        np.testing.assert_array_equal(np.asarray(offset) @ mocap.MIRROR_MOCAP, other[1])
    for clip in mocap.CLIP_NAMES:
        original = mocap.joints3d(synth.motion(clip, 25.0))  # (N, J, 3) mm
        mirrored = mocap.joints3d(synth.motion(f"{clip}~mirror", 25.0))
        np.testing.assert_allclose(mirrored, _mirrored(original), rtol=0, atol=1e-9)
        assert (_handedness(mirrored) == _handedness(original)).all()  # not a mirror image
    np.testing.assert_allclose(skeleton.bone_lengths(mirrored), skeleton.bone_lengths(original))


def test_time_warp_changes_the_length_by_the_factor_and_keeps_the_first_pose():
    for clip in ("walk", "jump", "crawl"):
        base = synth.motion(clip, 50.0)
        for speed in (0.8, 1.25):
            warped = synth.motion(f"{clip}~x{speed}", 50.0)
            assert abs(warped.num_frames - base.num_frames / speed) <= 1, (clip, speed)
            assert warped.fps == 50.0 and warped.name == f"{clip}~x{speed}"
            np.testing.assert_allclose(warped.times, np.arange(warped.num_frames) / 50.0)
            np.testing.assert_array_equal(mocap.joints3d(warped)[0], mocap.joints3d(base)[0])
        half = mocap.joints3d(synth.motion(f"{clip}~x0.5", 50.0))  # pose 2k = pose k at 1x
        np.testing.assert_allclose(half[::2][: base.num_frames], mocap.joints3d(base), atol=1e-9)
    with pytest.raises(ValueError, match="speed"):
        mocap.resample(mocap.load_clip("walk"), 50.0, speed=0.0)


@pytest.fixture(scope="module")
def renderer():
    pytest.importorskip("pybullet")
    from data_shards.render import BodyRenderer

    with BodyRenderer() as r:
        yield r


def test_mirrored_body_is_drawn_where_its_joints_say(renderer):
    """pybullet's body follows the copy's kinematics (its left hip where the l_hip label is) and
    its pixels are the mirror image of the original's, seen through the mirrored camera."""
    config = dataclasses.replace(TINY, size=64)
    orig, mirr = synth.motion("cartwheel", 50.0), synth.motion("cartwheel~mirror", 50.0)
    frames = mocap.link_frames(mirr, 1.05)
    flip_x, flip_y = np.diag([-1.0, 1.0, 1.0]), np.diag(WORLD_MIRROR)
    renderer.load_body(1.05)
    differing, total = 0, 0
    for i in (0, 45, 90):
        renderer.set_pose(mirr, i)
        for joint, pos in renderer.joint_positions().items():
            np.testing.assert_allclose(pos, frames.positions[joint][i], atol=1e-6)
        joints = mocap.joints3d(orig, 1.05)[i]
        for cam in synth.clip_rig("cartwheel", config):
            crop = cam.crop(camera.person_box(cam.project(joints)), (64, 64))
            K = crop.K.copy()
            K[0, 2] = 64 - K[0, 2]  # u -> 64 - u: the image flipped left to right
            mirror_cam = camera.Camera(K, flip_x @ crop.R @ flip_y, flip_x @ crop.t, 64, 64)
            renderer.set_pose(orig, i)
            seen = renderer.render(crop).mask
            renderer.set_pose(mirr, i)
            differing += (renderer.render(mirror_cam).mask != seen[:, ::-1]).sum()
            total += seen.sum()
    assert differing / total < 0.02, differing / total  # rasterisation at the edges only


def test_mirrored_sample_agrees_with_its_cameras_and_pixels(renderer):
    config = dataclasses.replace(TINY, size=64)
    a = synth.render_job(renderer, synth.Job("walk", 10, (0,)), config)
    m = synth.render_job(renderer, synth.Job("walk~mirror", 10, (0,)), config)
    assert m.key == "deepmimic-walk_mirror-a0000-f00010" and m.meta.clip == "walk~mirror"
    assert m.meta.action == "walk" and "motion" not in a.meta.extra
    assert m.meta.extra["motion"] == {"clip": "walk", "mirror": True, "speed": 1.0}
    assert m.meta.extra["appearances"] != a.meta.extra["appearances"]  # a look of its own
    ha, hm = a.meta.extra["height_scale"], m.meta.extra["height_scale"]
    np.testing.assert_allclose(m.pose3d / hm, _mirrored(a.pose3d / ha), atol=1e-3)
    cams = synth.clip_rig("walk~mirror", config)
    for v, cam in enumerate(cams):
        np.testing.assert_allclose(m.Rt[v], np.concatenate([cam.R, cam.t[:, None]], 1))
        for t in range(config.frames):
            projected = camera.project(m.pose3d[t], m.K[v, t], cam.R, cam.t)
            np.testing.assert_allclose(projected, m.pose2d[v, t], atol=1e-2)
    px = np.floor(m.pose2d).astype(int).clip(0, config.size - 1)  # (V, T, J, 2)
    vi, ti = np.meshgrid(np.arange(2), np.arange(config.frames), indexing="ij")
    on_body = m.masks[vi[..., None], ti[..., None], px[..., 1], px[..., 0]]  # (V, T, J)
    assert np.delete(on_body, 7, axis=-1).mean() >= 0.9  # the spine may fall between balls
    again = synth.render_job(renderer, synth.Job("walk~mirror", 10, (0,)), config)
    assert again.jpegs == m.jpegs  # deterministic from the seed and the window identity


def test_time_warped_sample_is_labelled_and_starts_like_its_clip(renderer):
    a = synth.render_job(renderer, synth.Job("jump", 0, (0,)), TINY)
    w = synth.render_job(renderer, synth.Job("jump~x1.25", 0, (0,)), TINY)
    assert w.key == "deepmimic-jump_x1_25-a0000-f00000" and w.meta.action == "jump"
    assert w.meta.extra["motion"] == {"clip": "jump", "mirror": False, "speed": 1.25}
    scale = w.meta.extra["height_scale"] / a.meta.extra["height_scale"]
    np.testing.assert_allclose(w.pose3d[0], a.pose3d[0] * scale, rtol=1e-5, atol=1e-2)
    assert not np.allclose(w.pose3d[-1], a.pose3d[-1] * scale, atol=1.0)  # it moves faster


def _members(root, split: str) -> dict[str, bytes]:
    out = {}
    for info in json.loads((root / split / "manifest.json").read_text())["shards"]:
        with tarfile.open(root / split / info["name"]) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


def test_val_and_test_stay_as_they_are_and_the_defaults_write_what_they_did(tmp_path):
    pytest.importorskip("pybullet")
    splits = {"train": ("walk", "jump"), "val": ("run",), "test": ("dance_b",)}
    plain = dataclasses.replace(TINY, views=1)
    off = dataclasses.replace(plain, mirror=False, speeds=[])
    aug = dataclasses.replace(plain, mirror=True, speeds=(0.8, 1.25))
    built = {}
    for name, config in (("plain", plain), ("off", off), ("aug", aug)):
        built[name] = synth.build_splits(tmp_path / name, config, splits=splits, progress=False)
    for split in splits:  # augmentation off writes what it wrote before the options existed
        files = sorted(p.name for p in (tmp_path / "plain" / split).iterdir())
        for f in files:
            assert (tmp_path / "off" / split / f).read_bytes() == (
                tmp_path / "plain" / split / f
            ).read_bytes(), (split, f)
    generator = built["plain"]["train"].generator["config"]
    assert "mirror" not in generator and "speeds" not in generator
    assert "augmentation" not in built["plain"]["train"].source
    for split in ("val", "test"):  # held-out sets: the very same samples
        assert _members(tmp_path / "aug", split) == _members(tmp_path / "plain", split)
        assert "augmentation" not in built["aug"][split].source
        assert built["aug"][split].source == built["plain"][split].source
    train, before = built["aug"]["train"], built["plain"]["train"]
    copies = ["walk~mirror", "walk~x0.8", "walk~x1.25", "jump~mirror", "jump~x0.8", "jump~x1.25"]
    assert train.source["clips"] == ["walk", "jump"]
    assert train.source["augmentation"] == {
        "mirror": True, "speeds": [0.8, 1.25], "clips": copies,
        "windows": train.samples - before.samples,
    }  # fmt: skip
    saved = json.loads((tmp_path / "aug" / "train" / "manifest.json").read_text())
    assert saved["generator"]["config"]["speeds"] == [0.8, 1.25] and saved["source"] == train.source
    assert train.actions.keys() == before.actions.keys() == {"walk", "jump"}
    new, old = _members(tmp_path / "aug", "train"), _members(tmp_path / "plain", "train")
    assert {k: new[k] for k in old} == old  # the clips' own samples are unchanged
    assert synth.augmented_clips(("walk", "jump"), aug) == ("walk", *copies[:3], "jump",
                                                            *copies[3:])  # fmt: skip


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"speeds": (0.0,)}, "speeds"),
        ({"speeds": (-0.8,)}, "speeds"),
        ({"speeds": (1.0,)}, "speeds"),
        ({"speeds": (0.8, 0.8)}, "speeds"),
        ({"speeds": (float("nan"),)}, "speeds"),
        ({"speeds": (20.0,)}, "speeds"),
        ({"speeds": 0.8}, "speeds"),
        ({"speeds": ("fast",)}, "speeds"),
        ({"speeds": (True,)}, "speeds"),
        ({"mirror": "yes"}, "mirror"),
    ],
)
def test_bad_augmentation_values_are_one_line_errors_naming_the_field(fields, name):
    with pytest.raises(ValueError, match=f"^SynthConfig.{name}") as err:
        synth.SynthConfig(**fields)
    assert "\n" not in str(err.value)


def test_bad_copy_names_and_overrides_are_refused():
    for bad in ("walk~x0", "walk~x1.0", "walk~x0.80", "walk~flip", "walk~", "moonwalk~mirror",
                "walk~mirror~mirror", "walk~x0.8~x0.9", "walk~xnan", "walk~x100.0"):  # fmt: skip
        with pytest.raises(ValueError):
            augment.ClipVariant.parse(bad)
    with pytest.raises(ValueError, match="walk~flip"):
        list(synth.iter_samples(["walk~flip"], TINY, progress=False))
    for name in ("walk", "walk~mirror", "walk~x0.8", "walk~mirror~x1.25"):
        assert augment.ClipVariant.parse(name).name == name
    with pytest.raises(ConfigError, match="speeds"):
        apply_overrides(TINY, ["speeds=[0.8, 0]"])
    assert apply_overrides(TINY, ["speeds=[0.8, 2]", "mirror=true"]).speeds == (0.8, 2.0)


def _posebert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posebert", *args], capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_synth_command_takes_the_options_and_reports_the_copies(tmp_path):
    pytest.importorskip("pybullet")
    small = ["--clips", "walk,run", "--views", "1", "--frames", "4", "--size", "32", "--fps",
             "25", "--stride", "20", "--workers", "1"]  # fmt: skip
    r = _posebert("shards", "synth", "--out", str(tmp_path / "s"), *small, "--mirror",
                  "--speeds", "0.8,1.25")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "train: 9 of 12 windows are augmented copies (mirror, x0.8, x1.25)" in r.stdout
    stats = _posebert("shards", "stats", str(tmp_path / "s"))
    assert "augmented copies (mirror, x0.8, x1.25) in 3 copied clips" in stats.stdout
    for value, needle in (("0", "SynthConfig.speeds"), ("1,2,abc", "--speeds")):
        bad = _posebert("shards", "synth", "--out", str(tmp_path / "b"), "--speeds", value)
        assert bad.returncode == 2 and needle in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (tmp_path / "b").exists()
