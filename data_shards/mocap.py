"""DeepMimic motion clips (shipped inside pybullet) as 17-joint Human3.6M poses.

The 15 humanoid clips of DeepMimic (Peng et al. 2018, "DeepMimic: Example-guided deep
reinforcement learning of physics-based character skills") ship in the ``pybullet`` wheel under
``pybullet_data/data/motions``. Each is JSON ``{"Loop": "wrap"|"none", "Frames": [[44 floats]]}``;
a keyframe row holds its duration (s), the root position (m, Y up), the root quaternion and the
local joint rotations of the character ``pybullet_data/humanoid/humanoid.urdf``
(see :data:`_COLUMNS`). Quaternions are stored (w, x, y, z) here, as in the files.

Frames of reference:
- Mocap frame: metres, Y up, ground at y = 0; at identity root rotation the character faces +x
  and its right side is +z.
- Project world frame (see :mod:`data_shards.camera`): millimetres, Z up, ground at z = 0.
  We map the mocap frame with the proper rotation :data:`MOCAP_TO_WORLD` (+90 degrees about x:
  x' = x, y' = -z, z' = y), never with an axis swap, which would mirror the character and turn
  its left side into its right.

Forward kinematics is plain numpy (no pybullet needed) from the URDF's joint offsets; it matches
pybullet's own to about 1e-7 m. :func:`bullet_pose` gives the same pose as pybullet base and
joint states for the renderer.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace

import numpy as np

from data_shards.extras import import_extra
from data_shards.skeleton import JOINT_INDEX, NUM_JOINTS

CLIP_NAMES: tuple[str, ...] = (
    "walk", "run", "jump", "kick", "punch", "spin", "spinkick", "backflip",
    "cartwheel", "crawl", "dance_a", "dance_b", "getup_facedown", "getup_faceup", "roll",
)  # fmt: skip

SPHERICAL_JOINTS: tuple[str, ...] = (
    "chest", "neck", "right_hip", "right_ankle", "right_shoulder",
    "left_hip", "left_ankle", "left_shoulder",
)  # fmt: skip
"""Joints with a local quaternion, in :attr:`MotionClip.spherical` order."""
REVOLUTE_JOINTS: tuple[str, ...] = ("right_knee", "right_elbow", "left_knee", "left_elbow")
"""Joints with one angle about their local z axis, in :attr:`MotionClip.revolute` order."""

_COLUMNS: dict[str, int] = {
    "chest": 8, "neck": 12, "right_hip": 16, "right_knee": 20, "right_ankle": 21,
    "right_shoulder": 25, "right_elbow": 29, "left_hip": 30, "left_knee": 34,
    "left_ankle": 35, "left_shoulder": 39, "left_elbow": 43,
}  # fmt: skip
"""First column of each joint in a keyframe row (0: duration, 1-3 root position, 4-7 root quat)."""
_ROW_LENGTH = 44

URDF_UNIT_M = 0.25
"""Metres per URDF unit: the DeepMimic character is loaded with ``globalScaling=0.25``."""

# Joint offsets from the parent joint in the parent link's frame, URDF units
# (copied from humanoid.urdf; a test compares them with the file).
_OFFSETS: dict[str, tuple[str, tuple[float, float, float]]] = {
    "chest": ("root", (0.0, 0.944604, 0.0)),
    "neck": ("chest", (0.0, 0.895576, 0.0)),
    "right_hip": ("root", (0.0, 0.0, 0.339548)),
    "right_knee": ("right_hip", (0.0, -1.686184, 0.0)),
    "right_ankle": ("right_knee", (0.0, -1.639480, 0.0)),
    "right_shoulder": ("chest", (-0.0962, 0.974, 0.73244)),
    "right_elbow": ("right_shoulder", (0.0, -1.099152, 0.0)),
    "right_wrist": ("right_elbow", (0.0, -1.035788, 0.0)),
    "left_hip": ("root", (0.0, 0.0, -0.339548)),
    "left_knee": ("left_hip", (0.0, -1.686184, 0.0)),
    "left_ankle": ("left_knee", (0.0, -1.639480, 0.0)),
    "left_shoulder": ("chest", (-0.0962, 0.974, -0.73244)),
    "left_elbow": ("left_shoulder", (0.0, -1.099152, 0.0)),
    "left_wrist": ("left_elbow", (0.0, -1.035788, 0.0)),
}
# Head points fixed on the neck link (URDF units): the head is a sphere of radius 0.41 centred
# 0.7 above the neck joint, so these are its front-most and top-most points.
HEAD_POINTS: dict[str, tuple[float, float, float]] = {
    "nose": (0.41, 0.7, 0.0),
    "head": (0.0, 1.11, 0.0),
}

# H36M joint -> URDF joint whose origin it is (nose and head top come from HEAD_POINTS).
_H36M_FROM_URDF: dict[str, str] = {
    "pelvis": "root", "r_hip": "right_hip", "r_knee": "right_knee", "r_ankle": "right_ankle",
    "l_hip": "left_hip", "l_knee": "left_knee", "l_ankle": "left_ankle", "spine": "chest",
    "thorax": "neck", "l_shoulder": "left_shoulder", "l_elbow": "left_elbow",
    "l_wrist": "left_wrist", "r_shoulder": "right_shoulder", "r_elbow": "right_elbow",
    "r_wrist": "right_wrist",
}  # fmt: skip

MOCAP_TO_WORLD = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
"""Rotation (det +1) taking mocap axes (Y up) to world axes (Z up): x' = x, y' = -z, z' = y."""
_MOCAP_TO_WORLD_QUAT = np.array([np.cos(np.pi / 4), np.sin(np.pi / 4), 0.0, 0.0])  # (w, x, y, z)


