"""Pass 1 of ``posebert predict``: decode one video and follow its person, frame by frame.

Frames are decoded with PyAV (no system ffmpeg) in presentation order. Each frame goes to
:class:`data_shards.detect.PersonCrops` (BlazePose, tracking mode), which gives the person's 17
joints in the frame's pixels or nothing. A frame larger than the detector's ``max_side`` is
scaled down while it is converted from the stream's pixel format (one swscale pass, instead of a
full-size RGB frame resized again: what keeps a 4K video affordable); the joints are scaled back
to the video's pixels.

Time: every frame keeps the presentation timestamp of the stream (pts x time base, seconds), so
a variable-frame-rate video keeps its real timing; ``fps`` is the stream's average rate, and a
track says whether the frame steps vary by more than :data:`VFR_TOLERANCE` of it. A frame
without a pts gets the time of its index at the average rate.

Damage: a file PyAV cannot open, or one with no video stream or no decodable frame, is a
:class:`~data_shards.video.VideoError` (a ``ValueError`` whose message starts with the file
name). A stream that fails part-way (a cut or damaged file) keeps the frames decoded before the
failure, and the track says where it stopped; so does a stream that ends before the frame count
its container declares. :func:`frames_at` decodes the same frames again for the output video.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np

from data_shards.detect import DetectConfig, PersonCrops
from data_shards.skeleton import NUM_JOINTS
from data_shards.video import VideoError

VFR_TOLERANCE = 0.1
"""A video counts as variable-rate when a frame step differs from 1 / fps by more than this
fraction of it."""


@dataclasses.dataclass
class Track:
    """One video's person, per decoded frame (N frames, in presentation order)."""

    path: Path
    size: tuple[int, int]
    """(W, H) of the video, pixels."""
    fps: float
    """The stream's average frame rate."""
    timestamps: np.ndarray
    """(N,) float64 seconds: the stream's presentation timestamps."""
    joints_2d: np.ndarray
    """(N, 17, 2) float64, the video's pixels; NaN where nobody was found."""
    confidence: np.ndarray
    """(N, 17) float64 in [0, 1]; 0 where nobody was found."""
    detected: np.ndarray
    """(N,) bool: the person was found in this frame."""
    declared_frames: int | None
    """Frames the container declares (None when it does not say)."""
    stopped: str | None
    """Why decoding ended before the end of the stream (a cut or damaged file), else None."""
    seconds: dict[str, float]
    """Time spent decoding (and converting) frames and detecting the person."""

    @property
    def frames(self) -> int:
        return len(self.detected)

    @property
    def variable_rate(self) -> bool:
        steps = np.diff(self.timestamps)
        return bool(len(steps)) and bool(
            (np.abs(steps * self.fps - 1) > VFR_TOLERANCE).any())  # fmt: skip


def open_video(path: str | os.PathLike) -> tuple[av.container.InputContainer, av.VideoStream]:
    """The container and its first video stream; VideoError naming the file when it is not a
    readable video."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "no such file")
    try:
        container = av.open(os.fspath(path))
    except (av.FFmpegError, OSError) as e:
        reason = getattr(e, "strerror", None) or str(e)  # str(e) repeats the path
        raise VideoError(path, f"not a readable video ({reason})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(path, "no video stream (audio or data only)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-parallel decoding; output order is unchanged
    return container, stream


def scaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(W, H) shrunk so that the longer side is at most ``max_side`` (never enlarged); even
    sides (what H.264's 4:2:0 chroma needs)."""
    W, H = size
    s = min(1.0, max_side / max(W, H))
    return max(2, round(W * s / 2) * 2), max(2, round(H * s / 2) * 2)


def _frames(path: Path, size: tuple[int, int] | None, timer: dict[str, float],
            stop: dict) -> Iterator[tuple[av.VideoFrame, np.ndarray]]:  # fmt: skip
    """(frame, RGB image at ``size`` or the frame's own size) of every decodable frame; on a
    decoding error, stops and puts the reason in ``stop['why']``. Decode time in
    ``timer['decode']``."""
    container, stream = open_video(path)
    with container:
        n, t0 = 0, time.perf_counter()
        try:
            for frame in container.decode(stream):
                w, h = size or (frame.width, frame.height)
                image = frame.to_ndarray(format="rgb24", width=w, height=h)
                timer["decode"] += time.perf_counter() - t0
                n += 1
                yield frame, image
                t0 = time.perf_counter()
        except av.FFmpegError as e:
            stop["why"] = f"decoding failed after {n} frames ({type(e).__name__}: {e})"
        stop["declared"] = stream.frames or None
        stop["rate"] = float(stream.average_rate or stream.guessed_rate or 0)


def track_video(path: str | os.PathLike, config: DetectConfig,
                progress: Callable[[int], None] | None = None) -> Track:  # fmt: skip
    """Decode ``path`` and find its person in every frame (pass 1; see the module docstring).
    ``progress(n)`` is called after each frame."""
    path = Path(path)
    container, stream = open_video(path)
    with container:
        W, H = stream.codec_context.width, stream.codec_context.height
    if W <= 0 or H <= 0:
        raise VideoError(path, f"video stream without a frame size ({W}x{H})")
    small = scaled_size((W, H), config.max_side)
    scale = np.array([W / small[0], H / small[1]])
    timer = {"decode": 0.0, "detect": 0.0}
    stop: dict = {}
    times, joints, conf, found = [], [], [], []
    with PersonCrops(config) as people:
        for frame, image in _frames(path, small, timer, stop):
            t0 = time.perf_counter()
            result = people(image)
            timer["detect"] += time.perf_counter() - t0
            times.append(frame.time)
            found.append(result is not None)
            joints.append(result[1].joints * scale if result else np.full((NUM_JOINTS, 2), np.nan))
            conf.append(result[1].confidence if result else np.zeros(NUM_JOINTS))
            if progress is not None:
                progress(1)
    if not found:
        why = f" ({stop['why']})" if "why" in stop else ""
        raise VideoError(path, f"no decodable video frame{why}")
    fps = stop["rate"] or 25.0
    timestamps = np.array([t if t is not None else i / fps for i, t in enumerate(times)])
    declared = stop["declared"]
    stopped = stop.get("why")
    if stopped is None and declared is not None and len(found) < declared:
        stopped = f"the stream ends after {len(found)} of the {declared} frames it declares"
    return Track(path, (W, H), fps, timestamps, np.array(joints), np.array(conf),
                 np.array(found), declared, stopped,
                 {k: round(v, 3) for k, v in timer.items()})  # fmt: skip


def frames_at(path: str | os.PathLike, size: tuple[int, int], count: int,
              timer: dict[str, float]) -> Iterator[np.ndarray]:  # fmt: skip
    """The first ``count`` frames of ``path`` again (pass 2), as RGB images at ``size``;
    ValueError naming the file if fewer decode than pass 1 found."""
    n = 0
    for _, image in _frames(Path(path), size, timer, {}):
        yield image
        n += 1
        if n == count:
            return
    raise VideoError(path, f"decoded {n} frames on the second pass, {count} on the first")
