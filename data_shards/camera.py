"""Pinhole cameras: intrinsics, extrinsics, world <-> camera, projection, person crops.

Conventions (used by every shard and model):
- World: metres x 1000 (millimetres), Z up, ground at z = 0.
- Camera: OpenCV axes (x right, y down, z forward). ``X_cam = R @ X_world + t``, t in mm.
- Pixels: continuous coordinates; the image covers [0, W] x [0, H] and pixel (i, j) has its
  centre at (i + 0.5, j + 0.5). With this convention a crop-and-resize is an exact change of
  intrinsics, so a renderer can draw straight at the crop size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from data_shards.skeleton import root_relative


def world_to_camera(points: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(..., 3) world points -> camera coordinates. R (3, 3), t (3,)."""
    return points @ np.asarray(R).T + np.asarray(t)


def camera_to_world(points: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(..., 3) camera points -> world coordinates (inverse of :func:`world_to_camera`)."""
    return (points - np.asarray(t)) @ np.asarray(R)


def camera_root_relative(pose3d: np.ndarray, Rt: np.ndarray) -> np.ndarray:
    """World poses of a window seen by each view: root-relative, in camera coordinates.

    pose3d (..., T, J, 3) world mm and Rt (..., V, 3, 4) -> (..., V, T, J, 3) mm. What one image
    determines; the translation cancels, so only R is applied.
    """
    rel = root_relative(np.asarray(pose3d, dtype=np.float64))
    R = np.asarray(Rt, dtype=np.float64)[..., :3, :3]
    return np.einsum("...vij,...tkj->...vtki", R, rel)


def project_camera(points_cam: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(..., 3) camera-frame points -> (..., 2) pixels with intrinsics K (..., 3, 3).

    K may carry leading batch dimensions matching the points' (e.g. one K per frame).
    """
    K = np.asarray(K)
    z = points_cam[..., 2:3]
    xy = points_cam[..., :2] / z
    if K.ndim > 2:  # per-point-set intrinsics: (..., 3, 3) broadcast over the joint axis
        K = K[..., None, :, :]
    fx, fy = K[..., 0, 0], K[..., 1, 1]
    cx, cy, s = K[..., 0, 2], K[..., 1, 2], K[..., 0, 1]
    u = fx * xy[..., 0] + s * xy[..., 1] + cx
    v = fy * xy[..., 1] + cy
    return np.stack([u, v], axis=-1)


def project(points: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(..., 3) world points -> (..., 2) pixels."""
    return project_camera(world_to_camera(points, R, t), K)


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    """3x3 intrinsic matrix (no skew)."""
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def crop_intrinsics(K: np.ndarray, box: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """Intrinsics of the image region ``box`` = (x0, y0, x1, y1) resized to ``size`` = (W, H).

    Exact: projecting with the result equals projecting with K, subtracting (x0, y0) and
    scaling by size / box size (see the pixel convention in the module docstring).
    """
    x0, y0, x1, y1 = (float(b) for b in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop box {tuple(box)}")
    sx, sy = size[0] / (x1 - x0), size[1] / (y1 - y0)
    A = np.array([[sx, 0.0, -sx * x0], [0.0, sy, -sy * y0], [0.0, 0.0, 1.0]])
    return A @ np.asarray(K, dtype=np.float64)


def person_box(
    points2d: np.ndarray, margin: float = 0.2, square: bool = True, min_size: float = 8.0
) -> tuple[float, float, float, float]:
    """Box around (N, 2) pixel points, grown by ``margin`` of its size on every side.

    With ``square`` the box is the square around the longer side (aspect ratio kept when the
    crop is resized to a square image).
    """
    pts = np.asarray(points2d, dtype=np.float64).reshape(-1, 2)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) == 0:
        raise ValueError("person_box needs at least one finite point")
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = (lo + hi) / 2
    half = np.maximum((hi - lo) / 2 * (1 + 2 * margin), min_size / 2)
    if square:
        half = np.full(2, half.max())
    return (centre[0] - half[0], centre[1] - half[1], centre[0] + half[0], centre[1] + half[1])


def look_at(
    eye: Sequence[float], target: Sequence[float], up: Sequence[float] = (0.0, 0.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Extrinsics (R, t) of a camera at ``eye`` looking at ``target`` (OpenCV axes)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)  # image right
    if np.linalg.norm(x) < 1e-9:
        raise ValueError("look_at: viewing direction is parallel to 'up'")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)  # image down
    R = np.stack([x, y, z])
    return R, -R @ eye


@dataclass(frozen=True)
class Camera:
    """A calibrated pinhole camera (see the module docstring for conventions)."""

    K: np.ndarray
    """(3, 3) intrinsics in pixels."""
    R: np.ndarray
    """(3, 3) rotation world -> camera."""
    t: np.ndarray
    """(3,) translation world -> camera, mm."""
    width: int
    """Image width in pixels."""
    height: int
    """Image height in pixels."""
    name: str = ""
    """Camera identifier, e.g. 'cam0' or a Human3.6M serial."""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for attr, shape in (("K", (3, 3)), ("R", (3, 3)), ("t", (3,))):
            value = np.asarray(getattr(self, attr), dtype=np.float64)
            if value.shape != shape or not np.isfinite(value).all():
                raise ValueError(f"Camera.{attr} must be a finite array of shape {shape}")
            object.__setattr__(self, attr, value)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"Camera size must be positive, got {self.width}x{self.height}")

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates (mm)."""
        return -self.R.T @ self.t

    def world_to_camera(self, points: np.ndarray) -> np.ndarray:
        return world_to_camera(points, self.R, self.t)

    def camera_to_world(self, points: np.ndarray) -> np.ndarray:
        return camera_to_world(points, self.R, self.t)

    def project(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) world points (mm) -> (..., 2) pixels."""
        return project(points, self.K, self.R, self.t)

    def crop(self, box: Sequence[float], size: tuple[int, int]) -> Camera:
        """The camera that sees region ``box`` of this image resized to ``size`` = (W, H)."""
        return Camera(
            crop_intrinsics(self.K, box, size), self.R, self.t, size[0], size[1], self.name
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "K": self.K.tolist(),
            "R": self.R.tolist(),
            "t": self.t.tolist(),
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Camera:
        return cls(
            np.asarray(d["K"]),
            np.asarray(d["R"]),
            np.asarray(d["t"]),
            int(d["width"]),
            int(d["height"]),
            str(d.get("name", "")),
        )


def ring_rig(
    num_views: int = 4,
    radius_mm: float = 4500.0,
    height_mm: float = 1600.0,
    azimuths_deg: Sequence[float] | None = None,
    target: Sequence[float] = (0.0, 0.0, 1000.0),
    size: tuple[int, int] = (1000, 1000),
    focal_px: float = 1145.0,
) -> list[Camera]:
    """Cameras on a circle around the origin, all looking at ``target``.

    The defaults imitate Human3.6M's studio: four cameras at azimuth 45/135/225/315 degrees,
    4.5 m away, 1.6 m high, 1000 x 1000 px images with a ~1145 px focal length.
    """
    if azimuths_deg is None:
        azimuths_deg = [45.0 + 360.0 * i / num_views for i in range(num_views)]
    if len(azimuths_deg) != num_views:
        raise ValueError(f"{len(azimuths_deg)} azimuths for {num_views} views")
    K = intrinsics(focal_px, focal_px, size[0] / 2, size[1] / 2)
    cams = []
    for i, az in enumerate(azimuths_deg):
        a = np.deg2rad(az)
        eye = (radius_mm * np.cos(a), radius_mm * np.sin(a), height_mm)
        R, t = look_at(eye, target)
        cams.append(Camera(K, R, t, size[0], size[1], name=f"cam{i}"))
    return cams
