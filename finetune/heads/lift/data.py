"""2D -> 3D lifting inputs and targets.

The sequences themselves (per clip and camera: 2D keypoints in crop pixels, 3D in that
camera's coordinates in mm, the crop's intrinsics, optionally the frames) come from the one
clip reader, :func:`finetune.clips.read_sequences`. What is specific to lifting lives here:
inputs are normalised the VideoPose3D way (pixels -> [-1, 1] across the image width, the
aspect kept); targets are root-relative camera coordinates in metres; :func:`corrupt_2d`
imitates a detector (Gaussian pixel noise and dropped joints).

The 2D input is either the shards' ground-truth projections (``input="gt"``) or a real
detector's keypoints (``input="detected"``: the ``det2d`` member that ``posebert shards detect``
writes, :func:`input_2d`). A frame where the detector lost the person carries no keypoints;
:func:`fill_lost` gives it the linear interpolation of the nearest detected frames before and
after it in the same sequence (the first / last detected frame held before / after them: a
detector with a tracker cannot see the future past the sequence's end), and a sequence where
nobody was ever found gets every joint at the crop's centre. Only x, y are read; the
confidence is not an input, but ``min_confidence`` > 0 also counts a found frame whose mean
joint confidence is below it as lost (on the demo shards BlazePose's confidence tells its wild
frames: of the found frames with mean confidence < 0.7, 75-90% are more than 30 px off the
projected joints, against 9-22% of the others). Scoring is against the ground-truth 3D on
every frame, lost ones included (:func:`lost_frames` counts them).
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


INPUTS = ("gt", "detected")
"""Where a lifting method's 2D input comes from: the shards' projections or ``det2d``."""


def lost_frames(det2d: np.ndarray, min_confidence: float = 0.0) -> np.ndarray:
    """(N, J, 3) det2d -> (N,) bool: the frames where the detector found nobody (every joint's
    confidence 0, :data:`data_shards.detect.MISSED`) or, with ``min_confidence`` > 0, whose
    mean joint confidence is below it."""
    confidence = det2d[..., 2]
    lost = confidence.max(-1) <= 0
    return lost | (confidence.mean(-1) < min_confidence) if min_confidence > 0 else lost


def fill_lost(det2d: np.ndarray, image_size: tuple[int, int], min_confidence: float = 0.0
              ) -> np.ndarray:  # fmt: skip
    """(N, J, 3) det2d of one sequence -> (N, J, 2) float32 pixels with the lost frames
    (:func:`lost_frames`) filled: linear interpolation between the nearest detected frames,
    the first / last detected frame held at the sequence's ends, the crop's centre when no
    frame was detected."""
    N, J = det2d.shape[:2]
    lost = lost_frames(det2d, min_confidence)
    found = np.flatnonzero(~lost)
    xy = det2d[..., :2].astype(np.float64).reshape(N, J * 2)
    if len(found) == 0:
        centre = np.asarray(image_size, np.float64) / 2
        return np.broadcast_to(centre, (N, J, 2)).astype(np.float32)
    if lost.any():
        frames = np.arange(N)
        xy = np.stack([np.interp(frames, found, xy[found, c]) for c in range(J * 2)], 1)
    return xy.reshape(N, J, 2).astype(np.float32)


def input_2d(sequence: Sequence, source: str, min_confidence: float = 0.0) -> np.ndarray:
    """(N, J, 2) pixels a method reads: the ground-truth projections (``gt``) or the detector's
    keypoints with lost frames filled (``detected``, :func:`fill_lost`)."""
    if source == "gt":
        return sequence.pose2d
    if source != "detected":
        raise ValueError(f"unknown 2D input {source!r}; choose from {', '.join(INPUTS)}")
    if sequence.det2d is None:
        raise ValueError(f"clip {sequence.clip!r} ({sequence.split}) carries no det2d")
    return fill_lost(sequence.det2d, sequence.image_size, min_confidence)


def check_joints(sequences: list[Sequence]) -> None:
    for s in sequences:
        if s.pose2d.shape[1] != NUM_JOINTS:
            raise ValueError(f"clip {s.clip!r}: {s.pose2d.shape[1]} joints, expected {NUM_JOINTS}")
