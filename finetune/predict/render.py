"""The output video of ``posebert predict``: the frame with its 2D skeleton, beside the 3D pose.

Left: the video frame (scaled so its longer side is at most ``max_side``) with the detected 17
joints; a joint the detector is unsure of (confidence below 0.5) is drawn hollow. Right: a
square panel with the lifted 3D pose seen from a fixed side view: the camera-axes pose rotated
``azimuth_deg`` about the vertical and tilted ``elevation_deg`` down, then projected
orthographically at a fixed scale (``extent_mm`` fills the panel's height), pelvis at the centre.
Drawn with PIL, a few lines per frame (no plotting library per frame). Subject's left in blue,
right in red, the trunk and head in grey. Frames where nobody was found say so in both halves.

:class:`VideoOut` encodes H.264 (yuv420p) with PyAV, each frame at its source timestamp, so a
variable-frame-rate video keeps its timing.
"""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_shards.skeleton import BONES, LEFT_JOINTS, RIGHT_JOINTS

LEFT, RIGHT, MIDDLE = (60, 130, 255), (255, 70, 60), (230, 230, 230)
TIME_BASE = Fraction(1, 90_000)
"""Time base of the output stream (the MPEG clock: exact for every common frame rate)."""


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """How the output video looks."""

    enabled: bool = True
    """Write ``<stem>.mp4`` (False: only the arrays and the summary)."""
    max_side: int = 640
    """Longer side of the video half, pixels (a 4K video is drawn scaled down)."""
    azimuth_deg: float = 70.0
    """Side view: rotation of the pose about the vertical axis (0: the camera's own view)."""
    elevation_deg: float = 15.0
    """Side view: tilt, looking down on the pose."""
    extent_mm: float = 2400.0
    """Height of the 3D panel in millimetres."""
    crf: int = 23
    """H.264 constant rate factor (lower: better quality, larger file)."""
    preset: str = "veryfast"
    """x264 speed preset."""

    def __post_init__(self) -> None:
        if self.max_side < 32 or self.extent_mm <= 0 or not 0 <= self.crf <= 51:
            raise ValueError("RenderConfig: need max_side >= 32, extent_mm > 0, 0 <= crf <= 51")


def _colour(child: int) -> tuple[int, int, int]:
    return LEFT if child in LEFT_JOINTS else RIGHT if child in RIGHT_JOINTS else MIDDLE


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_skeleton(draw: ImageDraw.ImageDraw, points: np.ndarray, width: int,
                  sure: np.ndarray | None = None) -> None:  # fmt: skip
    """Bones and joints of (17, 2) pixel points; joints not ``sure`` drawn hollow."""
    for parent, child in BONES:
        draw.line([tuple(points[parent]), tuple(points[child])], fill=_colour(child), width=width)
    r = max(2, width)
    for j, (x, y) in enumerate(points):
        fill = _colour(j) if sure is None or sure[j] else None
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=_colour(j))


def side_view(pose: np.ndarray, config: RenderConfig) -> np.ndarray:
    """(17, 3) camera-axes mm -> (17, 2) panel units (x right, y down, the pelvis at 0): the
    pose turned ``azimuth_deg`` about the vertical (y) axis, tilted ``elevation_deg``, seen
    orthographically."""
    a, e = np.deg2rad(config.azimuth_deg), np.deg2rad(config.elevation_deg)
    turn = np.array([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]])
    tilt = np.array([[1, 0, 0], [0, np.cos(e), np.sin(e)], [0, -np.sin(e), np.cos(e)]])
    return (pose @ (tilt @ turn).T)[:, :2]


def panel(pose: np.ndarray | None, side: int, config: RenderConfig) -> Image.Image:
    """The square 3D panel of one frame (``pose`` None: nobody found)."""
    image = Image.new("RGB", (side, side), (24, 26, 30))
    draw = ImageDraw.Draw(image)
    font = _font(max(10, side // 28))
    scale = side / config.extent_mm
    floor = side * 0.5 + 900 * scale  # a guide line about where the feet of a standing person are
    draw.line([(side * 0.1, floor), (side * 0.9, floor)], fill=(70, 74, 80), width=1)
    draw.text((6, 4), f"3D, side view ({config.azimuth_deg:g} deg)", fill=(180, 180, 180),
              font=font)  # fmt: skip
    if pose is None or not np.isfinite(pose).all():
        draw.text((side * 0.5, side * 0.5), "no person", fill=(200, 200, 200), font=font,
                  anchor="mm")  # fmt: skip
        return image
    points = side_view(pose, config) * scale + side * 0.5
    draw_skeleton(draw, points, max(2, side // 120))
    return image


def compose(frame: np.ndarray, joints: np.ndarray | None, confidence: np.ndarray | None,
            pose: np.ndarray | None, caption: str, config: RenderConfig) -> np.ndarray:
    """One output frame: ``frame`` (H, W, 3) at its drawing size with the 2D skeleton
    (``joints`` (17, 2) in this frame's pixels, None: nobody found) beside the 3D panel of
    side H. Returns (H, W + H, 3) uint8."""
    H, W = frame.shape[:2]
    out = Image.new("RGB", (W + H, H))
    video = Image.fromarray(frame)
    draw = ImageDraw.Draw(video)
    if joints is not None:
        draw_skeleton(draw, joints, max(2, H // 150), confidence >= 0.5)
    font = _font(max(10, H // 28))
    draw.text((6, 4), caption, fill=(255, 255, 255), font=font, stroke_width=2,
              stroke_fill=(0, 0, 0))  # fmt: skip
    out.paste(video, (0, 0))
    out.paste(panel(pose, H, config), (W, 0))
    return np.asarray(out)


class VideoOut:
    """An H.264 file written frame by frame, each frame at its timestamp (seconds)."""

    def __init__(self, path: str | os.PathLike, size: tuple[int, int], fps: float,
                 config: RenderConfig) -> None:  # fmt: skip
        self.container = av.open(os.fspath(path), "w")
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
        self.stream = self.container.add_stream("h264", rate=rate)
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = TIME_BASE
        self.stream.options = {"crf": str(config.crf), "preset": config.preset}
        self.last = -1

    def write(self, image: np.ndarray, seconds: float) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        pts = max(round(seconds / TIME_BASE), self.last + 1)  # strictly increasing
        frame.pts, frame.time_base, self.last = pts, TIME_BASE, pts
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()

    def __enter__(self) -> VideoOut:
        return self

    def __exit__(self, kind, *exc: object) -> None:
        if kind is None:
            self.close()
        else:  # a failed run: close the file without flushing; the caller deletes it
            self.container.close()
