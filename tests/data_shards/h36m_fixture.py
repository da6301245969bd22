"""A tiny fake Human3.6M in the VideoPose3D-style layout, generated for tests.

Writes, under ``root``::

    data_3d_h36m.npz        positions_3d = {subject: {action: (N, 32, 3) world metres, Z up}}
    data_2d_h36m_gt.npz     positions_2d = {subject: {action: [4 x (N', 17, 2) pixels]}},
                            metadata (projections of the 3D through the cameras; one clip has
                            two extra trailing frames, as real detection files sometimes do)
    cameras.json            {subject: [4 cameras]} (some subjects as K + t, others as
                            fx/fy/cx/cy + center, to exercise both forms)
    frames/<subject>/<action>.<camera>/<n:06d>.jpg   1-based; grey background, white joint
                            dots and a red blob on the pelvis

The walker is synthetic (a swinging-limb stick figure on a line through the origin); the
cameras are :func:`data_shards.camera.ring_rig` turned per subject. Nothing here comes from
the real data set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_shards.camera import Camera, ring_rig
from data_shards.h36m import CAMERA_NAMES, KEEP_JOINTS
from data_shards.skeleton import BONES, JOINT_INDEX

SUBJECT_ACTIONS: dict[str, tuple[str, ...]] = {
    "S1": ("Walking 1", "Eating"),
    "S9": ("Walking 1",),
    "S11": ("Directions",),
}
PELVIS_RGB = (255, 0, 0)

# Rest pose of the 17 joints in metres, body frame (x forward, y left, z up), pelvis at 0.
_REST = {
    "pelvis": (0, 0, 0), "r_hip": (0, -0.13, 0), "r_knee": (0.02, -0.13, -0.45),
    "r_ankle": (0, -0.13, -0.88), "l_hip": (0, 0.13, 0), "l_knee": (0.02, 0.13, -0.45),
    "l_ankle": (0, 0.13, -0.88), "spine": (0, 0, 0.23), "thorax": (0, 0, 0.48),
    "nose": (0.1, 0, 0.6), "head": (0, 0, 0.72), "l_shoulder": (0, 0.18, 0.45),
    "l_elbow": (0, 0.2, 0.18), "l_wrist": (0.03, 0.2, -0.06), "r_shoulder": (0, -0.18, 0.45),
    "r_elbow": (0, -0.2, 0.18), "r_wrist": (0.03, -0.2, -0.06),
}


@dataclass
class H36MFixture:
    root: Path
    npz3d: Path
    npz2d: Path
    cameras_json: Path
    frames_dir: Path
    positions: dict[str, dict[str, np.ndarray]]
    """{subject: {action: (N, 32, 3) world metres}}, as stored in ``npz3d``."""
    cameras: dict[str, list[Camera]]
    image_size: int


def _swing(points: np.ndarray, pivot: str, joints: tuple[str, ...], angle: float) -> None:
    """Rotate ``joints`` about the body y axis through ``pivot`` by ``angle`` (in place)."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    p = points[JOINT_INDEX[pivot]].copy()
    for name in joints:
        j = JOINT_INDEX[name]
        points[j] = rot @ (points[j] - p) + p


def walker17(num_frames: int, heading: float, phase: float, fps: float = 50.0) -> np.ndarray:
    """(N, 17, 3) world metres: a figure walking at 1 m/s through the origin, swinging limbs."""
    rest = np.array([_REST[name] for name in sorted(_REST, key=JOINT_INDEX.get)], float)
    c, s = np.cos(heading), np.sin(heading)
    yaw = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    out = np.empty((num_frames, 17, 3))
    for i in range(num_frames):
        t = i / fps
        a = 0.45 * np.sin(2 * np.pi * 1.6 * t + phase)
        body = rest.copy()
        _swing(body, "r_hip", ("r_knee", "r_ankle"), a)
        _swing(body, "l_hip", ("l_knee", "l_ankle"), -a)
        _swing(body, "r_shoulder", ("r_elbow", "r_wrist"), -0.7 * a)
        _swing(body, "l_shoulder", ("l_elbow", "l_wrist"), 0.7 * a)
        pelvis = np.array([t - 0.4, 0.0, 0.0]) @ yaw.T + [0, 0, 0.93 + 0.02 * np.cos(2 * a)]
        out[i] = body @ yaw.T + pelvis
    return out


