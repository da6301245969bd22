import numpy as np
import pytest

from data_shards import camera, skeleton


def test_skeleton_is_a_tree_with_mirrored_sides():
    assert skeleton.NUM_JOINTS == 17
    assert skeleton.PARENTS[0] == -1
    assert len(skeleton.BONES) == 16
    perm = skeleton.flip_permutation()
    assert sorted(perm) == list(range(17))
    assert (perm[perm] == np.arange(17)).all()
    assert skeleton.JOINT_NAMES[perm[skeleton.JOINT_INDEX["l_wrist"]]] == "r_wrist"


def test_bone_lengths_by_hand():
    joints = np.zeros((17, 3))
    joints[1] = (3, 4, 0)  # r_hip, child of the pelvis at the origin
    lengths = skeleton.bone_lengths(joints)
    assert lengths[0] == pytest.approx(5.0)
    assert skeleton.BONES[0] == (0, 1)


def test_projection_by_hand_and_round_trip():
    K = camera.intrinsics(100, 200, 50, 60)
    R, t = np.eye(3), np.array([0.0, 0.0, 1000.0])
    uv = camera.project(np.array([[10.0, -20.0, 0.0]]), K, R, t)
    assert uv[0] == pytest.approx([100 * 10 / 1000 + 50, 200 * -20 / 1000 + 60])
    pts = np.random.default_rng(0).normal(size=(5, 3))
    cam = camera.Camera(K, *camera.look_at((3000, 0, 1500), (0, 0, 1000)), 100, 120)
    assert np.allclose(cam.camera_to_world(cam.world_to_camera(pts)), pts)


def test_look_at_puts_target_on_the_optical_axis_with_z_up_as_image_up():
    cam = camera.ring_rig(1, azimuths_deg=[30.0])[0]
    target = np.array([0.0, 0.0, 1000.0])
    assert cam.project(target[None])[0] == pytest.approx([500, 500])
    above = cam.project(np.array([[0.0, 0.0, 1500.0]]))[0]
    assert above[1] < 500  # higher in the world is higher in the image (smaller v)
    assert np.linalg.norm(cam.center[:2]) == pytest.approx(4500)


def test_crop_is_an_exact_change_of_intrinsics():
    cam = camera.ring_rig()[1]
    pts = np.random.default_rng(1).normal(scale=300, size=(17, 3)) + (0, 0, 1000)
    uv = cam.project(pts)
    box = camera.person_box(uv, margin=0.2)
    crop = cam.crop(box, (128, 128))
    expected = (uv - box[:2]) * (128 / (box[2] - box[0]))
    assert np.allclose(crop.project(pts), expected)
    assert (box[2] - box[0]) == pytest.approx(box[3] - box[1])  # square


def test_per_frame_intrinsics_broadcast():
    Ks = np.stack([camera.intrinsics(100, 100, 0, 0), camera.intrinsics(50, 50, 10, 10)])
    pts = np.ones((2, 17, 3))  # (T, J, 3)
    uv = camera.project_camera(pts, Ks)
    assert uv.shape == (2, 17, 2)
    assert uv[0, 0] == pytest.approx([100, 100]) and uv[1, 0] == pytest.approx([60, 60])


@pytest.mark.parametrize("bad", [np.eye(2), np.full((3, 3), np.nan)])
def test_camera_rejects_bad_matrices(bad):
    with pytest.raises(ValueError, match="Camera.K"):
        camera.Camera(bad, np.eye(3), np.zeros(3), 10, 10)
