"""The one reader of labelled clips from shards, used by every head.

A shard sample is a window of T frames of one clip seen by V cameras; windows of a clip
overlap. Heads want other cuts of the same data:

- :func:`read_split`: every sample of a split once, in manifest order, on one rank (the
  unshuffled reader every evaluation and head sets up; the pose head's windows);
- :func:`read_sequences`: per (clip, camera), the windows tiled back into contiguous runs, each
  frame's labels (and, on request, its decoded frame) from the first window that holds it: 2D
  keypoints in crop pixels, 3D in that camera's coordinates (mm), the crop's intrinsics (the
  lifting methods; the image head with ``frames=True``);
- :func:`read_motion`: per clip, the world-frame 3D poses, overlapping windows rescaled onto
  each other (the future head). The synthetic renders draw a body-height factor per window
  that scales its whole world pose, so a run built from first windows alone would jump in
  size where one window hands over to the next; labels tied to images (2D, camera 3D) are
  never rescaled.

A clip is named by its ``clip`` field, or ``subject/clip`` when two subjects share a clip name
(Human3.6M). :func:`labelled_subset` picks which clips or windows a supervised loss may read.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from data_shards.camera import world_to_camera
from data_shards.manifest import Manifest, find_splits
from data_shards.read import ReaderConfig, ShardReader
from data_shards.stages import ReaderError
from data_shards.transforms import Resize

STITCH_TOLERANCE_MM = 1.0
"""Overlapping windows must agree this well after rescaling to join one motion run."""


def read_split(split_dir: str | os.PathLike, *, frames: bool = False, masks: bool = False,
               size: int | None = None, batch_size: int = 16, float64: bool = False,
               error_budget: int = 0, name: str | None = None) -> Iterator[dict]:  # fmt: skip
    """Batches of a split's samples, each sample once, in manifest order, on one rank; frames
    decoded (and resized to ``size``) only when asked. A bad sample is a ``ValueError`` naming
    the split (``name``, else its folder; ``error_budget`` tolerates that many)."""
    config = ReaderConfig(str(split_dir), batch_size=batch_size, shuffle=False, drop_last=False,
                          frames="decode" if frames else "off", masks=masks,
                          float_dtype="float64" if float64 else "float32",
                          error_budget=error_budget,
                          transforms=(Resize(size),) if (frames and size) else ())  # fmt: skip
    seen: set[str] = set()
    try:
        for batch in ShardReader(config, rank=0, world_size=1):
            keep = [b for b, k in enumerate(batch["keys"]) if k not in seen]
            if len(keep) < len(batch["keys"]):  # the last batch is padded with repeats
                batch = _select(batch, keep)
            seen.update(batch["keys"])
            if batch["keys"]:
                yield batch
    except ReaderError as e:  # a wrong joint count lands here, named by the reader
        raise ValueError(f"{name or split_dir}: {e}") from None


def _select(batch: dict, rows: list[int]) -> dict:
    """The rows of a batch: per-sample lists and tensors indexed, bookkeeping kept."""
    size = len(batch["keys"])
    out = {}
    for k, v in batch.items():
        if isinstance(v, list) and len(v) == size:
            out[k] = [v[i] for i in rows]
        elif isinstance(v, torch.Tensor) and v.ndim and len(v) == size:
            out[k] = v[rows]
        else:
            out[k] = v
    return out


def clip_names(pairs: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(subject, clip) -> display name: the clip, or ``subject/clip`` when shared."""
    shared = Counter(clip for _, clip in pairs)
    return {(s, c): f"{s}/{c}" if shared[c] > 1 else c for s, c in pairs}