# ----------------------------------------------------------------------------- quaternions


def quat_normalize(q: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions scaled to unit norm."""
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (..., 4) (w, x, y, z) quaternions: the rotation b, then a."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """(..., 4) unit (w, x, y, z) quaternions -> (..., 3, 3) rotation matrices."""
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        axis=-1,
    ).reshape(q.shape[:-1] + (3, 3))  # fmt: skip


def slerp(q0: np.ndarray, q1: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Spherical interpolation of (..., 4) unit quaternions along the shorter arc.

    ``alpha`` (...) in [0, 1] broadcasts against the quaternions' leading axes. ``alpha = 0``
    returns ``q0`` bit for bit (so sampling at a keyframe time gives the keyframe).
    """
    alpha = np.asarray(alpha, dtype=np.float64)[..., None]
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)  # q and -q are the same rotation: take the short way
    dot = np.clip(np.abs(dot), -1.0, 1.0)
    theta = np.arccos(dot)
    sin_theta = np.sin(theta)
    near = sin_theta < 1e-8  # (almost) equal rotations: lerp is exact enough and avoids 0/0
    safe = np.where(near, 1.0, sin_theta)
    w0 = np.where(near, 1.0 - alpha, np.sin((1.0 - alpha) * theta) / safe)
    w1 = np.where(near, alpha, np.sin(alpha * theta) / safe)
    out = w0 * q0 + w1 * q1
    return np.where(alpha == 0, q0, quat_normalize(out))


def _rot_z(angle: np.ndarray) -> np.ndarray:
    """(...) angles (rad) -> (..., 3, 3) rotations about z."""
    c, s = np.cos(angle), np.sin(angle)
    o, z = np.ones_like(angle), np.zeros_like(angle)
    return np.stack([c, -s, z, s, c, z, z, z, o], axis=-1).reshape(angle.shape + (3, 3))


# ----------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class MotionClip:
    """One DeepMimic clip: N poses at times ``times``. Quaternions are unit, (w, x, y, z)."""

    name: str
    loop: bool
    """True for ``"Loop": "wrap"`` clips: the last keyframe is the first pose of the next cycle."""
    times: np.ndarray
    """(N,) pose times in seconds, increasing, starting at 0."""
    root_pos: np.ndarray
    """(N, 3) root position, metres, mocap frame (Y up)."""
    root_rot: np.ndarray
    """(N, 4) root orientation in the mocap frame."""
    spherical: np.ndarray
    """(N, 8, 4) local rotations of :data:`SPHERICAL_JOINTS`."""
    revolute: np.ndarray
    """(N, 4) angles (rad) of :data:`REVOLUTE_JOINTS` about their local z axis."""
    fps: float | None = None
    """Sampling rate when the poses are evenly spaced (after :func:`resample`), else None."""

    def __post_init__(self) -> None:
        n = len(self.times)
        shapes = {
            "root_pos": (n, 3),
            "root_rot": (n, 4),
            "spherical": (n, 8, 4),
            "revolute": (n, 4),
        }
        for attr, shape in shapes.items():
            if getattr(self, attr).shape != shape:
                raise ValueError(f"MotionClip.{attr}: shape {getattr(self, attr).shape} != {shape}")
        if n < 1 or np.any(np.diff(self.times) < 0):
            raise ValueError(f"clip {self.name!r}: times must be non-empty and non-decreasing")

    @property
    def num_frames(self) -> int:
        return len(self.times)

    @property
    def duration(self) -> float:
        """Seconds from the first to the last pose."""
        return float(self.times[-1] - self.times[0])


