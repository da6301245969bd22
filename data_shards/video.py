"""Ordinary video files -> shard samples (one view, frames only, optional 2D keypoints).

Each file is decoded with PyAV (no system ffmpeg), optionally resampled to a target frame
rate, cropped (centre crop to the output aspect ratio, or a fixed box) and resized, then cut
into windows of T consecutive frames every ``stride`` frames. A sample has V = 1 view named
'video'; there are no 3D labels and no cameras.

Keypoints, when given, are one file per video: ``.npy`` of shape (N, 17, 2) (or (N, 17, 3)
with a confidence column, which is dropped) or ``.json`` holding the same nested list, in the
video's own pixel coordinates (continuous convention of :mod:`data_shards.camera`), N = the
number of frames in the video. They go through the same crop and resize as the frames.

Frame-rate resampling is by frame index (nearest source frame at the stream's average rate),
so variable-frame-rate files are treated as constant-rate; a target above the source rate
repeats frames.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from data_shards.camera import crop_intrinsics
from data_shards.detect import DetectConfig, PersonCrops
from data_shards.manifest import Manifest
from data_shards.schema import Meta, Sample, View, make_key
from data_shards.skeleton import NUM_JOINTS
from data_shards.write import WriterConfig, write_split

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
KEYPOINT_SUFFIXES = (".npy", ".json")


class VideoError(ValueError):
    """A video or keypoints file that cannot be used; the message starts with the file name."""

    def __init__(self, path: str | os.PathLike, message: str):
        super().__init__(f"{os.fspath(path)}: {message}")
        self.path, self.message = os.fspath(path), message


@dataclass(frozen=True)
class VideoConfig:
    """How video files become samples (maps one to one onto ``posebert shards video`` flags)."""

    size: tuple[int, int] = (128, 128)
    """(W, H) of the output frames, pixels."""
    frames: int = 16
    """T: frames per window."""
    stride: int | None = None
    """Frames between the starts of consecutive windows (at the output rate); None = T."""
    fps: float | None = None
    """Output frame rate; None keeps each file's own rate (then all files must share it)."""
    crop_box: Box | None = None
    """Fixed region (x0, y0, x1, y1) in source pixels; None = centre crop to the output aspect.
    Parts outside the image are black."""
    keypoints: str | None = None
    """A directory holding ``<video stem>.npy|.json`` for every video, or one file (one video)."""
    action: str | None = None
    """Action label of every sample; None = 'unlabeled'."""
    detect: bool = False
    """Find and track the person (:mod:`data_shards.detect`): a square, person-centred crop per
    frame instead of ``crop_box``, the detector's 17 joints as ``pose2d`` (a ``keypoints``
    file still wins) and, with their confidences, as ``det2d``; frames where the person is lost
    are dropped and counted, and no window spans such a gap."""
    detector: DetectConfig = field(default_factory=DetectConfig)
    """Detector, tracking and crop settings (with ``detect``)."""

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be two positive ints (W, H), got {self.size}")
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.crop_box is not None:
            box = tuple(float(b) for b in self.crop_box)
            if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"crop_box must be (x0, y0, x1, y1) with x1 > x0, y1 > y0: {box}")
            object.__setattr__(self, "crop_box", box)
        if self.action is not None and not self.action.strip():
            raise ValueError("action label must not be empty")
        if self.detect and self.crop_box is not None:
            raise ValueError("crop_box and detect exclude each other: the person sets the crop")

    @property
    def window_stride(self) -> int:
        return self.stride if self.stride is not None else self.frames

    def to_dict(self) -> dict:
        """JSON-ready settings (recorded in the manifest)."""
        d = asdict(self)
        d["size"], d["stride"] = list(self.size), self.window_stride
        d["crop_box"] = list(self.crop_box) if self.crop_box else None
        return d


def centre_box(width: int, height: int, size: tuple[int, int]) -> Box:
    """The largest box of aspect ratio size[0]/size[1] centred in a width x height image."""
    aspect = size[0] / size[1]
    if width / height > aspect:
        w = height * aspect
        return ((width - w) / 2, 0.0, (width + w) / 2, float(height))
    h = width / aspect
    return (0.0, (height - h) / 2, float(width), (height + h) / 2)