def labelled_subset(ids: list[str] | set[str], fraction: float, seed: int) -> set[str]:
    """The ids (clips or windows) whose labels a run may read: a prefix of one seeded
    permutation of the sorted ids, at least one when ``fraction`` > 0, so a smaller share is a
    subset of a larger one (nested label fractions)."""
    order = sorted(set(ids))
    if fraction <= 0:
        return set()
    if not order:
        raise ValueError("no ids to take labels from")
    perm = np.random.default_rng(seed).permutation(len(order))
    count = max(1, round(fraction * len(order)))
    return {order[i] for i in perm[:count]}


# ------------------------------------------------------------------------ per clip and camera


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
    images: np.ndarray | None = None
    """(N, 3, S, S) uint8 frames when read with ``frames=True``, else None."""
    det2d: np.ndarray | None = None
    """(N, J, 3) float32: a 2D detector's x, y (pixels of the same crop as ``pose2d``) and
    confidence, all 0 where nobody was found; None when the shards carry no ``det2d``
    (``posebert shards detect`` adds it)."""

    @property
    def frames(self) -> int:
        return len(self.pose2d)


def read_sequences(split_dir: str | os.PathLike, split: str, min_frames: int = 1,
                   frames: bool = False, size: int | None = None) -> list[Sequence]:  # fmt: skip
    """Every (clip, camera) run of a split with at least ``min_frames`` frames, in a fixed order
    (clip, camera, first frame); with ``frames`` each run carries its decoded frames (resized to
    ``size``), and where the shards carry ``det2d`` each run carries its detections. One-line
    ``ValueError`` for an empty split or samples without 2D keypoints, 3D poses or cameras."""
    if Manifest.load(split_dir).samples == 0:
        raise ValueError(f"split {split!r} ({split_dir}) is empty")
    rows: dict[tuple[str, str, str], dict[int, tuple]] = {}
    info: dict[tuple[str, str, str], tuple] = {}
    for batch in read_split(split_dir, frames=frames, size=size, batch_size=8 if frames else 16,
                            name=f"split {split!r}"):  # fmt: skip
        missing = [k for k in ("pose2d", "pose3d", "K", "Rt") if k not in batch]
        if missing:
            raise ValueError(f"split {split!r}: samples carry no {', '.join(missing)}; "
                             "lifting needs 2D keypoints, 3D poses and cameras")  # fmt: skip
        images = batch["frames"].numpy() if frames else None
        det2d = batch["det2d"].numpy() if "det2d" in batch else None
        for b, meta in enumerate(batch["meta"]):
            p3 = batch["pose3d"][b].numpy().astype(np.float64)
            Rt = batch["Rt"][b].numpy().astype(np.float64)
            for v, view in enumerate(meta.views):
                cam = world_to_camera(p3, Rt[v, :, :3], Rt[v, :, 3])
                key = (meta.subject, meta.clip, view.camera)
                info[key] = (meta.action, meta.fps, tuple(meta.image_size))
                run = rows.setdefault(key, {})
                for t, f in enumerate(meta.frames):
                    if int(f) not in run:  # the first window that holds the frame
                        run[int(f)] = (batch["pose2d"][b, v, t].numpy(), cam[t],
                                       batch["K"][b, v, t].numpy(),
                                       None if images is None else images[b, v, t].copy(),
                                       None if det2d is None else det2d[b, v, t])
    names = clip_names({(s, c) for s, c, _ in rows})
    out = []
    for key in sorted(rows):
        subject, clip, camera = key
        action, fps, size_wh = info[key]
        by_frame = rows[key]
        order = np.array(sorted(by_frame))
        for run in np.split(order, np.flatnonzero(np.diff(order) != 1) + 1):
            if len(run) < min_frames:
                continue
            r = [by_frame[int(f)] for f in run]
            out.append(Sequence(
                split, names[subject, clip], action, camera, int(run[0]), float(fps), size_wh,
                np.stack([x[0] for x in r]).astype(np.float32),
                np.stack([x[1] for x in r]).astype(np.float32),
                np.stack([x[2] for x in r]).astype(np.float32),
                np.stack([x[3] for x in r]) if frames else None,
                None if r[0][4] is None else np.stack([x[4] for x in r]).astype(np.float32),
            ))  # fmt: skip
    if not out:
        raise ValueError(f"split {split!r}: no clip has {min_frames} contiguous frames")
    return out


