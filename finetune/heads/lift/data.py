"""2D -> 3D lifting data: per clip and camera, the 2D keypoints, 3D pose and intrinsics.

A shard sample is a window of T frames seen by V cameras. Lifting wants whole sequences per
camera, so the windows of a clip are tiled back into contiguous runs (each frame taken from the
first window that holds it; no frame is decoded). Every frame keeps its own labels, which are
consistent with each other: the 2D keypoints (pixels of the window's person crop), the crop's
intrinsics K and the 3D pose in that camera's coordinates (mm). The synthetic renders draw a
body-height factor per window, so the body's size can step by a few percent where one window
hands over to the next.

Inputs are normalised the VideoPose3D way (pixels -> [-1, 1] across the image width, the
aspect kept); targets are root-relative camera coordinates in metres. :func:`corrupt_2d`
imitates a detector: Gaussian pixel noise and dropped joints.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from data_shards.camera import world_to_camera
from data_shards.manifest import Manifest, find_splits
from data_shards.read import ReaderConfig, ShardReader
from data_shards.skeleton import NUM_JOINTS, ROOT
from data_shards.stages import ReaderError


class Sequence(NamedTuple):
    """One clip seen by one camera, frames ``first_frame .. first_frame + N - 1``."""

    split: str
    clip: str
    action: str
    camera: str
    first_frame: int
    fps: float
    image_size: tuple[int, int]
    """(W, H) of the crop the 2D keypoints are in."""
    pose2d: np.ndarray
    """(N, J, 2) float32 pixels."""
    pose3d: np.ndarray
    """(N, J, 3) float32, camera coordinates, mm (absolute: the trajectory is there)."""
    K: np.ndarray
    """(N, 3, 3) float32 intrinsics of each frame's crop."""

    @property
    def frames(self) -> int:
        return len(self.pose2d)


def read_sequences(split_dir: str | os.PathLike, split: str, min_frames: int = 1
                   ) -> list[Sequence]:  # fmt: skip
    """Every (clip, camera) run of a split with at least ``min_frames`` frames, in a fixed
    order (clip, camera, first frame). One-line ``ValueError`` for an empty split or samples
    without 2D keypoints, 3D poses or cameras."""
    manifest = Manifest.load(split_dir)
    if manifest.samples == 0:
        raise ValueError(f"split {split!r} ({split_dir}) is empty")
    config = ReaderConfig(str(split_dir), batch_size=16, shuffle=False, drop_last=False,
                          frames="off", masks=False, error_budget=0)  # fmt: skip
    frames: dict[tuple[str, str, str], dict[int, tuple]] = {}
    info: dict[tuple[str, str, str], tuple] = {}
    try:
        for batch in ShardReader(config, rank=0, world_size=1):
            missing = [k for k in ("pose2d", "pose3d", "K", "Rt") if k not in batch]
            if missing:
                raise ValueError(f"split {split!r}: samples carry no {', '.join(missing)}; "
                                 "lifting needs 2D keypoints, 3D poses and cameras")  # fmt: skip
            for b, meta in enumerate(batch["meta"]):
                p3 = batch["pose3d"][b].numpy().astype(np.float64)
                Rt = batch["Rt"][b].numpy().astype(np.float64)
                for v, view in enumerate(meta.views):
                    cam = world_to_camera(p3, Rt[v, :, :3], Rt[v, :, 3])
                    key = (meta.subject, meta.clip, view.camera)
                    info[key] = (meta.action, meta.fps, tuple(meta.image_size))
                    run = frames.setdefault(key, {})
                    for t, f in enumerate(meta.frames):
                        run.setdefault(int(f), (batch["pose2d"][b, v, t].numpy(),
                                                cam[t], batch["K"][b, v, t].numpy()))
    except ReaderError as e:  # a wrong joint count lands here, named by the reader
        raise ValueError(f"split {split!r}: {e}") from None
    shared = Counter(clip for _, clip in {(subject, clip) for subject, clip, _ in frames})
    out = []
    for key in sorted(frames):
        subject, clip, camera = key
        name = f"{subject}/{clip}" if shared[clip] > 1 else clip  # one clip, two subjects
        action, fps, size = info[key]
        by_frame = frames[key]
        order = np.array(sorted(by_frame))
        for run in np.split(order, np.flatnonzero(np.diff(order) != 1) + 1):
            if len(run) < min_frames:
                continue
            rows = [by_frame[int(f)] for f in run]
            out.append(Sequence(
                split, name, action, camera, int(run[0]), float(fps), size,
                np.stack([r[0] for r in rows]).astype(np.float32),
                np.stack([r[1] for r in rows]).astype(np.float32),
                np.stack([r[2] for r in rows]).astype(np.float32)))  # fmt: skip
    if not out:
        raise ValueError(f"split {split!r}: no clip has {min_frames} contiguous frames")
    return out


def read_splits(shards: str | os.PathLike, names: tuple[str, ...] = ("train", "val", "test")
                ) -> dict[str, list[Sequence]]:  # fmt: skip
    """:func:`read_sequences` of each named split that exists; train must exist and so must at
    least one of the others."""
    splits = find_splits(shards)
    if "train" not in splits:
        raise ValueError(f"{shards}: no 'train' split (have {', '.join(splits) or 'none'})")
    found = {n: read_sequences(splits[n], n) for n in names if n in splits}
    if len(found) < 2:
        raise ValueError(f"{shards}: no held-out split ({', '.join(names[1:])}) beside train")
    return found


# ------------------------------------------------------------------------------ transforms


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
