"""Renderer and embedded data set: camera exactness, masks, determinism, processes, schema."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pybullet = pytest.importorskip("pybullet")

from data_shards import appearance, camera, mocap, schema, synth  # noqa: E402
from data_shards.render import BodyRenderer, gl_matrices  # noqa: E402

SMALL = synth.SynthConfig(views=2, frames=4, stride=30, size=64)


@pytest.fixture(scope="module")
def renderer():
    with BodyRenderer() as r:
        yield r


def _job(clip: str, start: int, config: synth.SynthConfig = SMALL) -> synth.Job:
    return synth.Job(clip, start, tuple(range(config.appearances_per_sample)))


def test_camera_conversion_is_exact_to_a_tenth_of_a_pixel():
    """A small sphere's mask centroid equals the projection of its centre, at sub-pixel shifts."""
    cid = pybullet.connect(pybullet.DIRECT)
    try:
        shape = pybullet.createVisualShape(pybullet.GEOM_SPHERE, radius=0.05, physicsClientId=cid)
        centre = np.array([300.0, -200.0, 900.0])  # mm
        pybullet.createMultiBody(0, -1, shape, basePosition=(centre / 1000).tolist(),
                                 physicsClientId=cid)  # fmt: skip
        for cam in camera.ring_rig(3, target=tuple(centre)):
            for dx, dy in ((0.0, 0.0), (0.3, -0.2), (3.7, 2.45)):
                u, v = cam.project(centre)
                crop = cam.crop((u - 20 + dx, v - 25 + dy, u + 20 + dx, v + 15 + dy), (64, 64))
                seg = pybullet.getCameraImage(
                    64, 64, *gl_matrices(crop),
                    renderer=pybullet.ER_TINY_RENDERER, physicsClientId=cid,
                    flags=pybullet.ER_SEGMENTATION_MASK_OBJECT_AND_LINKINDEX,
                )[4]  # fmt: skip
                rows, cols = np.nonzero(np.asarray(seg).reshape(64, 64) >= 0)
                found = np.array([cols.mean() + 0.5, rows.mean() + 0.5])  # pixel centres
                np.testing.assert_allclose(found, crop.project(centre), atol=0.1)
    finally:
        pybullet.disconnect(cid)


def test_renderer_body_follows_numpy_kinematics(renderer):
    clip = synth.motion("cartwheel", 50.0)
    scale = 1.08
    renderer.load_body(scale, {"torso": 0.8, "arms": 1.2, "legs": 0.9, "head": 1.1})
    frames = mocap.link_frames(clip, scale)
    heads = mocap.joints3d_m(clip, scale)
    for i in range(0, clip.num_frames, 17):
        renderer.set_pose(clip, i)
        for joint, pos in renderer.joint_positions().items():
            np.testing.assert_allclose(pos, frames.positions[joint][i], atol=1e-6)
        neck = renderer.joint_positions()["neck"]
        nose = neck + renderer.link_orientation("neck") @ (np.array([0.41, 0.7, 0]) * 0.25 * scale)
        np.testing.assert_allclose(nose, heads[i, 9], atol=1e-6)


def test_projected_joints_land_on_the_mask(renderer):
    config = dataclasses.replace(SMALL, views=4, size=96)
    inside, total = 0, 0
    for clip, start in (("walk", 10), ("backflip", 40), ("crawl", 70), ("cartwheel", 100),
                        ("getup_faceup", 120), ("dance_a", 30)):  # fmt: skip
        s = synth.render_job(renderer, _job(clip, start, config), config)
        px = np.floor(s.pose2d).astype(int)  # (V, T, J, 2) pixel containing each joint
        ok = ((px >= 0) & (px < config.size)).all(-1)
        px = px.clip(0, config.size - 1)
        V, T = s.masks.shape[:2]
        vi, ti = np.meshgrid(np.arange(V), np.arange(T), indexing="ij")
        hit = s.masks[vi[..., None], ti[..., None], px[..., 1], px[..., 0]] & ok  # (V, T, J)
        keep = [j for j in range(hit.shape[-1]) if j != 7]  # the spine may fall between balls
        inside += hit[..., keep].sum()
        total += hit[..., keep].size
    assert inside / total >= 0.95, inside / total


def test_same_seed_same_bytes_other_seed_other_look(renderer):
    renderer.load_body(1.2, {"arms": 1.25, "legs": 0.8})  # an earlier body must not leak
    a = synth.render_job(renderer, _job("punch", 20), SMALL)
    synth.render_job(renderer, _job("kick", 0), SMALL)  # renderer state must not leak
    with BodyRenderer() as fresh:
        b = synth.render_job(fresh, _job("punch", 20), SMALL)
    assert a.jpegs == b.jpegs and np.array_equal(a.masks, b.masks)
    c = synth.render_job(renderer, _job("punch", 20), dataclasses.replace(SMALL, seed=1))
    assert c.jpegs[0][0] != a.jpegs[0][0]
    assert c.meta.extra["appearances"] != a.meta.extra["appearances"]
    np.testing.assert_allclose(c.pose3d / c.meta.extra["height_scale"],
                               a.pose3d / a.meta.extra["height_scale"], atol=1e-2)  # fmt: skip


