"""DeepMimic clips: parsing, resampling, numpy forward kinematics (vs pybullet), world frame."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from data_shards import mocap
from data_shards.skeleton import JOINT_INDEX, bone_lengths


@pytest.fixture(scope="module")
def clips50() -> dict[str, mocap.MotionClip]:
    return {name: mocap.resample(mocap.load_clip(name), 50.0) for name in mocap.CLIP_NAMES}


def test_all_clips_load_with_the_documented_sizes():
    keyframes = [mocap.load_clip(n).num_frames for n in mocap.CLIP_NAMES]
    assert len(mocap.CLIP_NAMES) == 15 and sum(keyframes) == 1620
    total = {fps: sum(mocap.resample(mocap.load_clip(n), fps).num_frames for n in mocap.CLIP_NAMES)
             for fps in (30.0, 50.0)}  # fmt: skip
    assert total == {30.0: 1010, 50.0: 1684}


def test_quaternions_are_normalised_on_load():
    raw = mocap.load_clip("roll")  # ships quaternions up to 0.19 off unit norm
    for q in (raw.root_rot, raw.spherical):
        np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-12)


def test_interpolation_hits_keyframes_exactly():
    for name in ("walk", "backflip", "getup_faceup"):
        clip = mocap.load_clip(name)
        again = mocap.interpolate(clip, clip.times)
        for attr in ("root_pos", "root_rot", "spherical", "revolute"):
            np.testing.assert_array_equal(getattr(again, attr), getattr(clip, attr), err_msg=attr)


def test_resampled_rotations_stay_unit_and_between_keyframes(clips50):
    for clip in clips50.values():
        np.testing.assert_allclose(np.linalg.norm(clip.spherical, axis=-1), 1.0, atol=1e-12)
        np.testing.assert_allclose(np.linalg.norm(clip.root_rot, axis=-1), 1.0, atol=1e-12)
        assert clip.fps == 50.0
        np.testing.assert_allclose(np.diff(clip.times), 1 / 50.0, atol=1e-12)


def test_slerp_takes_the_short_arc_at_constant_speed():
    identity = np.array([1.0, 0.0, 0.0, 0.0])
    z90 = np.array([np.cos(np.pi / 4), 0.0, 0.0, np.sin(np.pi / 4)])
    for alpha in (0.25, 0.5, 0.75):
        q = mocap.slerp(identity, -z90, np.array(alpha))  # -q is the same rotation as q
        angle = 2 * np.arctan2(np.linalg.norm(q[1:]), abs(q[0]))
        assert angle == pytest.approx(alpha * np.pi / 2, abs=1e-12)


def test_loop_convention_of_resampling():
    wrap, once = mocap.load_clip("walk"), mocap.load_clip("kick")
    assert wrap.loop and not once.loop
    assert mocap.resample(wrap, 50.0).times[-1] < wrap.duration  # end = next cycle's start
    end = mocap.resample(once, 30.0).times[-1]
    assert once.duration - 1 / 30.0 < end <= once.duration + 1e-9


@pytest.mark.parametrize("name", mocap.CLIP_NAMES)
def test_bone_lengths_are_constant_over_time(clips50, name):
    base = bone_lengths(mocap.joints3d(clips50[name]))  # (N, 16) mm
    assert np.ptp(base, axis=0).max() < 1e-3  # < 1e-6 m
    taller = bone_lengths(mocap.joints3d(clips50[name], 1.1))
    np.testing.assert_allclose(taller, base * 1.1, rtol=1e-12)


def test_offsets_equal_the_urdf():
    root = ET.fromstring(open(_urdf(), encoding="utf-8").read().rstrip("\x00\r\n "))
    for joint in root.iter("joint"):
        name = joint.get("name")
        if name == "root":
            continue
        parent, offset = mocap._OFFSETS[name]
        assert joint.find("parent").get("link") == parent
        xyz = [float(v) for v in joint.find("origin").get("xyz").split()]
        np.testing.assert_allclose(xyz, offset, atol=1e-12, err_msg=name)


def test_world_frame_is_z_up_and_proper():
    assert np.linalg.det(mocap.MOCAP_TO_WORLD) == pytest.approx(1.0)
    clip = mocap.load_clip("walk")
    n = clip.num_frames
    rest = mocap.MotionClip(  # identity rotations, root 1 m up: facing +x, up +z, right = -y
        name="rest", loop=False, times=np.arange(n) / 30.0, root_pos=np.tile([0, 1.0, 0], (n, 1)),
        root_rot=np.tile([1.0, 0, 0, 0], (n, 1)), spherical=np.tile([1.0, 0, 0, 0], (n, 8, 1)),
        revolute=np.zeros((n, 4)),
    )  # fmt: skip
    j = mocap.joints3d(rest)[0]
    assert j[JOINT_INDEX["pelvis"]] == pytest.approx([0.0, 0.0, 1000.0])
    assert j[JOINT_INDEX["head"], 2] > j[JOINT_INDEX["thorax"], 2] > j[JOINT_INDEX["pelvis"], 2]
    assert j[JOINT_INDEX["r_hip"], 1] < 0 < j[JOINT_INDEX["l_hip"], 1]  # subject's right = -y
    assert j[JOINT_INDEX["nose"], 0] > j[JOINT_INDEX["head"], 0]  # faces +x
    walking = mocap.joints3d(mocap.resample(clip, 50.0))
    assert walking[..., 2].min() > 0  # feet on or above the ground, z = 0
    assert walking[-1, 0, 0] - walking[0, 0, 0] > 1000  # walks forward along +x


def test_parse_rejects_bad_files():
    with pytest.raises(ValueError):
        mocap.parse_clip("not json", "x")
    with pytest.raises(ValueError):
        mocap.parse_clip('{"Loop": "wrap", "Frames": [[1, 2, 3], [1, 2, 3]]}', "x")
    with pytest.raises(ValueError):
        mocap.load_clip("moonwalk")


def _urdf() -> str:
    from data_shards.appearance import humanoid_urdf_path

    return humanoid_urdf_path()


def test_numpy_kinematics_equal_pybullet(clips50):
    """Our FK against pybullet's on the shipped URDF (no modification), names -> indices."""
    pybullet = pytest.importorskip("pybullet")
    cid = pybullet.connect(pybullet.DIRECT)
    try:
        scale = 1.07
        body = pybullet.loadURDF(_urdf(), globalScaling=0.25 * scale, physicsClientId=cid)
        index = {pybullet.getJointInfo(body, i, physicsClientId=cid)[1].decode(): i
                 for i in range(pybullet.getNumJoints(body, physicsClientId=cid))}  # fmt: skip
        worst = 0.0
        for name in ("walk", "backflip", "cartwheel", "roll", "getup_facedown"):
            clip = clips50[name]
            frames = mocap.link_frames(clip, scale)
            for i in range(0, clip.num_frames, 9):
                pose = mocap.bullet_pose(clip, i, scale)
                pybullet.resetBasePositionAndOrientation(
                    body, pose.base_position, pose.base_orientation, physicsClientId=cid
                )
                pybullet.resetJointStatesMultiDof(
                    body, [index[n] for n in pose.joint_names],
                    [list(v) for v in pose.joint_values], physicsClientId=cid,
                )  # fmt: skip
                for joint, k in index.items():
                    state = pybullet.getLinkState(body, k, computeForwardKinematics=True,
                                                  physicsClientId=cid)  # fmt: skip
                    worst = max(
                        worst, np.abs(np.array(state[4]) - frames.positions[joint][i]).max()
                    )
        assert worst < 1e-6, worst
    finally:
        pybullet.disconnect(cid)