def crop_resize(
    image: Image.Image | np.ndarray, box: Sequence[float], size: tuple[int, int]
) -> np.ndarray:
    """Region ``box`` = (x0, y0, x1, y1) of an RGB image resized to ``size`` = (W, H).

    Coordinates are continuous pixels (see :mod:`data_shards.camera`), which is also how PIL
    places a resize box, so a point p maps to (p - (x0, y0)) * size / box size exactly, the
    same map as :func:`data_shards.camera.crop_intrinsics`. Areas outside the image are black.

    Returns:
        (H, W, 3) uint8.
    """
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    img = img.convert("RGB") if img.mode != "RGB" else img
    x0, y0, x1, y1 = (float(b) for b in box)
    W, H = img.size
    # PIL refuses a resize box outside the image: pad with black by whole pixels, shift the box.
    left, top = max(0, math.ceil(-x0)), max(0, math.ceil(-y0))
    right, bottom = max(0, math.ceil(x1 - W)), max(0, math.ceil(y1 - H))
    if left or top or right or bottom:
        canvas = Image.new("RGB", (W + left + right, H + top + bottom))
        canvas.paste(img, (left, top))
        img, x0, x1, y0, y1 = canvas, x0 + left, x1 + left, y0 + top, y1 + top
    out = img.resize(tuple(size), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1))
    return np.asarray(out)


