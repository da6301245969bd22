"""Test videos made from a rendered clip: re-encoded with another size, timing, gaps or damage."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def decode(path: str | os.PathLike) -> list[np.ndarray]:
    with av.open(os.fspath(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def encode(path: str | os.PathLike, frames: list[np.ndarray], fps: float = 25.0,
           times: list[float] | None = None, size: tuple[int, int] | None = None,
           faststart: bool = False) -> Path:  # fmt: skip
    """H.264 of ``frames`` (resized to ``size`` = (W, H)), each at ``times`` (seconds) when
    given, else at ``fps``; ``faststart`` puts the index first (a cut file still opens)."""
    options = {"movflags": "faststart"} if faststart else {}
    tb = Fraction(1, 90_000)
    with av.open(os.fspath(path), "w", options=options) as out:
        stream = out.add_stream("h264", rate=Fraction(fps).limit_denominator(1001))
        H, W = frames[0].shape[:2]
        stream.width, stream.height = size or (W, H)
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = tb
        stream.options = {"preset": "ultrafast"}
        for i, image in enumerate(frames):
            if size is not None:
                image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = round((times[i] if times is not None else i / fps) / tb)
            frame.time_base = tb
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return Path(path)


def cut(path: str | os.PathLike, fraction: float = 0.5) -> Path:
    """Truncate a file to ``fraction`` of its bytes (a download or a copy that stopped)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])
    return Path(path)