def read_splits(shards: str | os.PathLike, names: tuple[str, ...] = ("train", "val", "test"),
                **kwargs) -> dict[str, list[Sequence]]:  # fmt: skip
    """:func:`read_sequences` of each named split that exists; train must exist and so must at
    least one of the others."""
    splits = find_splits(shards)
    if "train" not in splits:
        raise ValueError(f"{shards}: no 'train' split (have {', '.join(splits) or 'none'})")
    found = {n: read_sequences(splits[n], n, **kwargs) for n in names if n in splits}
    if len(found) < 2:
        asked = ", ".join(n for n in names if n != "train") or "none asked for"
        raise ValueError(f"{shards}: no held-out split beside train (looked for: {asked}; "
                         f"the root has: {', '.join(splits)})")  # fmt: skip
    return found


# ------------------------------------------------------------------------ per clip, world frame


class Clip(NamedTuple):
    """A contiguous run of one clip's frames: (N, J, 3) world mm."""

    split: str
    name: str
    first_frame: int
    poses: np.ndarray


def stitch_windows(windows: list[tuple[list[int], np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """Overlapping windows (frame indices, (T, J, 3) poses) of one clip -> contiguous runs
    (first frame, (N, J, 3)). Each window is rescaled onto the run by the least-squares factor
    over their common frames (1 when the windows agree); a gap, or windows that still disagree
    by more than :data:`STITCH_TOLERANCE_MM`, start a new run."""
    pieces = []
    for frame_ids, poses in windows:  # a window with a gap in its frames becomes several pieces
        cut = np.flatnonzero(np.diff(frame_ids) != 1) + 1
        for idx in np.split(np.arange(len(frame_ids)), cut):
            pieces.append((int(frame_ids[idx[0]]), np.asarray(poses[idx], dtype=np.float64)))
    runs: list[tuple[int, list[np.ndarray]]] = []
    for first, poses in sorted(pieces, key=lambda p: p[0]):
        if runs:
            start, parts = runs[-1]
            end = start + sum(len(p) for p in parts)
            overlap = min(end, first + len(poses)) - first
            if overlap > 0:
                old = np.concatenate(parts)[first - start : first - start + overlap]
                new = poses[:overlap]
                scale = float((old * new).sum() / max((new * new).sum(), 1e-12))
                gap = np.linalg.norm(old - scale * new, axis=-1).mean()
                if gap <= STITCH_TOLERANCE_MM:
                    parts.append(scale * poses[overlap:])
                    continue
            elif first == end:
                parts.append(poses)
                continue
        runs.append((first, [poses]))
    return [(start, np.concatenate(parts).astype(np.float32)) for start, parts in runs]


def read_motion(split_dir: str | os.PathLike, split: str) -> list[Clip]:
    """Every clip of a split as world-frame motion runs (:func:`stitch_windows`); no image is
    decoded."""
    if Manifest.load(split_dir).samples == 0:
        raise ValueError(f"split {split!r} ({split_dir}) is empty")
    windows: dict[tuple[str, str], dict[str, tuple]] = {}
    for batch in read_split(split_dir, float64=True, name=f"split {split!r}"):
        if "pose3d" not in batch:
            raise ValueError(f"split {split!r}: samples carry no pose3d")
        for key, meta, poses in zip(batch["keys"], batch["meta"], batch["pose3d"].numpy(),
                                    strict=True):  # fmt: skip
            windows.setdefault((meta.subject, meta.clip), {})[key] = (meta.frames, poses)
    names = clip_names(set(windows))
    return [Clip(split, names[pair], first, poses)
            for pair, by_key in sorted(windows.items())
            for first, poses in stitch_windows(list(by_key.values()))]  # fmt: skip
