"""The 16-joint skeleton of the VAE-GAN lifter (:mod:`finetune.heads.lift.vaegan`): the
17-joint skeleton without the nose, the rigid head that puts the nose back, the rest pose's
bone length (the unsupervised rows' only 3D prior), and the weak-perspective geometry.

- Joints: the 17-joint skeleton without the nose (joint 9); the head top hangs on the thorax.
  The nose is filled for the 17-joint output by a rigid head taken from the mocap character's
  rest pose (:func:`rest_pose_m`): a fixed offset from the thorax along "up" (thorax -> head)
  and "forward" (left shoulder - right shoulder, crossed with up), in units of the thorax-head
  length. Whether the head turns against the chest is not seen from these 16 joints.
- Projection: weak perspective (scaled orthographic) on normalised 2D. Input: VideoPose3D
  screen coordinates, root-relative, divided by their RMS distance from the pelvis
  (:func:`normalize_inputs`); a projection is (x, y) renormalised to RMS 1 (:func:`project`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from data_shards import mocap
from data_shards.skeleton import JOINT_INDEX, NUM_JOINTS, PARENTS, ROOT
from finetune.heads.lift.data import normalize_2d

NOSE = JOINT_INDEX["nose"]
KEEP = tuple(j for j in range(NUM_JOINTS) if j != NOSE)
"""The 16 lifted joints, in 17-joint order without the nose."""
J16 = len(KEEP)
_THORAX, _HEAD = JOINT_INDEX["thorax"], JOINT_INDEX["head"]
_LSH, _RSH = JOINT_INDEX["l_shoulder"], JOINT_INDEX["r_shoulder"]
_P17 = [PARENTS[_THORAX] if j == NOSE else (_THORAX if p == NOSE else p)
        for j, p in enumerate(PARENTS)]  # fmt: skip
BONES16 = tuple((KEEP.index(p), KEEP.index(j)) for j, p in enumerate(_P17) if j != NOSE and p >= 0)
"""(parent, child) in 16-joint indices: the 17-joint bones with head top -> thorax."""


@functools.cache
def rest_pose_m() -> np.ndarray:
    """(17, 3) joints of the DeepMimic character at rest (identity rotations), metres."""
    identity = np.array([1.0, 0.0, 0.0, 0.0])  # (w, x, y, z)
    clip = mocap.MotionClip("rest", False, np.zeros(1), np.zeros((1, 3)), identity[None],
                            np.tile(identity, (1, 8, 1)), np.zeros((1, 4)))  # fmt: skip
    return mocap.joints3d_m(clip)[0]


def _head_frame(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit up and forward, and thorax-head length, of (..., 17 or 16 in 17 order, 3) joints."""
    up = p[..., _HEAD, :] - p[..., _THORAX, :]
    length = np.linalg.norm(up, axis=-1, keepdims=True)
    up = up / np.maximum(length, 1e-9)
    left = p[..., _LSH, :] - p[..., _RSH, :]
    left = left - (left * up).sum(-1, keepdims=True) * up
    left = left / np.maximum(np.linalg.norm(left, axis=-1, keepdims=True), 1e-9)
    return up, np.cross(left, up), left, length


@functools.cache
def nose_offset() -> tuple[float, float, float]:
    """The rest pose's nose - thorax along (up, forward, left), over the thorax-head length."""
    rest = rest_pose_m()
    up, fwd, left, length = _head_frame(rest)
    d = rest[NOSE] - rest[_THORAX]
    return tuple(float(d @ a / length[0]) for a in (up, fwd, left))


def fill_nose(pose16: np.ndarray) -> np.ndarray:
    """(N, 16, 3) -> (N, 17, 3): the nose put where the rest pose's rigid head has it."""
    out = np.zeros((*pose16.shape[:-2], NUM_JOINTS, 3), dtype=np.float64)
    out[..., list(KEEP), :] = pose16
    up, fwd, left, length = _head_frame(out)
    a, b, c = nose_offset()
    out[..., NOSE, :] = out[..., _THORAX, :] + length * (a * up + b * fwd + c * left)
    return out


@functools.cache
def rest_bone_m() -> float:
    """Mean length of :data:`BONES16` at rest (metres): the unsupervised rows' only 3D prior."""
    rest = rest_pose_m()[list(KEEP)]
    return float(np.mean([np.linalg.norm(rest[c] - rest[p]) for p, c in BONES16]))


def normalize_inputs(pose2d_px: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """(N, 17, 2) pixels -> (N, 16, 2) screen coordinates, root-relative, RMS 1 per frame."""
    x = normalize_2d(pose2d_px.astype(np.float32), image_size)[:, list(KEEP)]
    x = x - x[:, ROOT : ROOT + 1]
    rms = np.sqrt((x**2).sum(-1).mean(-1))[:, None, None]
    return (x / np.maximum(rms, 1e-6)).astype(np.float32)


def rotate_y(pose: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """(B, J, 3) turned by ``angle`` (B,) about the camera's y axis (the image's vertical)."""
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    x, y, z = pose.unbind(-1)
    return torch.stack([c * x + s * z, y, -s * x + c * z], -1)


def project(pose: torch.Tensor) -> torch.Tensor:
    """Weak perspective: (B, J, 3) root-relative -> (B, J, 2), renormalised to RMS 1."""
    xy = pose[..., :2]
    rms = xy.pow(2).sum(-1).mean(-1).clamp_min(1e-8).sqrt()[:, None, None]
    return xy / rms