def test_crop_intrinsics_match_cropping_the_full_image(renderer):
    s = synth.render_job(renderer, _job("spin", 50), SMALL)
    cams = synth.clip_rig("spin", SMALL)
    boxes = synth.crop_boxes(cams, s.pose3d.astype(np.float64), SMALL.crop_margin)  # (V, T, 4)
    for v, cam in enumerate(cams):
        np.testing.assert_allclose(s.Rt[v], np.concatenate([cam.R, cam.t[:, None]], 1))
        for t in range(SMALL.frames):
            x0, y0, x1, y1 = boxes[v, t]
            full = cam.project(s.pose3d[t].astype(np.float64))
            expected = (full - [x0, y0]) * [SMALL.size / (x1 - x0), SMALL.size / (y1 - y0)]
            np.testing.assert_allclose(s.pose2d[v, t], expected, atol=1e-3)
            np.testing.assert_allclose(
                camera.project(s.pose3d[t], s.K[v, t], cam.R, cam.t), s.pose2d[v, t], atol=1e-2
            )


def test_sample_follows_the_schema(renderer):
    config = dataclasses.replace(SMALL, appearances_per_sample=2)
    s = synth.render_job(renderer, synth.Job("jump", 8, (0, 1)), config)
    decoded = schema.decode_sample(schema.encode_sample(s))
    assert decoded.key == "deepmimic-jump-a0000-f00008"
    m = decoded.meta
    assert (m.source, m.clip, m.action, m.subject, m.fps) == ("deepmimic", "jump", "jump",
                                                              "humanoid", 50.0)  # fmt: skip
    assert m.frames == [8, 9, 10, 11] and m.image_size == (64, 64)
    assert all(v for k, v in m.has.items() if k != "det2d")  # detections: `shards detect`
    assert [(w.camera, w.appearance) for w in m.views] == [
        ("cam0", 0),
        ("cam1", 0),
        ("cam0", 1),
        ("cam1", 1),
    ]
    assert decoded.frames.shape == (4, 4, 64, 64, 3)
    np.testing.assert_array_equal(decoded.masks, s.masks)
    assert s.masks.mean() > 0.05  # a person is there
    np.testing.assert_allclose(s.pose2d[0], s.pose2d[2])  # same camera, other appearance
    assert s.jpegs[0][0] != s.jpegs[2][0]


def test_plan_covers_every_frame_and_splits_partition_the_clips():
    assert sorted(sum(synth.SPLITS.values(), ())) == sorted(mocap.CLIP_NAMES)
    assert synth.window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert synth.window_starts(45, 16, 8) == [0, 8, 16, 24, 29]
    assert synth.window_starts(10, 16, 8) == []
    config = dataclasses.replace(SMALL, appearances_per_window=2)
    keys = [job.key for job in synth.plan_jobs(["run"], config)]
    assert len(keys) == len(set(keys)) and keys[:2] == ["deepmimic-run-a0000-f00000",
                                                        "deepmimic-run-a0001-f00000"]  # fmt: skip


def test_config_is_validated():
    for bad in ({"views": 0}, {"stride": 0}, {"fps": 0}, {"jpeg_quality": 101}, {"seed": -1},
                {"height_scale": (1.2, 1.0)}):  # fmt: skip
        with pytest.raises(ValueError):
            synth.SynthConfig(**bad)
    with pytest.raises(ValueError):
        appearance.AppearanceConfig(head_size=(0.9, 1.0))
    with pytest.raises(ValueError):
        list(synth.iter_samples(["moonwalk"], SMALL, progress=False))


def test_thickening_keeps_limb_extents():
    import xml.etree.ElementTree as ET

    root = ET.fromstring(appearance.body_urdf({"arms": 0.7, "legs": 1.3}))
    for link in root.iter("link"):
        shipped = [c.find("geometry")[0] for c in link.findall("collision")]
        drawn = [v.find("geometry")[0] for v in link.findall("visual")][: len(shipped)]
        for a, b in zip(shipped, drawn, strict=True):
            if a.tag == "capsule":  # tip to tip: length + 2 radius
                span = [float(x.get("length")) + 2 * float(x.get("radius")) for x in (a, b)]
                assert span[0] == pytest.approx(span[1], abs=1e-5)


def test_processes_give_the_same_samples_as_one():
    config = dataclasses.replace(SMALL, stride=20)
    one = list(synth.iter_samples(["walk", "roll"], config, workers=1, progress=False))
    two = list(synth.iter_samples(["walk", "roll"], config, workers=2, progress=False))
    assert [s.key for s in one] == [s.key for s in two] and len(one) >= 4
    for a, b in zip(one, two, strict=True):
        assert a.jpegs == b.jpegs
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.pose2d, b.pose2d)
        assert a.meta.to_json() == b.meta.to_json()