def motions_dir() -> str:
    """Folder of the DeepMimic clips inside the installed ``pybullet_data``."""
    # a plain data package in the pybullet wheel: importing it does not load pybullet itself
    pybullet_data = import_extra("render", "pybullet_data")
    return os.path.join(pybullet_data.getDataPath(), "data", "motions")


def clip_path(name: str) -> str:
    if name not in CLIP_NAMES:
        raise ValueError(f"unknown clip {name!r}; expected one of {', '.join(CLIP_NAMES)}")
    return os.path.join(motions_dir(), f"humanoid3d_{name}.txt")


def parse_clip(text: str, name: str) -> MotionClip:
    """DeepMimic JSON text -> keyframes as a :class:`MotionClip` (quaternions normalised).

    About half of the shipped clips store quaternions up to 0.42 away from unit norm (kick,
    backflip, roll, spin ...), so every quaternion is normalised here.
    """
    try:
        doc = json.loads(text)
        frames = np.asarray(doc["Frames"], dtype=np.float64)
        loop = doc.get("Loop", "none")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"clip {name!r}: not a DeepMimic motion file ({e})") from None
    if frames.ndim != 2 or frames.shape[1] != _ROW_LENGTH or len(frames) < 2:
        raise ValueError(f"clip {name!r}: frames of shape {frames.shape}, expected (>=2, 44)")
    if loop not in ("wrap", "none") or not np.isfinite(frames).all():
        raise ValueError(f"clip {name!r}: bad Loop {loop!r} or non-finite values")
    # A keyframe's duration is the time to the next one; the last row's is unused.
    times = np.concatenate([[0.0], np.cumsum(frames[:-1, 0])])
    spherical = np.stack([frames[:, _COLUMNS[j] : _COLUMNS[j] + 4] for j in SPHERICAL_JOINTS], 1)
    return MotionClip(
        name=name,
        loop=loop == "wrap",
        times=times,
        root_pos=frames[:, 1:4].copy(),
        root_rot=quat_normalize(frames[:, 4:8]),
        spherical=quat_normalize(spherical),  # (N, 8, 4)
        revolute=np.stack([frames[:, _COLUMNS[j]] for j in REVOLUTE_JOINTS], 1),  # (N, 4)
    )


@functools.cache
def load_clip(name: str) -> MotionClip:
    """Keyframes of clip ``name`` (one of :data:`CLIP_NAMES`), cached and read-only."""
    with open(clip_path(name), encoding="utf-8") as f:
        clip = parse_clip(f.read(), name)
    for array in (clip.times, clip.root_pos, clip.root_rot, clip.spherical, clip.revolute):
        array.flags.writeable = False  # shared by every caller through the cache
    return clip


def interpolate(clip: MotionClip, times: np.ndarray) -> MotionClip:
    """The clip's pose at each of ``times`` (s, within [0, duration]).

    Root position and joint angles are interpolated linearly, rotations by slerp between the two
    surrounding keyframes (by their durations). A time equal to a keyframe's gives that keyframe.
    """
    times = np.asarray(times, dtype=np.float64)
    if np.any(times < clip.times[0]) or np.any(times > clip.times[-1] + 1e-9):
        raise ValueError(f"clip {clip.name!r}: times outside [0, {clip.duration:.4f}] s")
    last = clip.num_frames - 1
    i0 = np.clip(np.searchsorted(clip.times, times, side="right") - 1, 0, last)
    i1 = np.minimum(i0 + 1, last)
    span = clip.times[i1] - clip.times[i0]
    # i0 == i1 only at the last keyframe; zero-length spans (repeated times) take the first pose
    alpha = np.where(span > 0, (times - clip.times[i0]) / np.where(span > 0, span, 1.0), 0.0)
    alpha = np.clip(alpha, 0.0, 1.0)
    a = alpha[:, None]
    return MotionClip(
        name=clip.name,
        loop=clip.loop,
        times=times.copy(),
        root_pos=(1 - a) * clip.root_pos[i0] + a * clip.root_pos[i1],
        root_rot=slerp(clip.root_rot[i0], clip.root_rot[i1], alpha),
        spherical=slerp(clip.spherical[i0], clip.spherical[i1], alpha[:, None]),
        revolute=(1 - a) * clip.revolute[i0] + a * clip.revolute[i1],
    )


