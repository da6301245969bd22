"""Per-sample transforms (numpy, in loader workers) and the collation of samples into batches.

A transform is a picklable callable ``(sample, rng) -> sample`` (spawn-started workers pickle
it); ``rng`` is a ``numpy.random.Generator`` the reader seeds from (seed, epoch, sample
position), so augmentation is reproducible and survives a resume. Transforms keep every part
of a sample consistent (frames, masks, 2D poses, cameras, meta) and must give every sample of
a split the same shapes, or batches cannot be stacked. Photometric augmentation and
normalisation belong on the GPU side, where they cost nothing next to the backbone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_shards.schema import Sample

Transform = Callable[[Sample, np.random.Generator], Sample]


class Decoded(NamedTuple):
    """A decoded sample and its position in the epoch's global sequence."""

    index: int
    sample: Sample


def apply_transforms(
    items: Iterable[Decoded], transforms: tuple[Transform, ...], seed: int, epoch: int
) -> Iterator[Decoded]:
    """The reader's transform stage: rng keyed by (seed, epoch, sample position), so the same
    sample gets the same augmentation whichever rank or worker reads it, and after a resume."""
    for item in items:
        sample = item.sample
        if transforms:
            rng = np.random.default_rng([seed, epoch, item.index])
            for t in transforms:
                sample = t(sample, rng)
        yield item._replace(sample=sample)