def transform_points(points: np.ndarray, box: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """(..., 2) pixel points of the source image -> pixels of ``crop_resize(box, size)``."""
    A = crop_intrinsics(np.eye(3), box, size)
    return points @ A[:2, :2].T + A[:2, 2]


def load_keypoints(path: str | os.PathLike) -> np.ndarray:
    """A keypoints file -> (N, 17, 2) float64 pixels; VideoError if malformed or not finite."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            kp = np.load(path, allow_pickle=False)  # never unpickle a user file
        elif path.suffix == ".json":
            kp = np.asarray(json.loads(path.read_text()), dtype=np.float64)
        else:
            raise VideoError(path, f"keypoints must be {' or '.join(KEYPOINT_SUFFIXES)}")
    except (OSError, ValueError) as e:
        if isinstance(e, VideoError):
            raise
        raise VideoError(path, f"unreadable keypoints ({type(e).__name__}: {e})") from None
    if kp.ndim != 3 or kp.shape[1] != NUM_JOINTS or kp.shape[2] not in (2, 3):
        raise VideoError(path, f"keypoints shape {kp.shape}, expected (N, {NUM_JOINTS}, 2)")
    kp = kp[..., :2].astype(np.float64)
    bad = ~np.isfinite(kp).all(axis=(1, 2))
    if bad.any():
        raise VideoError(path, f"keypoints not finite at frame {int(np.argmax(bad))}")
    return kp


def keypoints_for(video: Path, keypoints: str | None, num_videos: int) -> Path | None:
    """The keypoints file of ``video``: ``keypoints`` itself, or DIR/<stem>.npy|.json."""
    if keypoints is None:
        return None
    kp = Path(keypoints)
    if kp.is_dir():
        found = [p for s in KEYPOINT_SUFFIXES if (p := kp / f"{video.stem}{s}").is_file()]
        if len(found) != 1:
            what = "no" if not found else "two"
            raise VideoError(video, f"{what} keypoints file <stem>.npy|.json in {kp}")
        return found[0]
    if not kp.is_file():
        raise VideoError(kp, "keypoints: no such file or directory")
    if num_videos != 1:
        raise VideoError(kp, f"one keypoints file for {num_videos} videos; give a directory")
    return kp


@dataclass
class _Frame:
    index: int
    """Output frame index (at the output rate)."""
    source: int
    """Index of the decoded frame it was taken from."""
    image: np.ndarray | None
    """None: the detector lost the person on this frame (dropped; windows break here)."""
    keypoints: np.ndarray | None
    det2d: np.ndarray | None = None
    """(17, 3) detector joints in output pixels and confidences (``detect``)."""


def _decode(path: Path, config: VideoConfig, kp_path: Path | None, info: dict) -> Iterator[_Frame]:
    """Decode, resample, crop and resize the frames of one file, one at a time.

    ``info`` receives 'fps' (output), 'source_fps', 'source_size', 'crop_box', 'decoded'.
    """
    kp = load_keypoints(kp_path) if kp_path is not None else None
    kp_says = f"keypoints file {kp_path} has {len(kp)} frames" if kp is not None else ""
    try:
        container = av.open(os.fspath(path))
    except (av.FFmpegError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e)  # str(e) repeats the path
        raise VideoError(path, f"not a readable video ({reason})") from None
    people = PersonCrops(config.detector) if config.detect else None
    with container, people or contextlib.nullcontext():
        if not container.streams.video:
            raise VideoError(path, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding; output order is unchanged
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise VideoError(path, "unknown frame rate")
        src_fps = Fraction(rate)
        out_fps = Fraction(config.fps).limit_denominator(1_000_000) if config.fps else src_fps
        ratio = src_fps / out_fps  # source frames per output frame
        info.update(fps=float(out_fps), source_fps=float(src_fps))
        next_out, i = 0, -1
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i == 0:
                    W, H = frame.width, frame.height
                    box = config.crop_box or centre_box(W, H, config.size)
                    info.update(source_size=[W, H], crop_box=[round(b, 3) for b in box])
                if kp is not None and i >= len(kp):
                    raise VideoError(path, f"{kp_says}, the video has more")
                # nearest source frame of output frame k is round(k * ratio) (exact fractions)
                if math.floor(next_out * ratio + Fraction(1, 2)) != i:
                    continue
                image, det2d, box = _frame_crop(frame, box, config, people)
                pts = None if kp is None or image is None else transform_points(
                    kp[i], box, config.size)  # fmt: skip
                if pts is None and det2d is not None:
                    pts = det2d[:, :2].astype(np.float64)
                while math.floor(next_out * ratio + Fraction(1, 2)) == i:
                    yield _Frame(next_out, i, image, pts, det2d)
                    next_out += 1
        except av.FFmpegError as e:
            raise VideoError(path, f"decoding failed after frame {i} ({e})") from None
        info["decoded"] = i + 1
        if people is not None:
            info.update(detected=people.found, lost=people.lost)
        if i < 0:
            raise VideoError(path, "no decodable video frame")
        if kp is not None and len(kp) != i + 1:
            raise VideoError(path, f"{kp_says}, the video has {i + 1}")


def _frame_crop(frame: av.VideoFrame, box: Box, config: VideoConfig, people: PersonCrops | None
                ) -> tuple[np.ndarray | None, np.ndarray | None, Box]:  # fmt: skip
    """(output image, det2d in output pixels, crop box) of one decoded frame; with detection,
    (None, None, box) when the person is lost."""
    if people is None:
        return crop_resize(frame.to_image(), box, config.size), None, box
    full = frame.to_ndarray(format="rgb24")
    found = people(full)
    if found is None:
        return None, None, box
    box, det = found
    det2d = det.as_det2d()
    det2d[:, :2] = transform_points(det.joints, box, config.size)
    return crop_resize(full, box, config.size), det2d, box


def _sample(path: Path, clip: str, window: list[_Frame], config: VideoConfig, info: dict) -> Sample:
    has_kp = window[0].keypoints is not None
    meta = Meta(
        source="video",
        clip=clip,
        action=config.action or "unlabeled",
        fps=info["fps"],
        frames=[f.index for f in window],
        views=[View("video", 0)],
        image_size=config.size,
        has={"frames": True, "masks": False, "pose3d": False, "pose2d": has_kp, "cameras": False,
             "det2d": config.detect},
        extra={
            "file": path.name,
            "source_frames": [f.source for f in window],
            "source_fps": info["source_fps"],
            "source_size": info["source_size"],
            "crop_box": info["crop_box"],
        },
    )
    frames = np.stack([f.image for f in window])[None]  # (V=1, T, H, W, 3)
    pose2d = np.stack([f.keypoints for f in window])[None].astype(np.float32) if has_kp else None
    det2d = np.stack([f.det2d for f in window])[None] if config.detect else None
    return Sample(make_key(clip, f"{window[0].index:06d}"), meta, frames=frames, pose2d=pose2d,
                  det2d=det2d)


def clip_name(path: str | os.PathLike) -> str:
    """The clip name of a video file: its stem with only [A-Za-z0-9_-] (see make_key)."""
    try:
        return make_key(Path(path).stem)
    except ValueError:
        raise VideoError(path, "no usable clip name in the file name; rename it") from None


def check_clip_names(files: Sequence[str | os.PathLike]) -> None:
    """VideoError if two files would share a clip name (their windows' keys would clash)."""
    clips: dict[str, str] = {}
    for f in files:
        other = clips.setdefault(clip_name(f), os.fspath(f))
        if other != os.fspath(f):
            raise VideoError(f, f"clip name {clip_name(f)!r} clashes with {other}; rename one")


def _file_samples(path: Path, config: VideoConfig, kp_path: Path | None,
                  stats: dict | None = None) -> Iterator[Sample]:  # fmt: skip
    """Windows of one file; logs a warning and yields nothing when it is shorter than T."""
    clip, T, stride = clip_name(path), config.frames, config.window_stride
    info: dict = {}
    buffer: deque[_Frame] = deque(maxlen=T)
    count = 0
    for frame in _decode(path, config, kp_path, info):
        if frame.image is None:  # the person was lost: no window spans this frame
            buffer.clear()
            continue
        buffer.append(frame)
        start = frame.index - T + 1
        if len(buffer) == T and start % stride == 0:
            count += 1
            yield _sample(path, clip, list(buffer), config, info)
    if stats is not None:
        stats[path.name] = {k: info[k] for k in ("decoded", "detected", "lost") if k in info}
    if count == 0 and config.detect:
        log.warning("%s: skipped, no %d consecutive frames with the person found (found in %d "
                    "of %d frames)", path, T, info.get("detected", 0),
                    info.get("detected", 0) + info.get("lost", 0))
    elif count == 0:
        n = buffer[-1].index + 1 if buffer else 0
        log.warning("%s: skipped, %d frames at %.6g fps is shorter than a window of %d",
                    path, n, info.get("fps", 0.0), T)


def iter_video_samples(
    files: Sequence[str | os.PathLike], config: VideoConfig, progress: bool = True,
    stats: dict | None = None,
) -> Iterator[Sample]:
    """Samples (windows) of every video file, in the given file order.

    Args:
        files: video file paths; their stems (sanitised) are the clip names and must differ.
        config: see :class:`VideoConfig`.
        progress: show a tqdm bar over the files.
        stats: when given, receives per file name its decoded frames and, with detection, the
            frames where the person was found and lost.

    Yields:
        :class:`Sample` with frames (1, T, H, W, 3) uint8 and, with keypoints, pose2d
        (1, T, 17, 2) float32 in output-frame pixels.

    Raises:
        VideoError (a ValueError) naming the file: unreadable or non-video file, clip-name
        clash, keypoints missing or with a frame count different from the video's, or a frame
        rate that differs between files while ``config.fps`` is None.
    """
    paths = [Path(f) for f in files]
    check_clip_names(paths)
    kp_paths = [keypoints_for(p, config.keypoints, len(paths)) for p in paths]  # fail early
    first_fps: float | None = None
    bar = tqdm(paths, desc="video", unit="file", disable=not progress)
    samples = 0
    for path, kp_path in zip(bar, kp_paths, strict=True):
        if not path.is_file():
            raise VideoError(path, "no such file")
        for sample in _file_samples(path, config, kp_path, stats):
            if first_fps is None:
                first_fps = sample.meta.fps
            elif sample.meta.fps != first_fps:
                raise VideoError(path, f"{sample.meta.fps:.6g} fps but earlier files have "
                                       f"{first_fps:.6g}; set fps to resample them all")
            samples += 1
            bar.set_postfix(samples=samples, refresh=False)
            yield sample
    bar.close()


def split_files(
    files: Sequence[str | os.PathLike], val_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split files (never frames: windows of one video are highly correlated) into train, val.

    Deterministic for the same file names and seed; at least one file in each part.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    names = sorted(os.fspath(f) for f in files)
    if len(names) < 2:
        raise ValueError(f"val_fraction needs at least 2 video files, got {len(names)}")
    random.Random(seed).shuffle(names)
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    return sorted(names[n_val:]), sorted(names[:n_val])


def ingest_videos(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: VideoConfig | None = None,
    writer_config: WriterConfig | None = None,
    *,
    split: str = "train",
    val_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Write video files as shards under ``out_dir``; returns {split name: manifest}.

    With ``val_fraction`` = 0 every file goes to ``split``; otherwise files (not frames) are
    split into 'train' and 'val' (see :func:`split_files`) and ``split`` is ignored. Each
    split is written atomically (see :mod:`data_shards.write`).
    """
    config = config or VideoConfig()
    if not files:
        raise ValueError("no video files given")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"invalid split name {split!r}")
    check_clip_names(files)  # across all splits: one clip name, one file
    if val_fraction:
        train, val = split_files(files, val_fraction, seed)
        parts: dict[str, list] = {"train": train, "val": val}
    else:
        parts = {split: [os.fspath(f) for f in files]}
    generator = {"command": "video", "config": config.to_dict(), "val_fraction": val_fraction,
                 "seed": seed}
    manifests = {}
    for name, group in parts.items():
        source = {"source": "video", "files": [os.path.basename(f) for f in group]}
        if config.detect:  # filled while the split is written, saved in its manifest
            source["detection"] = {}
        samples = _nonempty(iter_video_samples(group, config, progress, source.get("detection")),
                            name, config)  # fmt: skip
        manifests[name] = write_split(out_dir, name, samples, source, generator, writer_config)
    return manifests


def _nonempty(samples: Iterator[Sample], split: str, config: VideoConfig) -> Iterator[Sample]:
    """Pass samples through; at the end, a clear error if there were none (all too short)."""
    count = 0
    for count, sample in enumerate(samples, 1):  # noqa: B007 (count is read after the loop)
        yield sample
    if count == 0:
        what = "has the person found in" if config.detect else "is as long as"
        raise ValueError(f"split {split!r}: no video {what} a window of {config.frames} "
                         "frames (see the warnings above)")


def expected_windows(num_frames: int, config: VideoConfig) -> int:
    """Windows :func:`iter_video_samples` cuts from ``num_frames`` frames at the output rate."""
    T, stride = config.frames, config.window_stride
    return 0 if num_frames < T else (num_frames - T) // stride + 1