def resample(clip: MotionClip, fps: float = 50.0, speed: float = 1.0) -> MotionClip:
    """The clip at ``fps`` poses per second, starting at its first keyframe.

    A looping ("wrap") clip's last keyframe is the first pose of its next cycle, so it is left
    out (times < duration); a non-looping clip keeps its end (times <= duration). All 15 clips
    give 1,684 poses at 50 fps and 1,010 at 30 fps.

    ``speed`` plays the motion that many times faster (a time warp): pose k is the clip's pose
    at ``k * speed / fps`` s, interpolated from the keyframes (slerp, see :func:`interpolate`),
    so the result has about 1 / ``speed`` as many poses, starts with the same first pose and its
    times are ``k / fps``. ``speed=1`` is plain resampling.
    """
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0 < speed < np.inf:
        raise ValueError(f"speed must be positive and finite, got {speed}")
    eps = 1e-9
    end = clip.duration - eps if clip.loop else clip.duration + eps
    count = int(np.floor(end * fps / speed)) + 1
    times = np.arange(count) / fps
    if speed == 1.0:
        return replace(interpolate(clip, times), fps=float(fps))
    # k * speed / fps may round past the end of a non-looping clip: keep it inside
    source = np.minimum(times * speed, clip.times[-1])
    return replace(interpolate(clip, source), times=times, fps=float(fps))


def subclip(clip: MotionClip, start: int, stop: int) -> MotionClip:
    """Poses ``start`` to ``stop - 1`` of ``clip`` (times keep the clip's time base)."""
    if not 0 <= start < stop <= clip.num_frames:
        raise ValueError(
            f"clip {clip.name!r}: frames [{start}, {stop}) outside [0, {clip.num_frames})"
        )
    s = slice(start, stop)
    return replace(
        clip, times=clip.times[s], root_pos=clip.root_pos[s], root_rot=clip.root_rot[s],
        spherical=clip.spherical[s], revolute=clip.revolute[s],
    )  # fmt: skip


MIRROR_MOCAP = np.diag([1.0, 1.0, -1.0])
"""The reflection of :func:`mirror` in the mocap frame: across the plane z = 0, the character's
sagittal plane at identity root rotation. In the world frame it is y -> -y."""


def _other_side(joint: str) -> str:
    """'right_hip' <-> 'left_hip'; a joint on the midline is its own mirror image."""
    for a, b in (("right_", "left_"), ("left_", "right_")):
        if joint.startswith(a):
            return b + joint[len(a) :]
    return joint


def mirror(clip: MotionClip) -> MotionClip:
    """The clip's motion reflected across :data:`MIRROR_MOCAP`, performed by the same character.

    Reflecting alone would give a mirror-image body (its left arm drawn where a right arm
    belongs); the left and right joint rotations are exchanged as well, so the result is a valid
    body doing the mirrored motion. The character is left/right symmetric (every left offset and
    shape is the reflection of the right one), hence ``joints3d(mirror(c))`` is ``joints3d(c)``
    with world y negated and joints permuted by :func:`data_shards.skeleton.flip_permutation`.

    A rotation R becomes M R M (M the reflection): for a (w, x, y, z) quaternion that is
    (w, -x, -y, z). Knees and elbows turn about their local z axis, which M R M keeps, so their
    angles only change sides. Reflection is linear in the quaternions and keeps their dot
    products, so it commutes with :func:`interpolate`.
    """
    flip = np.array([1.0, -1.0, -1.0, 1.0])  # (w, x, y, z) of M R M
    spherical = [SPHERICAL_JOINTS.index(_other_side(j)) for j in SPHERICAL_JOINTS]
    revolute = [REVOLUTE_JOINTS.index(_other_side(j)) for j in REVOLUTE_JOINTS]
    return replace(
        clip, root_pos=clip.root_pos @ MIRROR_MOCAP, root_rot=clip.root_rot * flip,
        spherical=clip.spherical[:, spherical] * flip, revolute=clip.revolute[:, revolute],
    )  # fmt: skip


# ----------------------------------------------------------------------------- kinematics


@dataclass(frozen=True)
class LinkFrames:
    """World frames of the character's links (the URDF joint origins), metres, world (Z up)."""

    positions: dict[str, np.ndarray]
    """URDF joint name -> (N, 3) origin of the link it moves."""
    rotations: dict[str, np.ndarray]
    """URDF joint name -> (N, 3, 3) link orientation (link axes -> world axes)."""


def _local_rotations(clip: MotionClip) -> dict[str, np.ndarray]:
    """URDF joint name -> (N, 3, 3) rotation of its link relative to the parent link."""
    rot = {j: quat_to_matrix(clip.spherical[:, k]) for k, j in enumerate(SPHERICAL_JOINTS)}
    rot.update({j: _rot_z(clip.revolute[:, k]) for k, j in enumerate(REVOLUTE_JOINTS)})
    eye = np.broadcast_to(np.eye(3), (clip.num_frames, 3, 3))
    rot.update({"right_wrist": eye, "left_wrist": eye})  # fixed joints
    return rot