@dataclasses.dataclass(frozen=True)
class SelectViews:
    """Keep ``count`` of the V views, drawn at random (in random order) per sample."""

    count: int
    """Views to keep (at most V)."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"SelectViews.count must be >= 1, got {self.count}")

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        V = s.meta.num_views
        if self.count > V:
            raise ValueError(f"sample {s.key}: SelectViews({self.count}) of {V} views")
        idx = rng.choice(V, self.count, replace=False)
        meta = dataclasses.replace(s.meta, views=[s.meta.views[i] for i in idx])
        return dataclasses.replace(
            s, meta=meta, **{name: _take(getattr(s, name), idx) for name in _PER_VIEW}
        )


@dataclasses.dataclass(frozen=True)
class TemporalCrop:
    """Keep ``length`` consecutive frames of the T, starting at a random position."""

    length: int
    """Frames to keep (at most T)."""

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"TemporalCrop.length must be >= 1, got {self.length}")

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        T = s.meta.num_frames
        if self.length > T:
            raise ValueError(f"sample {s.key}: TemporalCrop({self.length}) of {T} frames")
        t0 = int(rng.integers(0, T - self.length + 1))
        window = slice(t0, t0 + self.length)
        meta = dataclasses.replace(s.meta, frames=s.meta.frames[window])
        parts = {name: _cut(getattr(s, name), window) for name in _PER_VIEW_TIME}
        pose3d = None if s.pose3d is None else s.pose3d[window]
        return dataclasses.replace(s, meta=meta, pose3d=pose3d, **parts)


_PER_VIEW = ("frames", "masks", "pose2d", "det2d", "K", "Rt", "jpegs")
_PER_VIEW_TIME = ("frames", "masks", "pose2d", "det2d", "K", "jpegs")  # axis 0 = V, axis 1 = T


def _take(part: Any, idx: np.ndarray) -> Any:
    if part is None:
        return None
    return [part[i] for i in idx] if isinstance(part, list) else part[idx]


def _cut(part: Any, window: slice) -> Any:
    if part is None:
        return None
    return [row[window] for row in part] if isinstance(part, list) else part[:, window]


def collate(
    items: list[Decoded], frames: str = "decode", masks: bool = True, float_dtype: str = "float32"
) -> dict[str, Any]:
    """Decoded samples -> one batch of torch tensors; parts the samples lack are absent.

    frames (B, V, T, 3, H, W) uint8 (or ``jpegs`` [b][v][t] bytes with frames='jpeg'),
    masks (B, V, T, H, W) bool, pose3d (B, T, J, 3) mm, pose2d (B, V, T, J, 2) px,
    K (B, V, T, 3, 3), Rt (B, V, 3, 4), det2d (B, V, T, J, 3) in ``float_dtype``; keys, meta,
    index (positions).
    """
    samples = [s for _, s in items]
    first = samples[0]
    out: dict[str, Any] = {
        "keys": [s.key for s in samples],
        "meta": [s.meta for s in samples],
        "index": torch.tensor([i for i, _ in items], dtype=torch.int64),
    }
    if frames == "decode" and first.frames is not None:
        V, T, H, W, C = first.frames.shape
        out["frames"] = _empty((len(samples), V, T, C, H, W), torch.uint8)  # backbone layout
        buf = out["frames"].numpy()
        for b, s in enumerate(samples):
            for c in range(C):  # per channel: 4x faster than one strided transpose copy
                buf[b, :, :, c] = s.frames[..., c]
    elif frames == "jpeg" and first.jpegs is not None:
        out["jpegs"] = [s.jpegs for s in samples]
    if masks and first.masks is not None:
        out["masks"] = _empty((len(samples), *first.masks.shape), torch.bool)
        np.stack([s.masks for s in samples], out=out["masks"].numpy())
    for name in ("pose3d", "pose2d", "K", "Rt", "det2d"):
        if getattr(first, name) is not None:
            arr = np.stack([getattr(s, name) for s in samples]).astype(float_dtype, copy=False)
            out[name] = torch.from_numpy(arr)
    return out


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, in shared memory inside a loader worker: the batch then reaches the
    main process without the copy DataLoader would make (as torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).share_memory_()


@dataclasses.dataclass(frozen=True)
class Resize:
    """Resize frames (bilinear) and masks (nearest) to ``size`` x ``size``, and scale 2D poses
    and intrinsics with them: with continuous pixel coordinates this is an exact change of
    intrinsics (data_shards/camera.py), so labels stay consistent with the pixels. Frames left
    as JPEG bytes (the reader's ``frames="jpeg"``) are not touched here: ``meta.image_size``
    says the size they are resized to where they are decoded (:mod:`data_shards.device_decode`,
    the same filter)."""

    size: int
    """Output side in pixels."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"Resize.size must be >= 1, got {self.size}")

    def __call__(self, s: Sample, rng: np.random.Generator) -> Sample:
        from PIL import Image

        W, H = s.meta.image_size
        if (W, H) == (self.size, self.size):
            return s
        sx, sy = self.size / W, self.size / H
        out = {}
        if s.frames is not None:
            V, T = s.frames.shape[:2]
            out["frames"] = np.stack([
                np.stack([np.asarray(Image.fromarray(s.frames[v, t]).resize(
                    (self.size, self.size), Image.BILINEAR)) for t in range(T)])
                for v in range(V)
            ])  # fmt: skip
        if s.masks is not None:
            rows = (np.arange(self.size) + 0.5) / sy  # nearest source pixel centres
            cols = (np.arange(self.size) + 0.5) / sx
            out["masks"] = s.masks[..., rows.astype(int)[:, None], cols.astype(int)[None, :]]
        if s.pose2d is not None:
            out["pose2d"] = (s.pose2d * np.array([sx, sy], dtype=s.pose2d.dtype)).astype(
                s.pose2d.dtype
            )
        if s.det2d is not None:  # x, y scale; the confidence stays
            out["det2d"] = (s.det2d * np.array([sx, sy, 1.0], dtype=s.det2d.dtype)).astype(
                s.det2d.dtype
            )
        if s.K is not None:
            scale = np.diag([sx, sy, 1.0]).astype(s.K.dtype)
            out["K"] = scale @ s.K
        meta = dataclasses.replace(s.meta, image_size=(self.size, self.size))
        return dataclasses.replace(s, meta=meta, **out)
