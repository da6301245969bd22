"""The 17-joint Human3.6M skeleton: the one joint order used in every shard and model.

The order is the one of VideoPose3D / MotionBERT (Pavllo et al. 2019): the 32 motion-capture
markers of Human3.6M reduced to 17 joints. Joint ``j`` has parent ``PARENTS[j]`` (-1 for the
pelvis, the root). "Left" and "right" are the subject's own sides.
"""

from __future__ import annotations

import numpy as np

JOINT_NAMES: tuple[str, ...] = (
    "pelvis",  # 0
    "r_hip",  # 1
    "r_knee",  # 2
    "r_ankle",  # 3
    "l_hip",  # 4
    "l_knee",  # 5
    "l_ankle",  # 6
    "spine",  # 7
    "thorax",  # 8
    "nose",  # 9
    "head",  # 10 (head top)
    "l_shoulder",  # 11
    "l_elbow",  # 12
    "l_wrist",  # 13
    "r_shoulder",  # 14
    "r_elbow",  # 15
    "r_wrist",  # 16
)
NUM_JOINTS: int = len(JOINT_NAMES)
JOINT_INDEX: dict[str, int] = {name: j for j, name in enumerate(JOINT_NAMES)}

PARENTS: tuple[int, ...] = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 9, 8, 11, 12, 8, 14, 15)

LEFT_JOINTS: tuple[int, ...] = (4, 5, 6, 11, 12, 13)
RIGHT_JOINTS: tuple[int, ...] = (1, 2, 3, 14, 15, 16)
"""``LEFT_JOINTS[i]`` and ``RIGHT_JOINTS[i]`` are mirror images of each other."""

BONES: tuple[tuple[int, int], ...] = tuple((p, j) for j, p in enumerate(PARENTS) if p >= 0)
"""(parent, child) joint pairs, one per non-root joint, in child order."""

ROOT: int = 0


def flip_permutation() -> np.ndarray:
    """Joint permutation that swaps left and right (for horizontal-flip augmentation)."""
    perm = np.arange(NUM_JOINTS)
    perm[list(LEFT_JOINTS)] = RIGHT_JOINTS
    perm[list(RIGHT_JOINTS)] = LEFT_JOINTS
    return perm


def bone_lengths(joints: np.ndarray) -> np.ndarray:
    """Length of every bone of ``BONES``.

    Args:
        joints: (..., J, 3) joint positions.

    Returns:
        (..., len(BONES)) bone lengths in the input's units.
    """
    parents = np.array([p for p, _ in BONES])
    children = np.array([c for _, c in BONES])
    return np.linalg.norm(joints[..., children, :] - joints[..., parents, :], axis=-1)


def root_relative(joints: np.ndarray) -> np.ndarray:
    """(..., J, D) joints with the pelvis moved to the origin."""
    return joints - joints[..., ROOT : ROOT + 1, :]


def _check() -> None:
    assert len(PARENTS) == NUM_JOINTS
    assert all(p < j for j, p in enumerate(PARENTS)), "parents must precede children"
    for left, right in zip(LEFT_JOINTS, RIGHT_JOINTS, strict=True):
        assert JOINT_NAMES[left][2:] == JOINT_NAMES[right][2:]


_check()
