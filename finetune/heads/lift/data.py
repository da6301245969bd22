"""2D -> 3D lifting inputs and targets.

The sequences themselves (per clip and camera: 2D keypoints in crop pixels, 3D in that
camera's coordinates in mm, the crop's intrinsics, optionally the frames) come from the one
clip reader, :func:`finetune.clips.read_sequences`. What is specific to lifting lives here:
inputs are normalised the VideoPose3D way (pixels -> [-1, 1] across the image width, the
aspect kept); targets are root-relative camera coordinates in metres; :func:`corrupt_2d`
imitates a detector (Gaussian pixel noise and dropped joints).
"""

from __future__ import annotations

import numpy as np
import torch

from data_shards.skeleton import NUM_JOINTS, ROOT
from finetune.clips import Sequence


def normalize_2d(pose2d: np.ndarray | torch.Tensor, image_size: tuple[int, int]):
    """Pixels -> VideoPose3D screen coordinates: x in [-1, 1], y scaled alike (aspect kept)."""
    w, h = image_size
    return pose2d / w * 2 - pose2d.new_tensor([1, h / w]) if isinstance(pose2d, torch.Tensor) \
        else (pose2d / w * 2 - np.array([1, h / w], dtype=pose2d.dtype))  # fmt: skip


def denormalize_2d(x: np.ndarray | torch.Tensor, image_size: tuple[int, int]):
    """Inverse of :func:`normalize_2d`."""
    w, h = image_size
    shift = x.new_tensor([1, h / w]) if isinstance(x, torch.Tensor) else np.array([1, h / w])
    return (x + shift) * w / 2


def root_relative_m(pose3d_mm: np.ndarray) -> np.ndarray:
    """(..., J, 3) camera mm -> root-relative metres (the lifting target)."""
    return (pose3d_mm - pose3d_mm[..., ROOT : ROOT + 1, :]) / 1000.0


def corrupt_2d(pose2d: np.ndarray, noise_px: float, drop_prob: float, rng: np.random.Generator
               ) -> np.ndarray:  # fmt: skip
    """A detector's keypoints: Gaussian noise of ``noise_px`` pixels per coordinate, and each
    joint dropped with ``drop_prob``; a dropped joint is put at the mean of the frame's kept
    joints (where a detector that lost a joint tends to collapse it), or left when none is kept."""
    out = pose2d + rng.normal(0.0, noise_px, pose2d.shape) if noise_px > 0 else pose2d.copy()
    if drop_prob > 0:
        drop = rng.random(pose2d.shape[:-1]) < drop_prob
        kept = ~drop
        count = kept.sum(-1, keepdims=True)
        centre = (out * kept[..., None]).sum(-2) / np.maximum(count, 1)
        fill = np.where(count > 0, centre, 0)[..., None, :]
        out = np.where(drop[..., None] & (count[..., None] > 0), fill, out)
    return out.astype(np.float32)


def check_joints(sequences: list[Sequence]) -> None:
    for s in sequences:
        if s.pose2d.shape[1] != NUM_JOINTS:
            raise ValueError(f"clip {s.clip!r}: {s.pose2d.shape[1]} joints, expected {NUM_JOINTS}")