def to_32(joints17: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 17, 3) -> (N, 32, 3): the 17 at KEEP_JOINTS, the dropped markers near their joints."""
    n = len(joints17)
    out = np.empty((n, 32, 3))
    out[:, KEEP_JOINTS] = joints17
    near = {4: "r_ankle", 5: "r_ankle", 9: "l_ankle", 10: "l_ankle", 11: "pelvis", 16: "thorax",
            20: "l_wrist", 21: "l_wrist", 22: "l_wrist", 23: "l_wrist", 24: "l_wrist",
            28: "r_wrist", 29: "r_wrist", 30: "r_wrist", 31: "r_wrist"}
    for j, name in near.items():
        out[:, j] = joints17[:, JOINT_INDEX[name]] + rng.normal(0, 0.05, size=3)
    return out


def _cameras(subject_index: int, size: int) -> list[Camera]:
    azimuths = [45.0 + 90.0 * k + 7.0 * subject_index for k in range(4)]
    rig = ring_rig(4, azimuths_deg=azimuths, size=(size, size), focal_px=1.2 * size)
    return [Camera(c.K, c.R, c.t, c.width, c.height, name) for c, name in zip(rig, CAMERA_NAMES,
                                                                               strict=True)]


def _camera_json(cam: Camera, explicit: bool) -> dict:
    d = {"name": cam.name, "R": cam.R.tolist(), "width": cam.width, "height": cam.height}
    if explicit:
        d.update(K=cam.K.tolist(), t=cam.t.tolist())
    else:
        fx, fy, cx, cy = cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2]
        d.update(fx=fx, fy=fy, cx=cx, cy=cy, center=cam.center.tolist())
    return d


def _draw(points2d: np.ndarray, size: int) -> Image.Image:
    """Grey image of the 17 joints of (17, 2) pixels: bones, white dots, a red pelvis blob.

    The pelvis is a Gaussian blob centred exactly on its continuous pixel position (PIL's
    ellipses snap to the pixel grid), so tests can locate it to a fraction of a pixel.
    """
    img = Image.new("RGB", (size, size), (70, 70, 70))
    draw = ImageDraw.Draw(img)
    for p, c in BONES:
        draw.line([tuple(points2d[p]), tuple(points2d[c])], fill=(150, 150, 150), width=2)
    for x, y in points2d[1:]:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 255, 255))
    pixels = np.asarray(img).astype(np.float64)
    x0, y0 = (int(np.clip(c - 12, 0, size - 24)) for c in points2d[0])  # a 24 px patch
    yy, xx = np.mgrid[y0 : y0 + 24, x0 : x0 + 24] + 0.5  # pixel centres
    alpha = np.exp(-((xx - points2d[0, 0]) ** 2 + (yy - points2d[0, 1]) ** 2) / (2 * 3.0**2))
    patch = pixels[y0 : y0 + 24, x0 : x0 + 24]
    patch[:] = patch * (1 - alpha[..., None]) + np.array(PELVIS_RGB) * alpha[..., None]
    return Image.fromarray(pixels.round().astype(np.uint8))


def make_h36m_fixture(
    root: Path,
    subject_actions: dict[str, tuple[str, ...]] | None = None,
    num_frames: int = 40,
    image_size: int = 256,
    frames: bool = True,
) -> H36MFixture:
    """Write the fake data set under ``root`` (see the module docstring); returns its paths."""
    subject_actions = subject_actions or SUBJECT_ACTIONS
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    positions, detections, cameras, cam_json = {}, {}, {}, {}
    for si, (subject, actions) in enumerate(subject_actions.items()):
        cameras[subject] = _cameras(si, image_size)
        cam_json[subject] = [_camera_json(c, explicit=si % 2 == 0) for c in cameras[subject]]
        positions[subject], detections[subject] = {}, {}
        for ai, action in enumerate(actions):
            extra = 2 if (si, ai) == (0, 0) else 0  # detections longer than the mocap
            j17 = walker17(num_frames + extra, heading=0.9 * si + 0.5 * ai, phase=ai)
            positions[subject][action] = to_32(j17, rng)[:num_frames].astype(np.float32)
            detections[subject][action] = [c.project(j17 * 1000).astype(np.float32)
                                           for c in cameras[subject]]
            if frames:
                for cam, det in zip(cameras[subject], detections[subject][action], strict=True):
                    folder = root / "frames" / subject / f"{action}.{cam.name}"
                    folder.mkdir(parents=True, exist_ok=True)
                    for i in range(num_frames):
                        _draw(det[i], image_size).save(folder / f"{i + 1:06d}.jpg", quality=92)
    np.savez_compressed(root / "data_3d_h36m.npz", positions_3d=positions)
    metadata = {"layout_name": "h36m", "num_joints": 17,
                "keypoints_symmetry": [[4, 5, 6, 11, 12, 13], [1, 2, 3, 14, 15, 16]]}
    np.savez_compressed(root / "data_2d_h36m_gt.npz", positions_2d=detections, metadata=metadata)
    (root / "cameras.json").write_text(json.dumps(cam_json))
    return H36MFixture(root, root / "data_3d_h36m.npz", root / "data_2d_h36m_gt.npz",
                       root / "cameras.json", root / "frames", positions, cameras, image_size)