def link_frames(clip: MotionClip, scale: float = 1.0) -> LinkFrames:
    """Forward kinematics of every pose of ``clip`` in the world frame (metres, Z up).

    ``scale`` is the body-height factor of the rendered body: it multiplies every bone and the
    root trajectory (a taller character takes longer strides and its feet stay on the ground).
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    unit = URDF_UNIT_M * scale
    root_rot = quat_to_matrix(clip.root_rot)  # (N, 3, 3)
    positions = {"root": clip.root_pos @ MOCAP_TO_WORLD.T * scale}
    rotations = {"root": MOCAP_TO_WORLD @ root_rot}
    local = _local_rotations(clip)
    for joint, (parent, offset) in _OFFSETS.items():  # parents come first in _OFFSETS
        p_rot = rotations[parent]
        positions[joint] = positions[parent] + p_rot @ (np.asarray(offset) * unit)
        rotations[joint] = p_rot @ local[joint]
    return LinkFrames(positions, rotations)


def joints3d_m(clip: MotionClip, scale: float = 1.0) -> np.ndarray:
    """(N, 17, 3) Human3.6M joints in metres, world frame; see :func:`joints3d`."""
    frames = link_frames(clip, scale)
    out = np.empty((clip.num_frames, NUM_JOINTS, 3))  # (N, J, 3)
    for h36m, urdf in _H36M_FROM_URDF.items():
        out[:, JOINT_INDEX[h36m]] = frames.positions[urdf]
    for h36m, point in HEAD_POINTS.items():
        local = np.asarray(point) * URDF_UNIT_M * scale
        out[:, JOINT_INDEX[h36m]] = frames.positions["neck"] + frames.rotations["neck"] @ local
    return out


def joints3d(clip: MotionClip, scale: float = 1.0) -> np.ndarray:
    """(N, 17, 3) float64 Human3.6M joints in millimetres, world frame (Z up, ground z = 0).

    Bone proportions are the DeepMimic character's; ``scale`` is the body-height factor
    (see :func:`link_frames`).
    """
    return joints3d_m(clip, scale) * 1000.0


@dataclass(frozen=True)
class BulletPose:
    """One pose as pybullet state for ``humanoid.urdf`` loaded with ``globalScaling=0.25*scale``.

    World frame in metres, Z up (so pybullet positions x 1000 are our world millimetres).
    """

    base_position: tuple[float, float, float]
    """Base (= root joint) position, metres."""
    base_orientation: tuple[float, float, float, float]
    """Base orientation (x, y, z, w): pybullet's quaternion order."""
    joint_names: tuple[str, ...]
    """URDF names of the moving joints (pybullet reorders joints on load: map names to indices
    with ``getJointInfo``, or load with ``URDF_MAINTAIN_LINK_ORDER``)."""
    joint_values: tuple[tuple[float, ...], ...]
    """Per joint: (x, y, z, w) for a spherical joint, (angle,) for a revolute one."""


def bullet_pose(clip: MotionClip, index: int, scale: float = 1.0) -> BulletPose:
    """Pose ``index`` of ``clip`` as pybullet base and joint states (no pybullet needed).

    Pass the values to ``resetBasePositionAndOrientation`` and ``resetJointStatesMultiDof``.
    Spherical joints come first (:data:`SPHERICAL_JOINTS`), then :data:`REVOLUTE_JOINTS`.
    """
    pos = MOCAP_TO_WORLD @ clip.root_pos[index] * scale
    w, x, y, z = quat_mul(_MOCAP_TO_WORLD_QUAT, clip.root_rot[index])
    values = []
    for k in range(len(SPHERICAL_JOINTS)):
        qw, qx, qy, qz = clip.spherical[index, k]
        values.append((float(qx), float(qy), float(qz), float(qw)))
    values += [(float(a),) for a in clip.revolute[index]]
    return BulletPose(
        base_position=(float(pos[0]), float(pos[1]), float(pos[2])),
        base_orientation=(float(x), float(y), float(z), float(w)),
        joint_names=SPHERICAL_JOINTS + REVOLUTE_JOINTS,
        joint_values=tuple(values),
    )


def clip_joints3d(name: str, fps: float = 50.0, scale: float = 1.0) -> np.ndarray:
    """(N, 17, 3) mm joints of clip ``name`` resampled to ``fps``: the usual one-call entry."""
    return joints3d(resample(load_clip(name), fps), scale)
