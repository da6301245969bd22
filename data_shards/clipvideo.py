"""An ordinary video of an embedded motion clip, with its ground truth: a test input for the
video path (``shards video --detect``, ``posebert predict``) whose 3D poses are known.

One static camera (a field of view like a phone's, 1.6 m high, looking at the clip's mean
pelvis position from ``distance_mm``), one drawn appearance (clothing, body shape, lighting)
over a real photograph filling the frame, encoded as H.264 with PyAV. The ground truth is
written beside the video as ``<video>.truth.npz``: ``joints_3d`` (N, 17, 3) mm in the
camera's coordinates (OpenCV axes), ``joints_2d`` (N, 17, 2) video pixels, ``K`` (3, 3),
``fps``.
"""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_shards import mocap
from data_shards.appearance import AppearanceConfig, background_photo, draw_appearance
from data_shards.camera import Camera, intrinsics, look_at
from data_shards.manifest import atomic_write_bytes


@dataclasses.dataclass(frozen=True)
class ClipVideoConfig:
    """What the rendered video looks like."""

    size: tuple[int, int] = (640, 360)
    """(W, H) of the video."""
    fps: float = 25.0
    """Frame rate (the clip is resampled to it)."""
    azimuth_deg: float = 30.0
    """Camera direction around the subject (0: along +x)."""
    distance_mm: float = 4000.0
    """Camera distance from the clip's mean pelvis position, on the ground plane."""
    hfov_deg: float = 60.0
    """Horizontal field of view."""
    seed: int = 0
    """Appearance and background draw."""
    max_frames: int | None = None
    """Render at most this many frames (None: the whole clip)."""


def clip_camera(clip: mocap.MotionClip, config: ClipVideoConfig) -> Camera:
    """The static camera looking at the clip's mean pelvis position at 1 m height."""
    root = mocap.joints3d(clip)[:, 0]
    centre = np.array([root[:, 0].mean(), root[:, 1].mean(), 1000.0])
    a = np.deg2rad(config.azimuth_deg)
    eye = centre + np.array([config.distance_mm * np.cos(a), config.distance_mm * np.sin(a), 600])
    R, t = look_at(eye, centre)
    W, H = config.size
    f = W / 2 / np.tan(np.deg2rad(config.hfov_deg) / 2)
    return Camera(intrinsics(f, f, W / 2, H / 2), R, t, W, H, name="video")


def _background(name: str, size: tuple[int, int]) -> np.ndarray:
    """The photo scaled to cover the frame, centre-cropped."""
    photo = Image.fromarray(background_photo(name))
    W, H = size
    s = max(W / photo.width, H / photo.height)
    photo = photo.resize((round(photo.width * s) + 1, round(photo.height * s) + 1))
    x0, y0 = (photo.width - W) // 2, (photo.height - H) // 2
    return np.asarray(photo.crop((x0, y0, x0 + W, y0 + H)).convert("RGB"))


def render_clip_video(path: str | os.PathLike, clip_name: str,
                      config: ClipVideoConfig | None = None,
                      progress: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """Render ``clip_name`` to the H.264 video ``path`` (.mp4) and its ground truth
    (``<path>.truth.npz``); returns the ground-truth arrays. Both files are written to a
    temporary name and renamed, so a killed run never leaves a video that looks complete."""
    import av

    from data_shards.render import BodyRenderer, composite

    config = config or ClipVideoConfig()
    if clip_name not in mocap.CLIP_NAMES:
        raise ValueError(f"unknown clip {clip_name!r}; choose from {', '.join(mocap.CLIP_NAMES)}")
    clip = mocap.resample(mocap.load_clip(clip_name), config.fps)
    if config.max_frames is not None:
        clip = mocap.subclip(clip, 0, min(config.max_frames, clip.num_frames))
    cam = clip_camera(clip, config)
    look = draw_appearance(np.random.default_rng([config.seed, 7]), 1, AppearanceConfig())
    background = _background(look.backgrounds[0].photo, config.size)
    joints = mocap.joints3d(clip)  # (N, J, 3) world mm
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part{os.getpid()}.mp4")
    try:
        with BodyRenderer() as renderer, av.open(str(part), "w") as out:
            renderer.set_appearance(look)
            stream = out.add_stream("h264", rate=Fraction(config.fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = *config.size, "yuv420p"
            for t in tqdm(range(clip.num_frames), desc=f"render {clip_name}", disable=not progress):
                renderer.set_pose(clip, t)
                rgb = composite(renderer.render(cam, look.light), background)
                out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb),
                                                                 format="rgb24")))  # fmt: skip
            out.mux(stream.encode())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    truth = {"joints_3d": cam.world_to_camera(joints).astype(np.float32),
             "joints_2d": cam.project(joints).astype(np.float32), "K": cam.K,
             "fps": np.float64(config.fps), "clip": np.str_(clip_name)}  # fmt: skip
    import io

    buf = io.BytesIO()
    np.savez(buf, **truth)
    atomic_write_bytes(truth_path(path), buf.getvalue())
    return truth


def truth_path(video: str | os.PathLike) -> Path:
    video = Path(video)
    return video.with_name(video.name + ".truth.npz")
